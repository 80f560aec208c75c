"""hyperjob.config unit by unit, through its public functions: reading YAML, `--set` overrides, path resolution
against the config file's directory, validation messages, local-input checks, and the dumped (resolved) config.

Real files under tmp_path, in-process calls (the CLI tests reach the same code only through a subprocess). Written
for issue 12 (mutation score).
"""

from __future__ import annotations

import hashlib
import locale
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperjob.config.load import (
    ConfigError,
    apply_overrides,
    check_local_inputs,
    config_hash,
    dump_config,
    load_config,
    load_resolved,
    read_yaml,
    validate,
)
from hyperjob.config.models import ClusterSection, HyperjobConfig

BASE: dict[str, Any] = {
    "name": "unit",
    "workdir": "/shared/work",
    "backend": "cpu",
    "model": {"id": "tiny-llama"},
    "dataset": {"id": "databricks/databricks-dolly-15k"},
}


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        validate(data, "unit.yaml")
    assert info.value.source == "unit.yaml"
    return info.value.problems


# --- ConfigError and reading YAML -----------------------------------------------------------------


def test_config_error_lines() -> None:
    err = ConfigError([("a.b", "bad"), ("", "the whole file"), ("m", "saw hf_abcdefghij1234 here")], "c.yaml")
    assert err.lines() == ["c.yaml: a.b: bad", "c.yaml: the whole file", "c.yaml: m: saw hf_*** here"]
    assert str(err) == "c.yaml: a.b: bad\nc.yaml: the whole file\nc.yaml: m: saw hf_*** here"
    assert ConfigError([("k", "v")]).lines() == ["config: k: v"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nbad: [1, 2\n", "invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
        ("a: b: c\n", "invalid YAML at line 1, column 5: mapping values are not allowed here"),
        ("- 1\n- 2\n", "top level must be a mapping of keys, got list"),
        ("just text\n", "top level must be a mapping of keys, got str"),
    ],
)
def test_read_yaml_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert info.value.lines() == [f"{path}: {message}"]


def test_read_yaml_error_without_a_position(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "name: \x07\n")  # the YAML reader refuses it before parsing: no line/column
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}: invalid YAML: unacceptable character #x0007: special characters are not allowed")


def test_config_files_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """Jobs often run with LANG=C: a config (or a run's config.yaml) with non-ASCII prompts must still load."""
    path = tmp_path / "c.yaml"
    path.write_bytes("evaluate: {prompts: [\"Qu'est-ce que l'été ?\"]}\n".encode())
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        data = read_yaml(path)
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert data == {"evaluate": {"prompts": ["Qu'est-ce que l'été ?"]}}


def test_read_yaml_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        read_yaml(missing)
    assert info.value.lines() == [f"{missing}: cannot read {missing}: No such file or directory"]
    assert read_yaml(write(tmp_path / "empty.yaml", "")) == {}
    assert read_yaml(write(tmp_path / "null.yaml", "null\n")) == {}
    assert read_yaml(write(tmp_path / "ok.yaml", "name: été\nn: 3\n")) == {"name": "été", "n": 3}


# --- --set overrides ------------------------------------------------------------------------------


def test_apply_overrides() -> None:
    data: dict[str, Any] = {"cluster": {"nodes": 1}, "evaluate": {"prompts": ["p"]}, "name": "x"}
    out = apply_overrides(
        data,
        [
            "cluster.nodes=2",
            "cluster.exclusive=false",
            "training.max_steps=50",
            "lora.target_modules=[q_proj, v_proj]",
            "model.revision=[unclosed",  # not valid YAML: kept as the text given
            "environment.python=",  # empty: an empty string, not null
            "stages=null",
            "merge.max_memory=2GB=x",  # only the first '=' separates key and value
            "environment.env.GREETING=[not yaml",
        ],
    )
    assert out == {
        "cluster": {"nodes": 2, "exclusive": False},
        "evaluate": {"prompts": ["p"]},
        "name": "x",
        "training": {"max_steps": 50},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "model": {"revision": "[unclosed"},
        "environment": {"python": "", "env": {"GREETING": "[not yaml"}},
        "stages": None,
        "merge": {"max_memory": "2GB=x"},
    }
    out["evaluate"]["prompts"].append("added")
    assert data == {"cluster": {"nodes": 1}, "evaluate": {"prompts": ["p"]}, "name": "x"}  # the input is not touched


@pytest.mark.parametrize("item", ["noequals", "=v", "a..b=1", "a.=1", ".a=1"])
def test_apply_overrides_rejects_malformed_items(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [item])
    assert str(info.value) == (
        f"--set {item}: expected KEY=VALUE, e.g. training.max_steps=50, cluster.time=12:00:00 or "
        "lora.target_modules=[q_proj,v_proj]"
    )


