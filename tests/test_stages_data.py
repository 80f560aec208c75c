"""Data prep for training: prompt formats, exact label masks, packing, bad rows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from hyperjob.config.models import DatasetSection
from hyperjob.stages.data import (
    IGNORE_INDEX,
    DataError,
    PadCollator,
    build_examples,
    build_train_examples,
    encode_example,
    encode_prompt,
    format_prompt,
    pack_examples,
    prompt_row,
    read_jsonl,
)

DOLLY = Path(__file__).resolve().parents[1] / "examples" / "data" / "dolly-tiny.jsonl"


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained (non-ignored) labels."""
    runs: list[list[int]] = []
    prev = IGNORE_INDEX
    for x in labels:
        if x != IGNORE_INDEX:
            if prev == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(x)
        prev = x
    return runs


# ---------------------------------------------------------------- formats


def test_dolly_prompt_with_and_without_context() -> None:
    with_ctx = format_prompt({"instruction": "Q?", "context": "Some facts.", "response": "A."}, "dolly")
    assert with_ctx == "### Instruction:\nQ?\n\n### Context:\nSome facts.\n\n### Response:\n"
    for empty in ("", "   ", None):
        row = {"instruction": "Q?", "context": empty, "response": "A."}
        assert format_prompt(row, "dolly") == "### Instruction:\nQ?\n\n### Response:\n"
    assert format_prompt(prompt_row("Q?", "dolly"), "dolly") == "### Instruction:\nQ?\n\n### Response:\n"


def test_text_and_chat_prompts(tok: Any) -> None:
    assert format_prompt({"text": "hello"}, "text") == "hello"
    row = prompt_row("Hi", "chat")
    assert format_prompt(row, "chat", tok) == "<s><|user|>\nHi</s><|assistant|>\n"
    with pytest.raises(ValueError, match="tokenizer"):
        format_prompt(row, "chat")


