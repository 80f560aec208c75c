"""Needle in a haystack: can the tuned model recall one fact placed at a chosen depth of a long context?

The haystack is generated here from a seeded, built-in vocabulary of plain English sentences (no downloads, and
any tokenizer can encode it); one needle sentence ("The secret code word is X.") goes in at a sentence boundary,
and the question follows in the training prompt format (`hyperjob.stages.data`), so the model is asked as it
was trained. Import is light (torch only inside `run_needle`): `hyperjob status` renders the table from here.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from hyperjob.config.models import DatasetFormat, NeedleSection
from hyperjob.fsutil import atomic_write_text, write_json
from hyperjob.stages.data import encode_prompt, format_prompt, prompt_row

NEEDLE_JSON = "needle.json"
NEEDLE_MD = "needle.md"
JSON_VERSION = 1

_SUBJECTS = (
    "The old farmer", "A small child", "The baker", "My neighbour", "A quiet teacher", "The postman",
    "Our captain", "The painter", "A young doctor", "The shopkeeper", "The gardener", "A tired traveller",
)  # fmt: skip
_VERBS = (
    "walked past", "looked at", "talked about", "painted", "carried", "found", "watched", "cleaned",
    "visited", "remembered", "described", "repaired",
)  # fmt: skip
_OBJECTS = (
    "the green hills", "a wooden bridge", "the morning market", "an open window", "the long road",
    "a red boat", "the village church", "an empty field", "the stone wall", "a heavy basket", "the blue door",
    "the little garden",
)  # fmt: skip
_TAILS = (
    "before lunch", "in the spring", "after the rain", "every Sunday", "near the school", "without a word",
    "late at night", "with great care", "once again", "during the summer", "at the end of the day", "in silence",
)  # fmt: skip
# Top-ups: a few tokens each, to bring the prompt close to the length asked for.
_SHORT = ("It rained.", "Time passed.", "Birds sang.", "All was calm.", "Nobody spoke.", "Bells rang.", "Dogs barked.")
# Never used by the filler, so a needle value cannot be found by chance in the haystack.
_NEEDLE_WORDS = (
    "marmalade", "tangerine", "avalanche", "saxophone", "porcupine", "lighthouse", "cinnamon", "kaleidoscope",
    "hurricane", "telescope", "pineapple", "volcano", "harmonica", "penguin", "zeppelin", "labyrinth",
)  # fmt: skip


class CaseDoesNotFit(ValueError):
    """The prompt without any filler is already longer than the length asked for."""


@dataclass(frozen=True)
class Case:
    """One needle prompt. `depth` is where the needle actually sits: filler sentences before it / all of them."""

    length: int
    depth: float
    value: str
    needle: str
    question: str
    prompt: str
    input_ids: list[int]
    filler_sentences: int


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def make_needle(rng: random.Random) -> tuple[str, str, str]:
    """(needle sentence, question, value): a code word or a number, half of the time each."""
    if rng.random() < 0.5:
        word = rng.choice(_NEEDLE_WORDS)
        return f"The secret code word is {word}.", "What is the secret code word?", word
    number = str(rng.randint(10_000, 99_999))
    return f"The secret number is {number}.", "What is the secret number?", number


def needle_prompt(haystack: str, question: str, fmt: DatasetFormat, tokenizer: Any) -> str:
    """Dolly models were trained with the text as context; the other formats get it before the question."""
    row = (
        {"instruction": question, "context": haystack}
        if fmt == "dolly"
        else prompt_row(f"{haystack}\n\n{question}", fmt)
    )
    return format_prompt(row, fmt, tokenizer)


def _fillers(tokenizer: Any, rng: random.Random, n: int) -> list[tuple[str, int]]:
    """`n` filler sentences with their token counts (each encoded alone: close to its share of the whole)."""
    sentences = [filler_sentence(rng) for _ in range(n)]
    return list(zip(sentences, _token_counts(tokenizer, sentences), strict=True))


def _token_counts(tokenizer: Any, sentences: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(sentences), add_special_tokens=False)["input_ids"]] if sentences else []


def _needle_index(counts: Sequence[int], depth: float) -> int:
    """The sentence boundary with the share of filler tokens before it closest to `depth` (tokens, not sentences:
    sentences differ in length, and the needle's depth is a place in the model's context)."""
    before = list(accumulate(counts, initial=0))
    target = depth * before[-1]
    i = bisect_left(before, target)
    return i if i == 0 or (i < len(before) and before[i] - target < target - before[i - 1]) else i - 1


def build_case(tokenizer: Any, length: int, depth: float, rng: random.Random, fmt: DatasetFormat) -> Case:
    """The longest prompt of whole filler sentences that is at most `length` tokens, needle at `depth`.

    Token counts are not additive across sentence boundaries, so the count of sentences is binary-searched on the
    encoded prompt itself; short sentences then top it up, so it ends under `length` by less than one of those.
    `Case.depth` is the share of filler tokens before the needle.
    """
    needle, question, value = make_needle(rng)

    def encode(filler: Sequence[tuple[str, int]]) -> tuple[str, list[int], int]:
        at = _needle_index([n for _, n in filler], depth)
        haystack = " ".join([*(t for t, _ in filler[:at]), needle, *(t for t, _ in filler[at:])])
        prompt = needle_prompt(haystack, question, fmt, tokenizer)
        return prompt, encode_prompt(tokenizer, prompt, fmt), at

    def fits(filler: Sequence[tuple[str, int]]) -> bool:
        return len(encode(filler)[1]) <= length

    pool = _fillers(tokenizer, rng, length // 8 + 8)
    if not fits([]):
        raise CaseDoesNotFit(f"the needle, question and prompt format alone take more than {length} tokens")
    while fits(pool):  # a tokenizer with long tokens: more sentences needed
        pool += _fillers(tokenizer, rng, len(pool))
    lo, hi = 0, len(pool)  # pool[:lo] fits, pool[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(pool[:mid]) else (lo, mid)
    chosen = pool[:lo]
    shorts = rng.sample(_SHORT, len(_SHORT))
    for short in zip(shorts, _token_counts(tokenizer, shorts), strict=True):
        if fits([*chosen, short]):
            chosen.append(short)
    prompt, ids, at = encode(chosen)
    total = sum(n for _, n in chosen)
    share = sum(n for _, n in chosen[:at]) / total if total else 0.0
    return Case(length, share, value, needle, question, prompt, ids, len(chosen))


def score(answer_text: str, case: Case) -> bool:
    """The needle's value appears in the answer as a whole word (any case; markup around it is fine)."""
    return re.search(rf"(?<!\w){re.escape(case.value)}(?!\w)", answer_text, re.IGNORECASE) is not None