def test_apply_overrides_cannot_set_inside_a_value() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"name": "x"}, ["name.sub.deeper=1"])
    assert str(info.value) == "--set name.sub.deeper=1: name is a value, not a section: it has no key sub"


# --- paths resolved against the config file -------------------------------------------------------


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = tmp_path / "configs"
    for d in ("model", "venv/bin"):
        (cfg_dir / d).mkdir(parents=True)
    write(cfg_dir / "data" / "d.jsonl", "{}\n")
    write(cfg_dir / "secret" / "tok", "x\n")
    data = {
        **BASE,
        "workdir": "../work",
        "model": {"id": "./model", "token_file": "secret/tok", "token_env": None},
        "dataset": {"path": "data/d.jsonl"},
        "environment": {"python": "./venv/bin/python", "train_python": "../py/train"},
    }
    path = write(cfg_dir / "c.yaml", data)
    monkeypatch.chdir(tmp_path / "configs" / "model")  # the current directory does not matter
    cfg = load_config(path)
    assert cfg.workdir == tmp_path / "work"
    assert cfg.dataset.path == cfg_dir / "data" / "d.jsonl"
    assert cfg.model.id == str(cfg_dir / "model")
    assert cfg.model.token_file == cfg_dir / "secret" / "tok"
    assert cfg.environment.python == str(cfg_dir / "venv" / "bin" / "python")
    assert cfg.environment.train_python == str(tmp_path / "py" / "train")


@pytest.mark.parametrize(
    ("model_id", "resolved"),
    [
        (".", "{dir}"),
        ("..", "{parent}"),
        ("./m", "{dir}/m"),
        ("../m", "{parent}/m"),
        ("~/m", "{home}/m"),
        ("/abs/m", "/abs/m"),
    ],
)
def test_local_model_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_id: str, resolved: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg_dir = tmp_path / "configs"
    path = write(cfg_dir / "c.yaml", {**BASE, "model": {"id": model_id}})
    expected = resolved.format(dir=cfg_dir, parent=tmp_path, home=tmp_path / "home")
    assert load_config(path, check_inputs=False).model.id == expected
    if not Path(expected).is_dir():
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.lines() == [f"{path}: model.id: {expected} looks like a local path but is not a directory"]


@pytest.mark.parametrize("model_id", ["meta-llama/Meta-Llama-3-8B", "tiny-llama", "org/./x"])
def test_hub_model_ids_are_left_alone(tmp_path: Path, model_id: str) -> None:
    path = write(tmp_path / "c.yaml", {**BASE, "model": {"id": model_id}})
    assert load_config(path).model.id == model_id


def test_bare_interpreter_names_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = {**BASE, "workdir": "~/w", "environment": {"python": "python3", "train_python": "/opt/neuron/bin/python"}}
    cfg = load_config(write(tmp_path / "c.yaml", data))
    assert cfg.workdir == tmp_path / "home" / "w"
    assert (cfg.environment.python, cfg.environment.train_python) == ("python3", "/opt/neuron/bin/python")


