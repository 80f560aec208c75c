"""Config loading: every bad value fails with its key named, secrets are never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hyperjob.config.load import ConfigError, apply_overrides, load_config, redact
from hyperjob.plan.planner import make_plan

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-cpu.yaml"


def write_config(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    data["workdir"] = str(tmp_path / "work")
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"backend": "tpu"}, "backend", "'tpu' is not a backend (allowed: cpu, cuda, neuron, torchneuron)"),
        ({"training__seq_len": 0}, "training.seq_len", "greater than 0"),
        ({"training__lr": 5}, "training.lr", "less than 1"),
        ({"training__micro_btach": 2}, "training.micro_btach", "unknown key; allowed keys here:"),
        ({"lora__r": -1}, "lora.r", "greater than 0"),
        ({"name": "bad name!"}, "name", "should match pattern"),
        ({"cluster__partition": "a b"}, "cluster.partition", "should match pattern"),
        ({"cluster__time": "forever"}, "cluster.time", "should match pattern"),
        ({"cluster__sbatch_extra": ["exclusive"]}, "cluster.sbatch_extra", "must start with '--'"),
        ({"stages": ["train", "download"]}, "stages", "out of order"),
        ({"stages": ["download", "compile", "train"]}, "stages", "stage 'compile' exists only for backend 'neuron'"),
        ({"stages": ["download", "finetune"]}, "stages", "unknown stage 'finetune' (allowed: download, compile,"),
        ({"dataset__path": "nope.jsonl"}, "dataset.path", "does not exist"),
        ({"model": None}, "model", "required key is missing"),
        ({"environment__env": {"1BAD": "x"}}, "environment.env", "must match"),
        ({"dataset__id": "x/y"}, "dataset", "exactly one of dataset.id"),
    ],
)
def test_bad_value_names_key(tmp_path: Path, changes: dict[str, object], key: str, fragment: str) -> None:
    """Checked when loading, or by the planner against the backend registry and the stage table (as every verb does)."""
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as exc:
        try:
            make_plan(load_config(path))
        except ConfigError as e:  # the planner's errors get the file named by their caller (the CLI)
            raise ConfigError(e.problems, e.source if e.source != "config" else str(path)) from None
    keys = [k for k, _ in exc.value.problems]
    assert key in keys, exc.value.problems
    assert fragment in str(exc.value)
    assert str(path) in exc.value.lines()[0]


def test_token_values_are_never_echoed(tmp_path: Path) -> None:
    secret = "hf_" + "A1b2C3d4E5f6G7h8"
    path = write_config(tmp_path, model__token=secret, model__token_env=secret)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert secret not in str(exc.value)
    assert "model.token" in str(exc.value)
    assert redact(f"x {secret} y") == "x hf_*** y"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY)
    assert cfg.workdir == (REPO / "work").resolve()
    assert cfg.dataset.path == REPO / "examples" / "data" / "dolly-tiny.jsonl"
    assert cfg.environment.python  # filled with this interpreter


def test_overrides_parse_yaml_values() -> None:
    out = apply_overrides({"training": {"max_steps": 1}}, ["training.max_steps=7", "lora.target_modules=[q_proj]"])
    assert out == {"training": {"max_steps": 7}, "lora": {"target_modules": ["q_proj"]}}
    with pytest.raises(ConfigError, match=r"--set nonsense: expected KEY=VALUE"):
        apply_overrides({}, ["nonsense"])


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nworkdir: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(path)


@pytest.mark.parametrize("example", ["tiny-cpu", "trainium-llama3-8b", "gpu-llama3-8b", "gpu-llama3-8b-longctx"])
def test_examples_validate(example: str) -> None:
    """Every example loads, plans, and says in its file exactly what the loaded config holds (no silent default)."""
    path = REPO / "examples" / f"{example}.yaml"
    cfg = load_config(path, check_inputs=False)
    plan = make_plan(cfg)
    assert plan.stages and plan.world_size >= 1
    written = yaml.safe_load(path.read_text())
    loaded = cfg.model_dump(mode="json")
    for section, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = loaded[section][key]
                if (section, key) in (("dataset", "path"), ("model", "token_file")):  # resolved against the file
                    assert Path(got) == (path.parent / value).resolve(), f"{section}.{key}"
                else:
                    assert got == (list(value) if isinstance(value, tuple) else value), f"{section}.{key}"
        elif section == "workdir":
            assert Path(loaded[section]) == (path.parent / values).resolve()
        else:
            assert loaded[section] == (list(values) if isinstance(values, list) else values), section
