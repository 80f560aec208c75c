"""What a person sees at the end of a run and in `status`: the readable answers (escaped), the training curves
(CSV + a PNG drawn without a plotting library), the merge's progress label, and colour only at a terminal."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fixtures_tiny import make_run_dir
from run_helpers import config, hyperjob

from hyperjob.cli import report
from hyperjob.paths import RunPaths
from hyperjob.schedule.manifest import Manifest, StageRecord, read_manifest, write_manifest
from hyperjob.schedule.states import StageState
from hyperjob.stages import curves
from hyperjob.stages.evaluate import TINY_NOTE, escape_controls, render_markdown

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HOSTILE = "ok\x1b[2J\x1b]0;pwned\x07 \rback\x00nul\x85nel\u2028ls\u202eevil\x9bcsi\x15 tab\there"
STAGES = ("download", "train", "merge", "evaluate")


# ---------------------------------------------------------------- answers.md


def _unsafe(text: str) -> list[str]:
    """Characters a terminal would act on: every control but newline and tab, separators, bidi overrides."""
    return [
        c
        for c in text
        if c not in "\n\t" and (unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in "\u202a\u202e\u2066")
    ]


def test_answers_md_escapes_what_a_terminal_would_act_on() -> None:
    records = [{"prompt": "say\x1b[31m\nit", "base": HOSTILE, "tuned": "line 1\nline 2\r\n"}]
    md = render_markdown("run", Path("/m/base"), "/m/merged", records)
    assert _unsafe(md) == [], _unsafe(md)
    # What the model emitted stays readable, as Python escapes; real newlines still split the quote.
    assert r"ok\x1b[2J\x1b]0;pwned\x07 \rback\x00nul\x85nel\u2028ls\u202eevil\x9bcsi\x15 tab" + "\there" in md
    assert r"## 1. say\x1b[31m\nit" in md  # the heading stays one line
    assert "> line 1\n> line 2\\r\n> \n" in md
    assert "note:" not in md
    assert f"- note: {TINY_NOTE}" in render_markdown("run", Path("/b"), "/t", records, TINY_NOTE)
    assert escape_controls("naïve café 東京 🙂") == "naïve café 東京 🙂"  # ordinary text is left alone


# ---------------------------------------------------------------- the end-of-run summary


def _completed_run(tmp_path: Path, overrides: tuple[str, ...] = (), state: StageState = StageState.COMPLETED) -> Path:
    """A run directory as a finished tiny-cpu run leaves it (no model: the summary reads only the run dir)."""
    run_dir = make_run_dir(tmp_path / "work", overrides)
    paths = RunPaths(run_dir)
    records = tuple(
        StageRecord(i, name, f"scripts/0{i}-{name}.sbatch", f"local-{i}", state, exit_code="0:0", log=f"/l/{i}.out")
        for i, name in enumerate(STAGES, start=1)
    )
    write_manifest(run_dir, Manifest("tiny-cpu", str(run_dir), "h", "local", "t", "0", records))
    for d in (paths.adapter, paths.merged):
        d.mkdir()
    paths.evaluation.mkdir()
    records_json = '[{"prompt": "p?", "base": "b\\u001b[2J", "tuned": "t"}]'
    (paths.evaluation / "answers.json").write_text(records_json)
    (paths.evaluation / "answers.md").write_text("# Evaluation\n")
    return run_dir


def _outcome(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    ok = report.print_outcome(run_dir, read_manifest(run_dir))
    return ok, capsys.readouterr().out


def test_summary_points_to_readable_answers_curves_and_says_tiny_answers_are_noise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _completed_run(tmp_path)
    assert report.curves_line(run_dir) is None  # no curves yet: nothing to point at
    curves.write_curves(run_dir, [{"step": 1, "loss": 2.0, "learning_rate": 1e-3}])
    ok, out = _outcome(run_dir, capsys)
    assert ok
    assert f"readable answers:   {run_dir / 'eval' / 'answers.md'}" in out
    assert f"training curves:    {run_dir / 'train_curves.png'} (numbers: {run_dir / 'train_curves.csv'})" in out
    assert f"note: {TINY_NOTE}" in out
    assert "\x1b" not in out  # captured output is not a terminal: no colour, and the answer preview is escaped
    assert report.curves_line(run_dir) == f"training curves:    {run_dir / 'train_curves.png'} " + (
        f"(numbers: {run_dir / 'train_curves.csv'})"
    )


def test_summary_of_a_real_model_has_no_noise_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "some-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run_dir = _completed_run(tmp_path, (f"model.id={model}",))
    assert not report.is_tiny_run(run_dir)
    ok, out = _outcome(run_dir, capsys)
    assert ok and "readable answers:" in out and "noise" not in out and "training curves" not in out


def test_a_failed_summary_points_to_the_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _completed_run(tmp_path, state=StageState.FAILED)
    curves.write_curves(run_dir, [{"step": 1, "loss": float("nan")}])
    ok, out = _outcome(run_dir, capsys)
    assert not ok and "run failed at stage download (FAILED)" in out
    assert f"training curves:    {run_dir / 'train_curves.png'}" in out


def test_the_summary_is_coloured_at_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    run_dir = _completed_run(tmp_path)
    monkeypatch.setattr(sys, "stdout", tty := _Tty())
    assert report.print_outcome(run_dir, read_manifest(run_dir))
    out = tty.getvalue()
    assert "\x1b[32mrun completed:\x1b[0m" in out and "\x1b[32mCOMPLETED\x1b[0m" in out
    assert "\x1b[2J" not in out  # the answer preview stays escaped


# ---------------------------------------------------------------- colour


def _manifest(*states: StageState) -> Manifest:
    records = tuple(
        StageRecord(i, name, f"s{i}", f"j{i}", st, exit_code="0:0", log="/l")
        for i, (name, st) in enumerate(zip(STAGES, states, strict=False), start=1)
    )
    return Manifest("r", "/r", "h", "local", "t", "0", records)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_state_column_coloured_only_when_asked_and_columns_still_line_up() -> None:
    m = _manifest(StageState.COMPLETED, StageState.FAILED, StageState.RUNNING, StageState.PENDING)
    plain = report.status_table(m, colour=False)
    coloured = report.status_table(m, colour=True)
    assert "\x1b" not in plain
    assert "\x1b[32mCOMPLETED\x1b[0m" in coloured
    assert "\x1b[1;31mFAILED\x1b[0m" in coloured
    assert "\x1b[33mRUNNING\x1b[0m" in coloured
    assert "\x1b[34mPENDING\x1b[0m" in coloured
    assert ANSI.sub("", coloured) == plain  # codes wrap the cell, padding untouched


def test_colour_follows_the_terminal_and_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert report.colour_enabled(_Tty())
    assert not report.colour_enabled(io.StringIO())  # a pipe or a file
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert "\x1b[32m" in report.status_table(_manifest(StageState.COMPLETED))  # default: asks stdout
    monkeypatch.setenv("NO_COLOR", "1")
    assert not report.colour_enabled(_Tty())
    assert "\x1b" not in report.status_table(_manifest(StageState.COMPLETED))
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: an empty value does not count
    monkeypatch.setenv("TERM", "dumb")
    assert not report.colour_enabled(_Tty())
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert report.colour_enabled(io.StringIO())


def _status_in_a_pty(run_dir: Path, env: dict[str, str]) -> tuple[int, str]:
    """`hyperjob status` with its stdout on a real pseudo-terminal, as a person would run it."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hyperjob", "status", str(run_dir)], stdout=slave, stderr=subprocess.PIPE,
            env=env, timeout=120,
        )  # fmt: skip
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode()