def test_absolute_paths_are_kept_as_given(tmp_path: Path) -> None:
    """A shared filesystem is often reached through a symlink (/shared -> /fsx/...): absolute paths stay as written."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cfg = load_config(write(tmp_path / "c.yaml", {**BASE, "workdir": str(tmp_path / "link" / "work")}))
    assert cfg.workdir == tmp_path / "link" / "work"


def test_non_string_paths_are_left_to_validation(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {**BASE, "workdir": 5})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines() == [
        f"{path}: workdir: 5 is not allowed: Input is not a valid path for <class 'pathlib.Path'>"
    ]
    with pytest.raises(ConfigError) as info:
        validate({**BASE, "workdir": 5})
    assert info.value.source == "config"


def test_unknown_users_home_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        **BASE,
        "workdir": "~nosuchuser4242/w",
        "dataset": {"path": "~nosuchuser4242/data/d.jsonl"},
        "model": {"id": "~nosuchuser4242"},
    }
    path = write(tmp_path / "c.yaml", data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("c.yaml")
    why = "cannot expand '~nosuchuser4242': no such user on this machine"
    assert info.value.lines() == [
        f"c.yaml: workdir: '~nosuchuser4242/w': {why}",
        f"c.yaml: dataset.path: '~nosuchuser4242/data/d.jsonl': {why}",
        f"c.yaml: model.id: '~nosuchuser4242': {why}",
    ]
    assert path.exists()


# --- validation messages --------------------------------------------------------------------------


def test_unknown_keys_list_the_allowed_ones() -> None:
    assert problems({**BASE, "colour": 1}) == [
        ("colour", "unknown key; allowed keys here: " + ", ".join(sorted(HyperjobConfig.model_fields)))
    ]
    assert problems({**BASE, "cluster": {"colour": 1}}) == [
        ("cluster.colour", "unknown key; allowed keys here: " + ", ".join(sorted(ClusterSection.model_fields)))
    ]
    assert "partition" in ClusterSection.model_fields and "workdir" in HyperjobConfig.model_fields


def test_validation_messages() -> None:
    assert problems({k: v for k, v in BASE.items() if k != "name"}) == [("name", "required key is missing")]
    assert problems({**BASE, "cluster": {"nodes": "abc"}}) == [
        ("cluster.nodes", "'abc' is not allowed: Input should be a valid integer, unable to parse string as an integer")
    ]
    assert problems({**BASE, "cluster": {"nodes": {"a": 1}}}) == [("cluster.nodes", "Input should be a valid integer")]
    assert problems({**BASE, "stages": []}) == [("stages", "stages must name at least one stage")]
    secret = problems({**BASE, "model": {"id": "tiny-llama", "token_env": "hf_abcdefghijkl-not-a-name"}})
    assert secret == [
        ("model.token_env", "*** is not allowed: String should match pattern '^[A-Za-z_][A-Za-z0-9_]{0,127}$'")
    ]


def test_control_characters_only_in_free_text() -> None:
    ok = validate(
        {**BASE, "evaluate": {"prompts": ["line one\nline two"]}, "environment": {"env": {"GREETING": "a\tb"}}}
    )
    assert ok.evaluate.prompts == ("line one\nline two",) and ok.environment.env == {"GREETING": "a\tb"}
    assert problems({**BASE, "dataset": {"id": "d", "split": "a\tb"}}) == [
        ("", "dataset.split: control characters (newline, tab, NUL...) are not allowed in this value")
    ]
    assert problems({**BASE, "lora": {"target_modules": ["q_proj", "v\n"]}}) == [
        ("", "lora.target_modules: control characters (newline, tab, NUL...) are not allowed in this value")
    ]


# --- inputs on disk, the loaded config, the dumped config -----------------------------------------


def test_check_local_inputs_reports_every_missing_input(tmp_path: Path) -> None:
    cfg = validate(
        {
            **BASE,
            "model": {"id": str(tmp_path / "model"), "token_file": str(tmp_path / "tok")},
            "dataset": {"path": str(tmp_path / "d.jsonl")},
        }
    )
    with pytest.raises(ConfigError) as info:
        check_local_inputs(cfg)
    assert info.value.problems == [
        ("dataset.path", f"{tmp_path / 'd.jsonl'} does not exist or is not a file"),
        ("model.id", f"{tmp_path / 'model'} looks like a local path but is not a directory"),
        ("model.token_file", f"{tmp_path / 'tok'} does not exist"),
    ]
    (tmp_path / "model").mkdir()
    (tmp_path / "tok").write_text("x")
    (tmp_path / "d.jsonl").write_text("{}\n")
    check_local_inputs(cfg)


def test_load_config_fills_the_interpreter_and_checks_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {**BASE, "dataset": {"path": "missing.jsonl"}}
    path = write(tmp_path / "c.yaml", data)
    assert load_config(path, check_inputs=False).environment.python == sys.executable
    pinned = load_config(path, ["environment.python=/opt/venv/bin/python"], check_inputs=False)
    assert pinned.environment.python == "/opt/venv/bin/python"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("c.yaml")
    assert info.value.lines() == [f"c.yaml: dataset.path: {tmp_path / 'missing.jsonl'} does not exist or is not a file"]
    with pytest.raises(ConfigError) as info:
        load_config("c.yaml", ["cluster.nodes=0"], check_inputs=False)
    assert info.value.lines() == ["c.yaml: cluster.nodes: 0 is not allowed: Input should be greater than 0"]


def test_dump_and_load_resolved_round_trip(tmp_path: Path) -> None:
    cfg = validate({**BASE, "evaluate": {"prompts": ["Qu'est-ce que l'été ?"]}})
    text = dump_config(cfg)
    assert list(yaml.safe_load(text)) == list(HyperjobConfig.model_fields)  # the models' order, not sorted
    assert "\n  partition: null\n" in text  # unset values are written, so the file shows every key
    assert "Qu'est-ce que l'été ?" in text  # readable, not \xe9 escapes
    assert yaml.safe_load(text)["workdir"] == "/shared/work"
    path = write(tmp_path / "config.yaml", text)
    assert load_resolved(path) == cfg
    write(path, {**BASE, "cluster": {"nodes": 0}})
    with pytest.raises(ConfigError) as info:
        load_resolved(path)
    assert info.value.source == str(path)


def test_config_hash() -> None:
    cfg = validate(BASE)
    digest = config_hash(cfg)
    assert digest == hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert config_hash(validate(BASE)) == digest
    assert config_hash(validate({**BASE, "cluster": {"nodes": 2}})) != digest
