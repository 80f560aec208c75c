"""Read a YAML config, apply `--set` overrides, resolve paths, validate.

Relative paths in a config are relative to the config file's directory, so a
config means the same thing whatever the current directory is.

YAML is read without YAML 1.1's base-60 numbers (YAML 1.2 dropped them too): `time: 12:00:00` is the text
"12:00:00", not the integer 43200. A `--set` value is read as YAML (numbers, booleans, [a, b] lists), except
that a number given for a text key stays the text typed: `--set cluster.time=30` is Slurm's "30" (minutes).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from hyperjob.config.models import HyperjobConfig
from hyperjob.config.secrets import SECRET_NAME, redact

__all__ = ["ConfigError", "load_config", "load_resolved", "redact"]


class ConfigError(ValueError):
    """A config problem: each entry is (dotted key, message). Never holds a secret value."""

    def __init__(self, problems: Iterable[tuple[str, str]], source: str = "config") -> None:
        self.problems = [(k, redact(m)) for k, m in problems]
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.source}: {key}: {msg}" if key else f"{self.source}: {msg}" for key, msg in self.problems]


SET_FORMS = "training.max_steps=50, cluster.time=12:00:00 or lora.target_modules=[q_proj,v_proj]"
_SHOWN_KEYS = 6  # keys listed when a section is given a single value
_NUMERIC_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _Loader(yaml.SafeLoader):
    """SafeLoader without base-60 numbers: a plain scalar with a colon is never an int or a float."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag: str = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and tag in _NUMERIC_TAGS and ":" in value:
            return "tag:yaml.org,2002:str"
        return tag


def load_yaml(text: str) -> Any:
    """Parse YAML the way configs are read (no base-60 numbers)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([("", f"cannot read {path}: {e.strerror}")], str(path)) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([("", f"invalid YAML{where}: {getattr(e, 'problem', e)}")], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", f"top level must be a mapping of keys, got {type(data).__name__}")], str(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML scalars/lists (a number for a text key: text)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not key or any(not part for part in parts):
            raise ConfigError([("", f"expected KEY=VALUE, e.g. {SET_FORMS}")], f"--set {item}")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError([("", f"{where} is a value, not a section: it has no key {parts[depth + 1]}")],
                                  f"--set {item}")  # fmt: skip
            node = child
        node[parts[-1]] = _override_value(raw, parts)
    return out


def _override_value(raw: str, parts: list[str]) -> Any:
    if not raw:
        return ""
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, (bool, int, float)) and _is_text_field(parts):
        return raw
    return value


def _is_text_field(parts: list[str]) -> bool:
    """Whether the config key at `parts` takes text (str or optional str) and nothing else."""
    model = _model_at(tuple(parts[:-1]))
    if model is None or parts[-1] not in model.model_fields:
        return False
    annotation = model.model_fields[parts[-1]].annotation
    kinds = set(get_args(annotation)) or {annotation}
    kinds.discard(type(None))
    return kinds == {str}


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _is_local_model(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..")


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths absolute against the config's directory (before validation)."""

    def absolute(value: Any, key: str) -> Any:
        if not isinstance(value, str) or not value:
            return value
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # `~name/...` for a user this machine does not know
            user = value[1:].split("/", 1)[0]
            problems.append((key, f"{value!r}: cannot expand {'~' + user!r}: no such user on this machine"))
            return value
        return str(p if p.is_absolute() else (base / p).resolve())

    problems: list[tuple[str, str]] = []
    out = _deep_copy(data)
    if "workdir" in out:
        out["workdir"] = absolute(out["workdir"], "workdir")
    for section, key in (("dataset", "path"), ("model", "token_file")):
        sec = out.get(section)
        if isinstance(sec, dict) and sec.get(key) is not None:
            sec[key] = absolute(sec[key], f"{section}.{key}")
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("id"), str) and _is_local_model(model["id"]):
        model["id"] = absolute(model["id"], "model.id")
    env = out.get("environment")
    for key in ("python", "train_python"):
        if isinstance(env, dict) and isinstance(env.get(key), str) and env[key].startswith(("./", "../")):
            env[key] = absolute(env[key], f"environment.{key}")
    own = out.get("stage_resources")
    for stage, res in own.items() if isinstance(own, dict) else ():
        if isinstance(res, dict) and isinstance(res.get("python"), str) and res["python"].startswith(("./", "../")):
            res["python"] = absolute(res["python"], f"stage_resources.{stage}.python")
    if problems:
        raise ConfigError(problems)
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model at a path of field names (() is the whole config), or None if it is not a section."""
    model: type[BaseModel] | None = HyperjobConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed at the parent of `loc`, for 'unknown key' messages."""
    model = _model_at(loc[:-1])
    return sorted(model.model_fields) if model is not None else []


