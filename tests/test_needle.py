"""Needle in a haystack: case building on the tiny tokenizer, scoring, the writers, the evaluate stage and status."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fixtures_tiny import make_run_dir
from run_helpers import config

from hyperjob.config.models import DatasetFormat, NeedleSection
from hyperjob.paths import RunPaths
from hyperjob.stages import needle
from hyperjob.stages.data import encode_prompt, prompt_add_special_tokens
from hyperjob.stages.needle import Case, CaseDoesNotFit, Cell, NeedleResult, build_case, score


@pytest.fixture(scope="module")
def tok() -> Any:
    from hyperjob.stages.tiny import build_tokenizer

    return build_tokenizer()


def _tokens(tok: Any, texts: tuple[str, ...]) -> int:
    return max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def _haystack_span(case: Case) -> tuple[int, int]:
    """Character span of the haystack in the prompt, found from the sentences the generator can write."""
    starts = [*needle._SUBJECTS, *needle._SHORT, case.needle]
    hits = [m.start() for m in re.finditer("|".join(re.escape(s) for s in starts), case.prompt)]
    return min(hits), case.prompt.index(".", max(hits)) + 1


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the token covering character `char` (byte-level tokens carry their leading space)."""
    return next(i for i, (lo, hi) in enumerate(offsets) if hi > char and hi > lo)


@pytest.mark.parametrize("fmt", ["dolly", "chat", "text"])
def test_case_fits_the_length_and_the_needle_sits_at_its_depth(tok: Any, fmt: DatasetFormat) -> None:
    slack = _tokens(tok, needle._SHORT) + 1  # the top-up sentences leave less than one of them unused
    for length in (96, 256, 1024):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            case = build_case(tok, length, depth, random.Random(f"{fmt}{length}{depth}"), fmt)
            assert length - slack < len(case.input_ids) <= length, (length, len(case.input_ids))
            assert encode_prompt(tok, case.prompt, fmt) == case.input_ids  # the ids are the training encoding
            assert case.prompt.count(case.needle) == 1 and case.question in case.prompt
            enc = tok(case.prompt, add_special_tokens=prompt_add_special_tokens(fmt), return_offsets_mapping=True)
            assert list(enc["input_ids"]) == case.input_ids
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            lo_char, hi_char = _haystack_span(case)
            lo, hi = _token_at(offsets, lo_char), _token_at(offsets, hi_char - 1) + 1
            at = _token_at(offsets, case.prompt.index(case.needle))
            needle_len = _token_at(offsets, case.prompt.index(case.needle) + len(case.needle) - 1) + 1 - at
            filler = hi - lo - needle_len
            got = (at - lo) / filler
            if depth in (0.0, 1.0):
                assert got == depth, (fmt, length, depth, got)
            tolerance = _tokens(tok, tuple(case.prompt[lo_char:hi_char].split(". "))) / filler
            assert abs(got - depth) <= tolerance, (fmt, length, depth, got, tolerance)
            assert abs(case.depth - depth) <= tolerance / 2 + 0.01, (fmt, length, depth, case.depth)
            if length == 1024:
                assert abs(got - depth) <= 0.05 and abs(got - case.depth) <= 0.02, (depth, got, case.depth)


def test_cases_are_reproducible_and_the_needle_varies(tok: Any) -> None:
    a = build_case(tok, 200, 0.5, random.Random(7), "dolly")
    assert a == build_case(tok, 200, 0.5, random.Random(7), "dolly")
    cases = [build_case(tok, 200, 0.5, random.Random(seed), "dolly") for seed in range(12)]
    values = {c.value for c in cases}
    assert len(values) >= 8 and any(v.isdigit() for v in values) and any(v.isalpha() for v in values)
    for c in cases:  # the value occurs once: in the needle, never by chance in the filler
        assert c.prompt.count(c.value) == 1 and c.value in c.needle
        assert "secret" in c.question and c.question.endswith("?")
    with pytest.raises(CaseDoesNotFit, match="more than 8 tokens"):
        build_case(tok, 8, 0.5, random.Random(0), "dolly")