# ---------------------------------------------------------------- results


@dataclass
class Cell:
    """One (length, depth) cell. `trials`: trials run (0 when skipped); `answers`: what the model said per trial."""

    length: int
    depth: float
    trials: int = 0
    correct: int = 0
    skipped: str | None = None
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.trials if self.trials else None

    def to_json(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "depth": self.depth,
            "trials": self.trials,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "skipped": self.skipped,
            "answers": self.answers,
        }


@dataclass
class NeedleResult:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    context_limit: int | None
    max_new_tokens: int
    seed: int
    cells: list[Cell]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "context_limit": self.context_limit,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "cells": [c.to_json() for c in self.cells],
        }


def context_limit(config: Any) -> int | None:
    """Positions the model can attend over: max_position_embeddings, times the RoPE factor where scaling extends
    it (linear, dynamic, yarn...; llama3 and longrope already state the extended length there)."""
    base = getattr(config, "max_position_embeddings", None)
    if base is None:
        return None
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer = [p for p in params.values() if isinstance(p, Mapping)] if isinstance(params, Mapping) else []
    limit = int(base)
    for p in per_layer or [params]:
        factor = p.get("factor") if isinstance(p, Mapping) else None
        kind = p.get("rope_type", p.get("type", "default")) if isinstance(p, Mapping) else "default"
        if factor and kind != "default":
            original = p.get("original_max_position_embeddings") or base
            limit = max(limit, int(original * factor))
    return limit


def _cell_rng(seed: int, length: int, depth: float, trial: int) -> random.Random:
    """Each cell's cases depend only on its own coordinates: adding a length leaves the other cells' text as is."""
    return random.Random(f"{seed}/{length}/{depth}/{trial}")


