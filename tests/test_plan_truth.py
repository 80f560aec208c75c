"""plan, render and submit --dry-run say the truth a real submit (or the train stage) would say, before anything runs:
the backend's warnings, a missing local dataset, rows that do not fit dataset.format (issue 16, point 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hyperjob.cli.main import main
from hyperjob.plan.inputs import SAMPLE_ROWS

REPO = Path(__file__).resolve().parent.parent
TRN = REPO / "examples" / "trainium-llama3-8b.yaml"
TINY = REPO / "examples" / "tiny-cpu.yaml"
DOLLY = REPO / "examples" / "data" / "dolly-tiny.jsonl"
WARNING = "hyperjob: warning: "


def tiny_config(tmp_path: Path, data: Path | str = DOLLY, fmt: str = "dolly") -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["workdir"] = str(tmp_path / "work")
    cfg["dataset"] = {"path": str(data), "format": fmt}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def dolly_rows(n: int) -> list[str]:
    return [json.dumps({"instruction": f"q{i}", "context": "", "response": f"a{i}"}) for i in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- warnings: one list, said by every verb -----------------------------------------------------------------------

NEURON_SETS = ["--set", "training.packing=true"]  # on neuron: the packing warning besides the unbuilt-venv one


@pytest.mark.parametrize("verb", ["plan", "render", "dry-run"])
def test_every_verb_prints_the_warnings_a_real_submit_prints(
    tmp_path: Path, verb: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = [
        *NEURON_SETS,
        "--set",
        f"workdir={tmp_path / 'work'}",
        "--set",
        f"environment.python={tmp_path}/v/bin/python",
    ]
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))  # the real submit stops at "sbatch is not on PATH", after its warnings
    assert main(["submit", str(TRN), "--scheduler", "slurm", *sets]) == 2
    real = [line for line in capsys.readouterr().err.splitlines() if line.startswith(WARNING)]
    assert len(real) == 2 and f"{tmp_path}/v is not a Neuron environment built by this hyperjob" in real[1]
    assert "training.packing concatenates samples" in real[0]

    argv = {
        "plan": ["plan", str(TRN)],
        "render": ["render", str(TRN), "--out", str(tmp_path / "r")],
        "dry-run": ["submit", str(TRN), "--dry-run"],
    }[verb]
    code, _, err = run([*argv, *sets], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith(WARNING)] == real


def test_plan_json_carries_the_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["plan", str(TRN), "--json", *NEURON_SETS], capsys)
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert len(warnings) == 2
    assert [WARNING + w for w in warnings] == err.splitlines()


def test_a_backend_without_warnings_prints_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plan", str(tiny_config(tmp_path))], capsys)
    assert (code, err) == (0, "")


# --- a missing local dataset is an error everywhere ----------------------------------------------------------------


@pytest.mark.parametrize("verb", ["plan", "render", "dry-run"])
def test_a_missing_dataset_file_fails_every_verb(tmp_path: Path, verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "nope.jsonl")
    argv = {"plan": ["plan"], "render": ["render", "--out", str(tmp_path / "r")], "dry-run": ["submit", "--dry-run"]}
    code, out, err = run([*argv[verb], str(cfg)], capsys)
    assert code == 2
    assert err == f"hyperjob: error: {cfg}: dataset.path: {tmp_path / 'nope.jsonl'} does not exist or is not a file\n"
    assert out == "" and not (tmp_path / "r").exists() and not (tmp_path / "work").exists()


# --- the first rows are checked against dataset.format with the train stage's validator ----------------------------


def test_chat_format_on_dolly_rows_fails_in_plan_naming_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, fmt="chat")
    code, _, err = run(["plan", str(cfg)], capsys)
    assert code == 2
    assert err == (
        f"hyperjob: error: {cfg}: dataset.format: 'chat' does not fit {DOLLY}:1: field 'messages' must be a "
        "non-empty list of {role, content} objects (the row's keys: category, context, instruction, response; "
        "it fits dataset.format 'dolly')\n"
    )


def test_submit_refuses_rows_that_do_not_fit_before_writing_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, fmt="text")
    code, _, err = run(["submit", str(cfg), "--dry-run"], capsys)
    assert code == 2 and f"{DOLLY}:1: missing field 'text'" in err
    assert not (tmp_path / "work").exists()


def test_the_bad_row_is_named_by_its_line_blank_lines_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = json.dumps({"instruction": "q", "context": ""})  # no response
    data = write_lines(tmp_path / "d.jsonl", ["", *dolly_rows(3), "", bad])
    code, _, err = run(["plan", str(tiny_config(tmp_path, data))], capsys)
    assert code == 2
    assert f"dataset.format: 'dolly' does not fit {data}:6: missing field 'response' (the row's keys: context, " in err


def test_only_the_first_rows_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad row past the sample is the train stage's to find: plan stays instant on a large file."""
    lines = dolly_rows(SAMPLE_ROWS)
    data = write_lines(tmp_path / "d.jsonl", [*lines, "not json"])
    assert run(["plan", str(tiny_config(tmp_path, data))], capsys)[0] == 0
    data = write_lines(tmp_path / "d.jsonl", [*lines[:-1], "not json"])
    code, _, err = run(["plan", str(tiny_config(tmp_path, data))], capsys)
    assert code == 2 and f"dataset.path: {data}:{SAMPLE_ROWS}: invalid JSON: Expecting value (column 1)" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "{data}: no rows (the train stage needs at least one JSON line)"),
        (b"\n  \n", "{data}: no rows (the train stage needs at least one JSON line)"),
        (b'{"instruction": "q"\n', "{data}:1: invalid JSON: Expecting ',' delimiter (column 20)"),
        (b'{"text": "caf\xe9"}\n', "{data}:1: not UTF-8 text (invalid continuation byte at byte 13 of the line)"),
        (b"[1, 2]\n", "{data}:1: expected a JSON object, got list"),
    ],
)
def test_unreadable_files_fail_in_plan(
    tmp_path: Path, content: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    code, _, err = run(["plan", str(tiny_config(tmp_path, data))], capsys)
    assert code == 2
    assert message.format(data=data) in err and len(err.splitlines()) == 1


def test_a_hub_dataset_is_not_read_at_plan_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plan", str(TRN), "--set", "dataset.format=chat"], capsys)
    assert code == 0, err


def test_plan_checks_rows_without_importing_torch(tmp_path: Path) -> None:
    """The row check runs the train stage's validator: importing it must stay light."""
    cfg = tiny_config(tmp_path, fmt="chat")
    code = (
        "import sys\nfrom hyperjob.cli.main import main\n"
        f"assert main(['plan', {str(cfg)!r}]) == 2\n"
        "assert 'hyperjob.stages.data' in sys.modules\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'boto3', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