def test_dolly_labels_mask_exactly_the_prompt(tok: Any) -> None:
    row = {"instruction": "What is the capital of Kenya?", "context": "", "response": "Nairobi."}
    ex = encode_example(row, "dolly", tok)
    prompt = encode_prompt(tok, format_prompt(row, "dolly"), "dolly")
    answer = [*tok("Nairobi.", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert prompt[0] == tok.bos_token_id
    assert ex["input_ids"] == prompt + answer
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.decode([x for x in ex["labels"] if x != IGNORE_INDEX]) == "Nairobi.</s>"


def test_text_trains_on_everything_but_bos(tok: Any) -> None:
    ex = encode_example({"text": "The sky is blue."}, "text", tok)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"] == [IGNORE_INDEX, *ex["input_ids"][1:]]


def test_chat_trains_on_assistant_turns_only(tok: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    ex = encode_example({"messages": messages}, "chat", tok)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert [tok.decode(run) for run in _runs(ex["labels"])] == ["Rome.</s>", "Madrid.</s>"]
    # The prompt of the first turn is what evaluation would feed the model.
    prompt = encode_prompt(tok, format_prompt({"messages": messages}, "chat", tok), "chat")
    assert ex["input_ids"][: len(prompt)] == prompt
    assert set(ex["labels"][: len(prompt)]) == {IGNORE_INDEX}


def test_chat_ending_with_user_turn_appends_untrained_eos(tok: Any) -> None:
    messages = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ex = encode_example({"messages": messages}, "chat", tok)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert [tok.decode(run) for run in _runs(ex["labels"])] == ["Hello.</s>"]


# ---------------------------------------------------------------- truncation, packing, padding


def test_truncation_and_rows_without_answer_tokens(tok: Any) -> None:
    rows = [
        {"instruction": "Short?", "context": "", "response": "A fairly long answer with many words in it."},
        {"instruction": "word " * 200, "context": "", "response": "Lost."},
    ]
    examples, stats = build_examples(rows, "dolly", tok, seq_len=24)
    assert stats.rows == 2 and stats.examples == 1 and stats.skipped_no_labels == 1 and stats.truncated == 2
    assert len(examples[0]["input_ids"]) == 24 == len(examples[0]["labels"])
    assert examples[0]["labels"][-1] != IGNORE_INDEX


def test_packing_makes_full_rows_of_whole_examples(tok: Any) -> None:
    rows = read_jsonl(DOLLY, "dolly")[:40]
    examples, _ = build_examples(rows, "dolly", tok, seq_len=64)
    blocks = pack_examples(examples, seq_len=64, pad_id=tok.pad_token_id)
    assert blocks and all(len(b[k]) == 64 for b in blocks for k in ("input_ids", "labels", "position_ids"))
    assert all("attention_mask" not in b for b in blocks)
    # Every example is one position run of some row, whole, its first label ignored and the rest unchanged.
    found = []
    for b in blocks:
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0] + [64]
        found += [(b["input_ids"][a:z], b["labels"][a:z]) for a, z in pairwise(starts)]
    for e in examples:
        assert (e["input_ids"], [IGNORE_INDEX, *e["labels"][1:]]) in found
    assert all(b["labels"].count(IGNORE_INDEX) < 64 for b in blocks)


def test_concat_packing_is_kept_for_neuron(tok: Any) -> None:
    """The old layout: the examples' tokens cut into consecutive blocks, one causal mask, the tail masked."""
    rows = read_jsonl(DOLLY, "dolly")[:40]
    examples, _ = build_examples(rows, "dolly", tok, seq_len=64)
    blocks = pack_examples(examples, seq_len=64, pad_id=tok.pad_token_id, mode="concat")
    assert blocks and all(len(b[k]) == 64 for b in blocks for k in ("input_ids", "labels", "attention_mask"))
    flat = [x for b in blocks for x, m in zip(b["input_ids"], b["attention_mask"], strict=True) if m]
    flat_labels = [x for b in blocks for x, m in zip(b["labels"], b["attention_mask"], strict=True) if m]
    assert flat == [x for e in examples for x in e["input_ids"]]
    assert flat_labels == [x for e in examples for x in e["labels"]]
    last = blocks[-1]
    pad = last["attention_mask"].count(0)
    assert last["attention_mask"] == [1] * (64 - pad) + [0] * pad
    assert last["labels"][64 - pad :] == [IGNORE_INDEX] * pad
    assert all(m == 1 for b in blocks[:-1] for m in b["attention_mask"])


def test_build_train_examples_packing_flag(tok: Any) -> None:
    section = DatasetSection(path=DOLLY, format="dolly")
    packed, stats = build_train_examples(section, tok, seq_len=128, packing=True)
    plain, plain_stats = build_train_examples(section, tok, seq_len=128, packing=False)
    assert len(plain) == stats.examples == 214 and {len(b["input_ids"]) for b in packed} == {128}
    assert plain_stats.pack is None and stats.pack is not None and stats.pack.rows == len(packed)
    # Whole examples only: every token once (no first-label-only example in this data). Only ~2 examples fit a row
    # here, so bins cannot be filled as tightly as with long rows: 111 rows where 107 is the lower bound.
    assert stats.pack.real_tokens == stats.tokens
    assert stats.pack.pad_tokens == 128 * len(packed) - stats.tokens and stats.pack.pad_fraction < 0.04
    concat, _ = build_train_examples(section, tok, seq_len=128, packing=True, packing_mode="concat")
    assert len(concat) == -(-stats.tokens // 128) and "position_ids" not in concat[0]


def test_collator_pads_right() -> None:
    batch = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    out = PadCollator(pad_id=3, pad_to_multiple_of=4)(batch)
    assert out["input_ids"].tolist() == [[1, 5, 6, 3], [1, 7, 3, 3]]
    assert out["labels"].tolist() == [[-100, 5, 6, -100], [-100, 7, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


DIGEST = """
import hashlib, json, sys
from pathlib import Path
from transformers import AutoTokenizer
from hyperjob.config.models import DatasetSection
from hyperjob.stages.data import build_train_examples
tok = AutoTokenizer.from_pretrained(sys.argv[1])
examples, _ = build_train_examples(DatasetSection(path=Path(sys.argv[2]), format="dolly"), tok, 64, packing=True)
print(hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest())
"""


def test_every_process_builds_the_same_examples(tok: Any, tiny_model_dir: Path) -> None:
    """Each data-parallel rank, and a resumed run, tokenizes on its own: their examples must match exactly."""
    digests = set()
    for seed in ("1", "2"):  # a different hash seed per process, as separate ranks have
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", DIGEST, str(tiny_model_dir), str(DOLLY)],
                              capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
        digests.add(proc.stdout.strip())
    examples, _ = build_train_examples(DatasetSection(path=DOLLY, format="dolly"), tok, 64, packing=True)
    assert digests == {hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()}


# ---------------------------------------------------------------- bad rows


GOOD = json.dumps({"instruction": "Q", "context": "", "response": "A"})


@pytest.mark.parametrize(
    ("bad", "fmt", "message"),
    [
        ('{"instruction": "Q", "response": ', "dolly", "invalid JSON"),
        (json.dumps({"instruction": "Q", "context": ""}), "dolly", "missing field 'response'"),
        (json.dumps({"instruction": 3, "response": "A"}), "dolly", "field 'instruction' must be a string, got int"),
        (json.dumps({"instruction": " ", "response": "A"}), "dolly", "field 'instruction' is empty"),
        (json.dumps(["Q", "A"]), "dolly", "expected a JSON object, got list"),
        (json.dumps({"body": "x"}), "text", "missing field 'text'"),
        (json.dumps({"messages": []}), "chat", "non-empty list"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "chat", "no message has role 'assistant'"),
        (json.dumps({"messages": [{"content": "hi"}]}), "chat", "messages[0]: missing field 'role'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, bad: str, fmt: Any, message: str) -> None:
    good = (
        GOOD
        if fmt == "dolly"
        else json.dumps({"text": "ok"} if fmt == "text" else {"messages": [{"role": "assistant", "content": "A"}]})
    )
    path = _write(tmp_path, [good, "", bad])
    with pytest.raises(DataError) as err:
        read_jsonl(path, fmt)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(_write(tmp_path, [""]), "dolly")
    with pytest.raises(DataError, match="cannot read dataset file"):
        read_jsonl(tmp_path / "absent.jsonl", "dolly")


def test_train_stage_reports_bad_row_in_one_line(
    tmp_path: Path, make_tiny_run_dir: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from hyperjob.stages import train

    bad = _write(tmp_path, [GOOD, '{"instruction": "Q"}'])
    run_dir = make_tiny_run_dir([f"dataset.path={bad}"])
    assert train.main(["--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hyperjob train: error: {bad}:2: missing field 'response'"]