@contextlib.contextmanager
def _quiet_length_warning() -> Iterator[None]:
    """Fitting a case encodes texts longer than the model's context on purpose; transformers' warning that such
    ids "will result in indexing errors" would only mislead the reader of the log."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_needle(
    model: Any,
    tokenizer: Any,
    section: NeedleSection,
    fmt: DatasetFormat,
    device: Any,
    max_new_tokens: int,
    log: logging.Logger | None = None,
) -> NeedleResult:
    """Every (length, depth) cell, `section.trials` greedy answers each (batch 1); too-long cells are skipped."""
    from hyperjob.stages.evaluate import greedy_answer

    log = log or logging.getLogger(__name__)
    limit = context_limit(getattr(model, "config", None))
    result = NeedleResult(section.lengths, section.depths, limit, max_new_tokens, section.seed, [])
    for length in section.lengths:
        too_long = limit is not None and length + max_new_tokens > limit
        for depth in section.depths:
            cell = Cell(length, depth)
            result.cells.append(cell)
            if too_long:
                cell.skipped = f"{length} + {max_new_tokens} new tokens exceed the model's {limit} positions"
                log.warning("needle length %d depth %.2f skipped: %s", length, depth, cell.skipped)
                continue
            start = time.monotonic()
            for trial in range(section.trials):
                try:
                    with _quiet_length_warning():
                        case = build_case(tokenizer, length, depth, _cell_rng(section.seed, length, depth, trial), fmt)
                except CaseDoesNotFit as e:
                    cell.skipped = str(e)
                    break
                answer = greedy_answer(model, tokenizer, case.input_ids, max_new_tokens, device)
                ok = score(answer, case)
                cell.trials += 1
                cell.correct += ok
                cell.answers.append({"value": case.value, "answer": answer, "tokens": len(case.input_ids), "ok": ok})
            log.info(
                "needle length %d depth %.2f: %d/%d correct (%.1fs)%s", length, depth, cell.correct, cell.trials,
                time.monotonic() - start, f"; skipped: {cell.skipped}" if cell.skipped else "",
            )  # fmt: skip
    return result


# ---------------------------------------------------------------- writers and views (pure JSON -> text)


def _percent(cell: Mapping[str, Any]) -> str:
    if cell.get("skipped") and not cell.get("trials"):
        return "skipped"
    accuracy = cell.get("accuracy")
    return "-" if accuracy is None else f"{100 * accuracy:.0f}%"


def accuracy_grid(data: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of needle.json: a row per depth, a column per length, cells accuracy % or `skipped`."""
    lengths, depths = list(data["lengths"]), list(data["depths"])
    cells = {(c["length"], c["depth"]): c for c in data["cells"]}
    header = ["depth \\ length", *(str(n) for n in lengths)]
    rows = [[f"{d:g}", *(_percent(cells.get((n, d), {})) for n in lengths)] for d in depths]
    return header, rows


def skip_reasons(data: Mapping[str, Any]) -> list[str]:
    """One line per length whose cells were skipped, with the reason (the same for a whole length)."""
    seen: dict[int, str] = {}
    for c in data["cells"]:
        if c.get("skipped"):
            seen.setdefault(c["length"], c["skipped"])
    return [f"length {n} skipped: {why}" for n, why in seen.items()]


def render_markdown(data: Mapping[str, Any]) -> str:
    header, rows = accuracy_grid(data)
    lines = ["# Needle in a haystack", "", "Accuracy per depth (rows) and context length in tokens (columns).", ""]
    lines += [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    reasons = skip_reasons(data)
    return "\n".join([*lines, *([""] + [f"- {r}" for r in reasons] if reasons else []), ""])


def write_needle(out_dir: Path, result: NeedleResult) -> Path:
    """needle.json and needle.md into `out_dir`, each atomically; returns the JSON path."""
    data = result.to_json()
    write_json(out_dir / NEEDLE_JSON, data)
    atomic_write_text(out_dir / NEEDLE_MD, render_markdown(data))
    return out_dir / NEEDLE_JSON


def total_tokens(lengths: Sequence[int], depths: Sequence[float], trials: int) -> int:
    """Prompt tokens a needle run reads at most (skipped lengths included), for the log line before it starts."""
    return len(depths) * trials * sum(lengths)