def test_score_wants_the_value_as_a_whole_word(tok: Any) -> None:
    word = Case(64, 0.5, "marmalade", "The secret code word is marmalade.", "q", "p", [], 0)
    number = Case(64, 0.5, "12345", "The secret number is 12345.", "q", "p", [], 0)
    assert score("The secret code word is **Marmalade**.", word) and score("marmalade", word)
    assert not score("marmalades", word) and not score("I do not know.", word) and not score("", word)
    assert score("It is 12345.", number) and not score("123456", number) and not score("1234", number)


def test_context_limit_follows_rope_scaling() -> None:
    from transformers import LlamaConfig

    assert needle.context_limit(LlamaConfig(max_position_embeddings=512)) == 512
    linear = LlamaConfig(max_position_embeddings=512, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert needle.context_limit(linear) == 2048
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert needle.context_limit(LlamaConfig(max_position_embeddings=4096, rope_scaling=yarn)) == 16384
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # fmt: skip
    assert needle.context_limit(LlamaConfig(max_position_embeddings=131072, rope_scaling=llama3)) == 131072
    assert needle.context_limit(None) is None


def _result() -> NeedleResult:
    cells = [
        Cell(64, 0.0, trials=2, correct=2),
        Cell(64, 1.0, trials=2, correct=1),
        Cell(128, 0.0, trials=2, correct=0),
        Cell(128, 1.0, trials=2, correct=1),
        Cell(1024, 0.0, skipped="1024 + 24 new tokens exceed the model's 512 positions"),
        Cell(1024, 1.0, skipped="1024 + 24 new tokens exceed the model's 512 positions"),
    ]
    return NeedleResult((64, 128, 1024), (0.0, 1.0), 512, 24, 0, cells)


def test_writers_put_depths_in_rows_and_lengths_in_columns(tmp_path: Path) -> None:
    path = needle.write_needle(tmp_path, _result())
    data = json.loads(path.read_text())
    first = {k: data["cells"][1][k] for k in ("length", "depth", "trials", "correct", "accuracy")}
    assert first == {"length": 64, "depth": 1.0, "trials": 2, "correct": 1, "accuracy": 0.5}
    assert data["cells"][4]["accuracy"] is None and "512 positions" in data["cells"][4]["skipped"]
    md = (tmp_path / needle.NEEDLE_MD).read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table == [
        "| depth \\ length | 64 | 128 | 1024 |",
        "|---|---|---|---|",
        "| 0 | 100% | 0% | skipped |",
        "| 1 | 50% | 50% | skipped |",
    ]
    assert "- length 1024 skipped: 1024 + 24 new tokens exceed the model's 512 positions" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["needle.json", "needle.md"]  # no temp files left


@pytest.mark.parametrize(("oracle", "expected"), [(True, 1.0), (False, 0.0)])
def test_run_needle_reaches_100_percent_with_a_model_that_knows(
    tok: Any, monkeypatch: pytest.MonkeyPatch, oracle: bool, expected: float
) -> None:
    """The generation is replaced by one that reads the needle out of the prompt: every cell that fits scores 100%
    (and a model answering something else 0%), so the cell bookkeeping and the scorer agree end to end."""
    from transformers import LlamaConfig

    from hyperjob.stages import evaluate

    seen: list[int] = []

    def answer(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, device: Any) -> str:
        seen.append(len(ids))
        found = re.search(r"The secret (?:code word|number) is (\w+)\.", tokenizer.decode(ids))
        assert found is not None
        return f"It is {found.group(1)}." if oracle else "I cannot tell."

    monkeypatch.setattr(evaluate, "greedy_answer", answer)
    model = SimpleNamespace(config=LlamaConfig(max_position_embeddings=512))
    section = NeedleSection(lengths=(64, 160, 1024), depths=(0.0, 0.5, 1.0), trials=3, seed=5)
    result = needle.run_needle(model, tok, section, "dolly", "cpu", max_new_tokens=16)
    data = result.to_json()
    fit = [c for c in data["cells"] if c["length"] != 1024]
    assert len(data["cells"]) == 9 and len(seen) == 18 and max(seen) <= 160
    assert all(c["trials"] == 3 and c["accuracy"] == expected and c["skipped"] is None for c in fit)
    assert all(c["correct"] == sum(a["ok"] for a in c["answers"]) for c in fit)
    skipped = [c for c in data["cells"] if c["length"] == 1024]
    assert all(c["trials"] == 0 and c["accuracy"] is None and "512 positions" in c["skipped"] for c in skipped)
    rows = needle.accuracy_grid(data)[1]
    want = f"{100 * expected:.0f}%"
    assert rows == [[d, want, want, "skipped"] for d in ("0", "0.5", "1")]


def test_evaluate_stage_writes_the_needle_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The evaluate entry on the tiny model: without `evaluate.needle` nothing changes; with it, needle.json and
    needle.md sit beside the answers, one cell per (length, depth), the too-long length skipped."""
    import shutil

    from hyperjob.cli.report import read_needle
    from hyperjob.config.load import load_resolved
    from hyperjob.stage_outputs import check_marker
    from hyperjob.stages import evaluate

    base = ["evaluate.prompts=['What is the capital of France?']", "evaluate.max_new_tokens=8"]
    run_dir = make_run_dir(tmp_path / "work", base, model_dir=tiny_model_dir)
    paths = RunPaths(run_dir)
    shutil.copytree(tiny_model_dir, paths.merged)  # the tuned model: here the base itself
    assert evaluate.main(["--run-dir", str(run_dir)]) == 0
    assert (paths.evaluation / "answers.json").is_file() and not (paths.evaluation / "needle.json").exists()

    section = "{lengths: [64, 128, 1024], depths: [0, 0.5, 1], trials: 2, seed: 3}"
    make_run_dir(tmp_path / "work", [*base, f"evaluate.needle={section}"])
    cfg = load_resolved(paths.config)
    assert not check_marker(paths, cfg, "evaluate").ok  # adding the needle invalidates the completed stage
    assert evaluate.main(["--run-dir", str(run_dir)]) == 0
    data = json.loads((paths.evaluation / "needle.json").read_text())
    assert read_needle(run_dir) == data and data["context_limit"] == 512 and data["max_new_tokens"] == 8
    assert [(c["length"], c["depth"]) for c in data["cells"]] == [(n, d) for n in (64, 128, 1024) for d in (0, 0.5, 1)]
    for c in data["cells"]:
        if c["length"] == 1024:
            assert c["trials"] == 0 and c["skipped"] == "1024 + 8 new tokens exceed the model's 512 positions"
            continue
        assert c["trials"] == 2 and len(c["answers"]) == 2 and c["skipped"] is None
        assert c["correct"] == sum(a["ok"] for a in c["answers"]) and c["accuracy"] == c["correct"] / 2
        for a in c["answers"]:
            assert c["length"] - 10 < a["tokens"] <= c["length"]
            assert a["ok"] == score(a["answer"], Case(0, 0, a["value"], "", "", "", [], 0))
    table = [line for line in (paths.evaluation / "needle.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and table[0] == "| depth \\ length | 64 | 128 | 1024 |"
    assert all(row.endswith("| skipped |") for row in table[2:])
    assert (paths.evaluation / "answers.json").is_file() and check_marker(paths, cfg, "evaluate").ok


def test_status_shows_the_table_without_importing_torch(tmp_path: Path) -> None:
    from hyperjob.cli.main import main

    assert main(["submit", str(config(tmp_path)), "--dry-run"]) == 0
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    needle.write_needle(RunPaths(run_dir).evaluation, _result())
    code = (
        "import sys\nfrom hyperjob.cli.main import main\n"
        f"assert main(['status', {str(run_dir)!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("needle in a haystack: accuracy by depth and context length (tokens)")
    assert [line.split() for line in lines[start + 1 : start + 4]] == [
        ["depth", "\\", "length", "64", "128", "1024"],
        ["0", "100%", "0%", "skipped"],
        ["1", "50%", "50%", "skipped"],
    ]
    assert "length 1024 skipped: 1024 + 24 new tokens exceed the model's 512 positions" in out.stdout
    js = subprocess.run([sys.executable, "-m", "hyperjob", "status", str(run_dir), "--json"], capture_output=True,
                        text=True, timeout=120)  # fmt: skip
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["needle"] == _result().to_json()
