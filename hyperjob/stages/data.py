"""Training data: load rows, format prompts, tokenize with prompt masking, pack or pad.

Pure functions over plain Python lists (torch appears only in the collator), so the exact label masks and
block shapes are testable without a model. Training and evaluation share `format_prompt`, so the tuned model
is always asked questions in the format it was trained on. Packing itself lives in `hyperjob.longctx.packing`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hyperjob.config.models import DatasetFormat, DatasetSection
from hyperjob.longctx.packing import IGNORE_INDEX, PackStats, pack, pack_stats
from hyperjob.stages.common import StageError

Row = dict[str, Any]
Example = dict[str, list[int]]


class DataError(StageError):
    """A bad data row or file: the message names the file and line (or dataset row)."""


@dataclass(frozen=True)
class DataStats:
    rows: int
    examples: int
    skipped_no_labels: int
    truncated: int
    tokens: int
    trainable_tokens: int
    pack: PackStats | None = None  # the packed rows' padding, when packing


@dataclass
class DataTally:
    """Running counts while examples stream into the packer (the stats must not need the examples kept)."""

    rows: int = 0
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    tokens: int = 0
    trainable: int = 0

    def stats(self, packed: PackStats | None = None) -> DataStats:
        return DataStats(self.rows, self.examples, self.skipped, self.truncated, self.tokens, self.trainable, packed)


# ---------------------------------------------------------------- rows


def _need_str(row: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def validate_row(row: Any, fmt: DatasetFormat, where: str) -> Row:
    """Check one row has the fields its format needs; return only those fields, normalised."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt == "dolly":
        return {
            "instruction": _need_str(row, "instruction", where),
            "context": _need_str(row, "context", where, optional=True),
            "response": _need_str(row, "response", where),
        }
    if fmt == "text":
        return {"text": _need_str(row, "text", where)}
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        out.append(
            {
                "role": _need_str(msg, "role", f"{where}: messages[{i}]"),
                "content": _need_str(msg, "content", f"{where}: messages[{i}]", optional=True),
            }
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no message has role 'assistant', so there is nothing to train on")
    return {"messages": out}


def read_jsonl(path: Path, fmt: DatasetFormat) -> list[Row]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read dataset file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        rows.append(validate_row(obj, fmt, where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_rows(section: DatasetSection, token: str | None = None) -> list[Row]:
    """Rows from the local JSONL file or the hub dataset (served from the HF cache filled by download)."""
    if section.path is not None:
        return read_jsonl(section.path, section.format)
    assert section.id is not None
    import datasets

    try:
        ds = datasets.load_dataset(section.id, split=section.split, token=token)
    except Exception as e:  # datasets raises many types; one line naming the dataset is what the user needs
        raise DataError(f"cannot load dataset {section.id!r} split {section.split!r}: {type(e).__name__}") from None
    where = f"dataset {section.id} (split {section.split}) row"
    rows = [validate_row(row, section.format, f"{where} {i}") for i, row in enumerate(ds)]
    if not rows:
        raise DataError(f"dataset {section.id!r} split {section.split!r} has no rows")
    return rows


# ---------------------------------------------------------------- formatting


def prompt_row(text: str, fmt: DatasetFormat) -> Row:
    """An evaluation prompt as a row of `fmt`: a dolly instruction without context, a single user turn, or text."""
    if fmt == "dolly":
        return {"instruction": text, "context": ""}
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": text}]}
    return {"text": text}


def format_prompt(row: Mapping[str, Any], fmt: DatasetFormat, tokenizer: Any = None) -> str:
    """The text the model sees before it should answer (chat needs the tokenizer for its template).

    For chat rows, everything up to the first assistant turn is the prompt (with the generation prompt).
    """
    if fmt == "dolly":
        context = str(row.get("context") or "").strip()
        ctx = f"### Context:\n{context}\n\n" if context else ""
        return f"### Instruction:\n{row['instruction']}\n\n{ctx}### Response:\n"
    if fmt == "text":
        return str(row["text"])
    if tokenizer is None:
        raise ValueError("the chat format needs a tokenizer with a chat template")
    messages = list(row["messages"])
    first_assistant = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return _render(tokenizer, messages[:first_assistant], generation_prompt=True)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("dataset.format is 'chat' but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def prompt_add_special_tokens(fmt: DatasetFormat) -> bool:
    """Chat templates write <s> themselves; other formats let the tokenizer add it."""
    return fmt != "chat"


# ---------------------------------------------------------------- tokenizing


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _strip_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Some tokenizers append </s> themselves; a prompt must not end the sequence."""
    eos = tokenizer.eos_token_id
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def _chat_example(tokenizer: Any, messages: Sequence[Mapping[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Tokenize a whole conversation once; label only tokens that start inside an assistant turn.

    Assistant spans come from rendering the conversation prefix by prefix, which works for any template whose
    renders are prefixes of each other (all common ones); offsets map characters back to tokens.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if i:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
            start = len(before) if upto.startswith(before) else -1
        else:  # transformers refuses to render []: find the opening assistant text in its own render
            start = upto.rfind(msg["content"]) if msg["content"] else len(upto)
        if start < 0 or not full.startswith(upto):
            raise DataError(f"{where}: the tokenizer's chat template is not prefix-stable; cannot mask turns")
        spans.append((start, len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos if messages[-1]["role"] == "assistant" else IGNORE_INDEX)
    return ids, labels


def encode_prompt(tokenizer: Any, text: str, fmt: DatasetFormat) -> list[int]:
    """Prompt token ids exactly as training saw them (evaluation must generate from the same ids)."""
    return _strip_eos(tokenizer, _ids(tokenizer, text, prompt_add_special_tokens(fmt)))


def encode_example(row: Mapping[str, Any], fmt: DatasetFormat, tokenizer: Any, where: str = "row") -> Example:
    """Token ids and labels (IGNORE_INDEX on prompt tokens and <s>), ending in </s>; not yet truncated."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; cannot mark where an answer ends")
    if fmt == "dolly":
        prompt = encode_prompt(tokenizer, format_prompt(row, fmt), fmt)
        answer = [*_ids(tokenizer, str(row["response"]), False), eos]
        return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
    if fmt == "text":
        ids = [*_strip_eos(tokenizer, _ids(tokenizer, str(row["text"]), True)), eos]
        bos = tokenizer.bos_token_id
        return {"input_ids": ids, "labels": [IGNORE_INDEX if t == bos else t for t in ids]}
    ids, labels = _chat_example(tokenizer, row["messages"], where)
    return {"input_ids": ids, "labels": labels}


def iter_examples(
    rows: Iterable[Mapping[str, Any]], fmt: DatasetFormat, tokenizer: Any, seq_len: int, tally: DataTally
) -> Iterator[Example]:
    """Encode and truncate rows one at a time, counting into `tally`; skip rows whose answer falls past `seq_len`."""
    for i, row in enumerate(rows):
        tally.rows += 1
        ex = encode_example(row, fmt, tokenizer, where=f"row {i}")
        if len(ex["input_ids"]) > seq_len:
            tally.truncated += 1
            ex = {k: v[:seq_len] for k, v in ex.items()}
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            tally.skipped += 1
            continue
        tally.examples += 1
        tally.tokens += len(ex["input_ids"])
        tally.trainable += sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        yield ex


def build_examples(
    rows: Sequence[Mapping[str, Any]], fmt: DatasetFormat, tokenizer: Any, seq_len: int
) -> tuple[list[Example], DataStats]:
    """Encode and truncate every row; drop rows whose answer falls entirely past `seq_len`."""
    tally = DataTally()
    examples = list(iter_examples(rows, fmt, tokenizer, seq_len, tally))
    return examples, tally.stats()


# isolated: whole examples per row, position_ids restarting per example, each attending only to itself (cpu/cuda).
# concat: the examples' tokens cut into consecutive blocks with one causal mask (each sees the ones before it in its
# block, and one can be split over two blocks); kept for models that build their own causal mask and ignore
# position_ids for masking, such as optimum-neuron's training Llama.
PackingMode = Literal["isolated", "concat"]


def pack_examples(
    examples: Iterable[Example], seq_len: int, pad_id: int, mode: PackingMode = "isolated"
) -> list[Example]:
    """Rows of exactly `seq_len` tokens; see `PackingMode` and `hyperjob.longctx.packing.pack`."""
    if mode == "isolated":
        return list(pack(examples, seq_len, pad_id))
    return concat_examples(examples, seq_len, pad_id)


def concat_examples(examples: Iterable[Example], seq_len: int, pad_id: int) -> list[Example]:
    """Concatenate examples (each keeps its own label mask) into blocks of exactly `seq_len` tokens.

    The last partial block is padded (attention 0, labels ignored) rather than dropped, so no answer is lost.
    """
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids.extend(ex["input_ids"])
        labels.extend(ex["labels"])
    blocks: list[Example] = []
    for start in range(0, len(ids), seq_len):
        block_ids, block_labels = ids[start : start + seq_len], labels[start : start + seq_len]
        pad = seq_len - len(block_ids)
        if all(label == IGNORE_INDEX for label in block_labels):
            continue
        blocks.append(
            {
                "input_ids": block_ids + [pad_id] * pad,
                "labels": block_labels + [IGNORE_INDEX] * pad,
                "attention_mask": [1] * len(block_ids) + [0] * pad,
            }
        )
    return blocks


def pad_id_of(tokenizer: Any) -> int:
    """Llama 3 ships no pad token; padding positions are masked anyway, so eos is a safe stand-in."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


class PadCollator:
    """Right-pad a batch to its longest example: labels with IGNORE_INDEX, attention mask with 0.

    `length`: pad every batch to exactly this many tokens instead (XLA compiles one graph per input shape, so
    Trainium needs every batch the same shape as the compile run's).

    Packed rows (with `position_ids`) pass their positions through and get NO attention_mask: transformers then
    builds the block-diagonal mask from the positions. Extra padding gets its own position run, its own block.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, length: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of
        self.length = length

    def __call__(self, batch: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(ex["input_ids"]) for ex in batch)
        if self.length is not None:
            if longest > self.length:
                raise DataError(f"an example has {longest} tokens, more than the fixed length {self.length}")
            longest = self.length
        elif self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        packed = ["position_ids" in ex for ex in batch]
        if any(packed):
            if not all(packed):
                raise DataError("a batch mixes packed rows (with position_ids) and unpacked rows")
            return self._packed(batch, longest)
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for ex in batch:
            n = len(ex["input_ids"])
            pad = longest - n
            mask = list(ex.get("attention_mask", [1] * n))
            out["input_ids"].append([*ex["input_ids"], *[self.pad_id] * pad])
            out["labels"].append([*ex["labels"], *[IGNORE_INDEX] * pad])
            out["attention_mask"].append(mask + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    def _packed(self, batch: Sequence[Mapping[str, Sequence[int]]], longest: int) -> dict[str, Any]:
        import torch

        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ex in batch:
            pad = longest - len(ex["input_ids"])
            out["input_ids"].append([*ex["input_ids"], *[self.pad_id] * pad])
            out["labels"].append([*ex["labels"], *[IGNORE_INDEX] * pad])
            out["position_ids"].append([*ex["position_ids"], *range(pad)])
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def build_train_examples(
    section: DatasetSection,
    tokenizer: Any,
    seq_len: int,
    packing: bool,
    token: str | None = None,
    packing_mode: PackingMode = "isolated",
) -> tuple[list[Example], DataStats]:
    """Everything the train stage needs from the data: rows -> encoded, truncated, optionally packed examples.

    Isolated packing streams the encoded examples straight into the packer, so the unpacked list never exists;
    the returned stats then carry the packed rows' padding (`DataStats.pack`).
    """
    rows = load_rows(section, token)
    if not packing or packing_mode == "concat":
        examples, stats = build_examples(rows, section.format, tokenizer, seq_len)
        if examples and packing:
            examples = concat_examples(examples, seq_len, pad_id_of(tokenizer))
    else:
        tally = DataTally()
        encoded = iter_examples(rows, section.format, tokenizer, seq_len, tally)
        examples = list(pack(encoded, seq_len, pad_id_of(tokenizer)))
        stats = tally.stats(pack_stats(examples))
    if not examples:
        raise DataError(f"no row has an answer within training.seq_len={seq_len} tokens")
    return examples, stats
