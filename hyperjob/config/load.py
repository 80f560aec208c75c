"""Read a YAML config, apply `--set` overrides, resolve paths, validate.

Relative paths in a config are relative to the config file's directory, so a
config means the same thing whatever the current directory is.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([("", f"cannot read {path}: {e.strerror}")], str(path)) from None
    try:
        data = yaml.safe_load(text)
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
    """Apply `key.sub=value` overrides; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([("", f"--set {item!r}: expected KEY.SUB=VALUE")], "--set")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([(key, f"cannot set inside {part!r}, which is not a mapping")], "--set")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return out


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
    if problems:
        raise ConfigError(problems)
    return out


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed at the parent of `loc`, for 'unknown key' messages."""
    model: type[BaseModel] | None = HyperjobConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def format_validation_error(err: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc)
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            shown = "***" if SECRET_NAME.search(key) else repr(e["input"])
            msg = f"{shown} is not allowed: {msg}"
        problems.append((key, msg))
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