def _section_message(key: str, section: type[BaseModel]) -> str:
    fields = list(section.model_fields)
    more = len(fields) - _SHOWN_KEYS
    shown = ", ".join(fields[:_SHOWN_KEYS]) + (f" and {more} more" if more > 0 else "")
    return f"a section, not a value: set its keys, e.g. {key}.{fields[0]} (its keys: {shown})"


def as_text(value: Any) -> str:
    """A value as a message shows it: lists as `[a, b]`, not Python's `['a', 'b']`; text quoted."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(v if isinstance(v, str) else as_text(v) for v in value) + "]"
    return repr(value)


def _message(e: Any, loc: tuple[int | str, ...], key: str) -> str:
    msg = str(e["msg"]).removeprefix("Value error, ")
    value = e.get("input")
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        return "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    if e["type"] == "missing":
        return "required key is missing"
    if e["type"] == "model_type" and (section := _model_at(loc)) is not None and not isinstance(value, dict):
        return _section_message(key, section)
    if e["type"] == "string_type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.rsplit(".", 1)[-1] == "time":
            return (f"{value} is a number, but a Slurm time limit is text: quote it, e.g. '30' (minutes to Slurm), "
                    "'12:00:00' or '2-00:00:00' (days-hours:minutes:seconds)")  # fmt: skip
        return f"{value} is a number, but this key takes text: quote it ('{value}')"
    if e["type"] in ("list_type", "tuple_type") and not isinstance(value, (dict, list)):
        shown = "***" if SECRET_NAME.search(key) else as_text(value)
        return f"{shown} is not allowed: expected a list, written [a, b]"
    if "input" in e and not isinstance(value, (dict, list)):
        shown = "***" if SECRET_NAME.search(key) else as_text(value)
        return f"{shown} is not allowed: {msg}"
    return msg


def format_validation_error(err: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc)
        problems.append((key, _message(e, loc, key)))
    return problems


def validate(data: Mapping[str, Any], source: str = "config") -> HyperjobConfig:
    try:
        return HyperjobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err), source) from None


def check_local_inputs(cfg: HyperjobConfig) -> None:
    """Inputs that must already exist on the (shared) filesystem."""
    problems = []
    if cfg.dataset.path is not None and not cfg.dataset.path.is_file():
        problems.append(("dataset.path", f"{cfg.dataset.path} does not exist or is not a file"))
    if _is_local_model(cfg.model.id) and not Path(cfg.model.id).is_dir():
        problems.append(("model.id", f"{cfg.model.id} looks like a local path but is not a directory"))
    if cfg.model.token_file is not None and not cfg.model.token_file.is_file():
        problems.append(("model.token_file", f"{cfg.model.token_file} does not exist"))
    if problems:
        raise ConfigError(problems)


def load_config(path: Path | str, overrides: Iterable[str] = (), *, check_inputs: bool = True) -> HyperjobConfig:
    """Load, override, resolve and validate a config; fill run-time defaults (Python interpreter)."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides)
    try:
        data = _resolve_paths(data, path.resolve().parent)
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    cfg = validate(data, str(path))
    if cfg.environment.python is None:
        env = cfg.environment.model_copy(update={"python": sys.executable})
        cfg = cfg.model_copy(update={"environment": env})
    if check_inputs:
        try:
            check_local_inputs(cfg)
        except ConfigError as e:
            raise ConfigError(e.problems, str(path)) from None
    return cfg


def load_resolved(path: Path | str) -> HyperjobConfig:
    """Load a run directory's config.yaml, which is already resolved (absolute paths)."""
    path = Path(path)
    return validate(read_yaml(path), str(path))


class _Dumper(yaml.SafeDumper):
    """PyYAML writes NEL (U+0085) raw inside single quotes and reads it back as a space; in double quotes it is
    escaped, so such strings are written double-quoted and every value round-trips exactly."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\x85" in value else None)


_Dumper.add_representer(str, _represent_str)


def dump_config(cfg: HyperjobConfig) -> str:
    data = cfg.model_dump(mode="json", exclude_none=False)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def config_hash(cfg: HyperjobConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]