def test_status_colours_at_a_terminal_only(tmp_path: Path) -> None:
    run_dir = _completed_run(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")} | {"TERM": "xterm"}
    code, tty_out = _status_in_a_pty(run_dir, env)
    assert code == 0 and "\x1b[32mCOMPLETED\x1b[0m" in tty_out, tty_out
    code, no_color = _status_in_a_pty(run_dir, env | {"NO_COLOR": "1"})
    assert code == 0 and "COMPLETED" in no_color and "\x1b[" not in no_color
    piped = hyperjob("status", str(run_dir), env={"TERM": "xterm", "NO_COLOR": "", "FORCE_COLOR": ""})
    assert piped.returncode == 0 and "COMPLETED" in piped.stdout and "\x1b" not in piped.stdout


# ---------------------------------------------------------------- curves


def _history(n: int = 40) -> list[dict[str, Any]]:
    """A Trainer log history: decreasing loss, warmup then decay lr, one entry without grad_norm, the final
    summary (no `loss`), and a non-finite loss, which the CSV keeps and the plot skips."""
    hist: list[dict[str, Any]] = []
    for step in range(1, n + 1):
        lr = 1e-3 * min(1.0, step / 5) * (n - step + 1) / n
        hist.append({"loss": 3.0 * math.exp(-step / 10) + 0.5, "learning_rate": lr, "grad_norm": 1.0 / step,
                     "epoch": step / n, "step": step})  # fmt: skip
    del hist[4]["grad_norm"]
    hist[7]["loss"] = float("nan")
    hist.append({"train_runtime": 1.0, "train_loss": 1.2, "epoch": 1.0, "step": n})
    return hist


def _steps(n: int) -> list[dict[str, Any]]:
    return [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3} for s in range(1, n + 1)]


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Decode our PNG (8-bit RGB, filter 0 on every row): width, height, raw RGB."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    width, height, depth, colour_type, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour_type) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == height * stride and all(raw[y * stride] == 0 for y in range(height))
    return width, height, b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))


def _where(rgb: bytes, width: int, colour: tuple[int, int, int]) -> list[tuple[int, int]]:
    target = bytes(colour)
    return [(i // 3 % width, i // 3 // width) for i in range(0, len(rgb), 3) if rgb[i : i + 3] == target]


def test_write_curves_csv_matches_the_log_history(tmp_path: Path) -> None:
    hist = _history()
    csv_path, png_path = curves.write_curves(tmp_path, hist)
    assert (csv_path, png_path) == (tmp_path / "train_curves.csv", tmp_path / "train_curves.png")
    rows = list(csv.DictReader(csv_path.open()))
    logged = [e for e in hist if "loss" in e]
    assert len(rows) == len(logged) == 40  # the final summary is not a row
    for row, entry in zip(rows, logged, strict=True):
        assert int(row["step"]) == entry["step"]
        for key in ("loss", "learning_rate", "grad_norm"):
            want = entry.get(key)
            got = float(row[key]) if row[key] else None
            assert got == want or (want is not None and math.isnan(want) and math.isnan(got or 0)), (key, row)
    assert rows[4]["grad_norm"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_curves.csv", "train_curves.png"]  # no temp files


def test_png_is_valid_and_draws_the_data(tmp_path: Path) -> None:
    _, png_path = curves.write_curves(tmp_path, _history())
    width, height, rgb = _png_pixels(png_path.read_bytes())
    assert (width, height) == (curves.WIDTH, curves.HEIGHT)
    assert sum(1 for i in range(0, len(rgb), 3) if rgb[i : i + 3] != b"\xff\xff\xff") > 2000  # not blank
    inside = [
        [(x, y) for x, y in _where(rgb, width, colour) if x0 < x < x1 and y0 < y < y1]  # the line, not the name
        for colour, (x0, y0, x1, y1) in zip((curves.LOSS_COLOUR, curves.LR_COLOUR), curves.panel_boxes(), strict=True)
    ]
    loss, lr = inside
    assert len(loss) > 300 and len(lr) > 300
    left, right = min(loss), max(loss)
    assert left[1] < right[1]  # the loss falls: its line starts high (small y) and ends low
    peak_x = min(lr, key=lambda p: p[1])[0]
    assert min(lr)[0] + 20 < peak_x < max(lr)[0] - 20  # lr warms up, then decays: its top is inside the run


def test_curves_of_an_empty_or_flat_history_are_still_valid(tmp_path: Path) -> None:
    for hist in ([], [{"step": 3, "loss": 1.0, "learning_rate": 0.0}], [{"step": s, "loss": 2.0} for s in range(5)]):
        _, png = curves.write_curves(tmp_path, hist)
        assert _png_pixels(png.read_bytes())[:2] == (curves.WIDTH, curves.HEIGHT)
        assert len(list(csv.reader((tmp_path / "train_curves.csv").open()))) == 1 + len(hist)


def test_many_steps_cost_bounded_by_the_canvas(tmp_path: Path) -> None:
    import time

    hist = [{"step": s, "loss": 1 + (s % 7) / 7, "learning_rate": 1e-4} for s in range(1, 50_001)]
    start = time.perf_counter()
    curves.write_curves(tmp_path, hist)
    assert time.perf_counter() - start < 5.0  # measured ~0.4 s; O(steps x height) drawing would take minutes
    assert len(list(csv.reader((tmp_path / "train_curves.csv").open()))) == 50_001


def test_callback_writes_on_rank_zero_only_and_spaces_rewrites(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    callback = curves.curves_callback(tmp_path)
    assert isinstance(callback, TrainerCallback)
    other_rank = SimpleNamespace(is_world_process_zero=False, log_history=_steps(3))
    callback.on_log(None, other_rank, None, logs={})
    callback.on_train_end(None, other_rank, None)
    assert not (tmp_path / "train_curves.csv").exists()
    state = SimpleNamespace(is_world_process_zero=True, log_history=_steps(1))
    callback.on_log(None, state, None, logs={})
    assert len((tmp_path / "train_curves.csv").read_text().splitlines()) == 2
    state.log_history = _steps(3)
    callback.on_log(None, state, None, logs={})  # within REWRITE_EVERY_S of the first: skipped
    assert len((tmp_path / "train_curves.csv").read_text().splitlines()) == 2
    callback.on_train_end(None, state, None)  # the end always writes
    assert len((tmp_path / "train_curves.csv").read_text().splitlines()) == 4


def test_callback_survives_an_unwritable_run_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "a-file").write_text("")
    missing = tmp_path / "a-file" / "run"  # cannot exist, even for root
    callback = curves.curves_callback(missing)
    state = SimpleNamespace(is_world_process_zero=True, log_history=_steps(2))
    callback.on_train_end(None, state, None)
    callback.on_train_end(None, state, None)  # training goes on; the warning is given once
    warnings = [r.getMessage() for r in caplog.records if "could not write the training curves" in r.getMessage()]
    assert len(warnings) == 1 and str(missing) in warnings[0]


@pytest.mark.slow
def test_curves_written_as_a_real_trainer_goes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    seen: list[int] = []

    class Look(TrainerCallback):  # runs after the curves callback: the file already has this step
        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rows = list(csv.DictReader((tmp_path / "train_curves.csv").open()))
            seen.append(int(rows[-1]["step"]) if rows else 0)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)  # fmt: skip
    ids = torch.randint(0, 64, (8, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    quiet = {"report_to": [], "disable_tqdm": True, "save_strategy": "no", "use_cpu": True}
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=4, logging_steps=1, per_device_train_batch_size=2, **quiet
    )
    trainer = Trainer(model=LlamaForCausalLM(cfg), args=args, train_dataset=data,
                      callbacks=[curves.curves_callback(tmp_path, every_s=0.0, max_share=1.0), Look()])  # fmt: skip
    trainer.train()
    assert seen[:4] == [1, 2, 3, 4]  # rewritten on every log event while training
    rows = list(csv.DictReader((tmp_path / "train_curves.csv").open()))
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(e["step"], e["loss"]) for e in logged]
    assert _png_pixels((tmp_path / "train_curves.png").read_bytes())[:2] == (curves.WIDTH, curves.HEIGHT)


# ---------------------------------------------------------------- merge progress label


def test_merge_progress_names_what_it_merges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyperjob.checkpoint.stream_merge import merge_streaming
    from hyperjob.checkpoint.stream_support import merge_label

    assert merge_label(Path("/r/adapter"), Path("/w/models/tiny-llama")) == "merge adapter into tiny-llama"
    assert merge_label(Path("/r/checkpoint-8"), Path("/m/x")) == "merge adapter checkpoint-8 into x"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)  # fmt: skip
    base = tmp_path / "models" / "my-base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    peft_model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merge_streaming(tmp_path / "adapter", base, tmp_path / "merged")
    err = capsys.readouterr().err
    assert "merge adapter into my-base: " in err and "(100%)" in err
    assert "merge merged" not in err


# ---------------------------------------------------------------- submit --wait


@pytest.mark.slow
def test_submit_wait_prints_each_state_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = config(tmp_path, stages=["download"])
    shutil.copytree(tiny_model_dir, tmp_path / "work" / "models" / "tiny-llama")  # download: already complete
    out = hyperjob("submit", str(cfg), "--scheduler", "local", "--wait", "--poll", "0.2")
    assert out.returncode == 0, out.stdout + out.stderr
    before_table = out.stdout.split("\n#   stage")[0]
    done = [line for line in before_table.splitlines() if "download" in line and "completed" in line.lower()]
    assert len(done) == 1, out.stdout
    assert out.stdout.count("\n#   stage") == 1, out.stdout
