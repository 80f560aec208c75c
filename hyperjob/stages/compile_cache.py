"""The Neuron compile cache's manifest: skip a compile whose graphs are already cached, catch one that made none.

A compile under `neuron_parallel_compile` takes 30-60 minutes, and upstream has both failure modes: the cache
is ignored and everything recompiles, or the compile "succeeds" having written no graph at all. So the compile
stage brackets it with this module:

    python -m hyperjob.stages.compile_cache --run-dir RUN check   # exit 0: nothing to compile; 10: compile
    python -m hyperjob.stages.compile_cache --run-dir RUN begin   # record the NEFFs present before the compile
    neuron_parallel_compile torchrun ...
    python -m hyperjob.stages.compile_cache --run-dir RUN finish  # the compile must have produced NEFFs

The manifest (`hyperjob-compiled.json` in the cache dir) maps the digest of a graph key (everything that
changes the compiled graphs) to the NEFF files that compile produced. Runs may share the cache, so updates
happen under an flock and are written atomically. Light: stdlib and hyperjob only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import write_json
from hyperjob.paths import RunPaths, base_model_dir, compile_cache_dir
from hyperjob.plan.planner import Plan, make_plan
from hyperjob.stages.common import StageError, run_stage

MANIFEST_NAME = "hyperjob-compiled.json"
NEEDS_COMPILE = 10
KEY_FILE = "key.json"
BEFORE_FILE = "neffs-before.json"

Entry = dict[str, Any]


# --- pure: the key and what differs -------------------------------------------------------------------------


def graph_key(cfg: HyperjobConfig, plan: Plan, model_config_sha256: str, neuronx_cc: str | None) -> dict[str, object]:
    """Exactly what changes the compiled graphs: any change must recompile, anything else must not.

    Data parallelism is in it because ZeRO-1 shards the optimizer state over the data-parallel ranks; LoRA alpha
    and dropout because they are constants and ops of the traced graph.
    """
    return {
        "neuronx_cc": neuronx_cc or "not installed",
        "tensor_parallel": plan.tensor,
        "pipeline_parallel": plan.pipeline,
        "data_parallel": plan.data,
        "kv_size_multiplier": plan.kv_size_multiplier,
        "seq_len": plan.seq_len,
        "micro_batch": plan.micro_batch,
        "gradient_checkpointing": cfg.training.gradient_checkpointing,
        "bf16": cfg.training.bf16,
        "model_config_sha256": model_config_sha256,
        "lora_target_modules": sorted(cfg.lora.target_modules),
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
    }


def key_digest(key: Mapping[str, object]) -> str:
    """16 hex chars of the sha256 of canonical JSON: the same key gives the same digest in every process."""
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _show(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: the prefix is enough to tell two apart
    return "none" if value is None else str(value)


def key_changes(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    """`field old -> new` for every field that differs, in the new key's order (fields only in `old` last)."""
    fields = [*new, *(f for f in old if f not in new)]
    return [
        f"{f} {_show(old[f]) if f in old else '(absent)'} -> {_show(new[f]) if f in new else '(absent)'}"
        for f in fields
        if f not in old or f not in new or old[f] != new[f]
    ]


def newest_entry(entries: Mapping[str, Entry]) -> Entry | None:
    """The most recently compiled entry (ISO UTC timestamps sort as strings)."""
    return max(entries.values(), key=lambda e: str(e.get("compiled_at", "")), default=None)


def why_compile(key: Mapping[str, object], entries: Mapping[str, Entry], missing: list[str]) -> str | None:
    """None when the graphs of `key` are all cached; else why a compile is needed. `missing`: the recorded
    NEFFs of this key's entry that are gone from the cache (ignored when there is no entry)."""
    entry = entries.get(key_digest(key))
    if entry is not None:
        if not missing:
            return None
        return f"{len(missing)} of {len(entry['neffs'])} graphs recorded for this key are missing from the cache"
    newest = newest_entry(entries)
    if newest is None:
        return "no compiled graphs for these shapes: nothing compiled into this cache yet"
    changes = key_changes(newest.get("key", {}), key)
    what = ", ".join(changes) if changes else "the key differs from every recorded one"
    return f"no compiled graphs for these shapes: {what} (vs the newest compile, by {newest.get('run_dir')})"


def merged_entry(key: Mapping[str, object], new: set[str], kept: set[str], run_dir: Path) -> Entry:
    return {
        "key": dict(key),
        "neffs": sorted(new | kept),
        "compiled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
    }


# --- side effects: hashing, scanning, the manifest ------------------------------------------------------------


def model_config_sha256(cfg: HyperjobConfig) -> str:
    """The base model's config.json decides the graphs' shapes (layers, hidden size, heads)."""
    path = base_model_dir(cfg) / "config.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise StageError(f"{path} does not exist: run the download stage first") from None
    except OSError as e:
        raise StageError(f"cannot read {path}: {e.strerror}") from None


def neuronx_cc_version() -> str | None:
    try:
        return metadata.version("neuronx-cc")
    except metadata.PackageNotFoundError:
        return None


def find_neffs(cache: Path) -> set[str]:
    """Relative paths of every compiled graph (`*.neff`) below the cache; a missing cache has none."""
    if not cache.is_dir():
        return set()
    return {p.relative_to(cache).as_posix() for p in cache.rglob("*.neff") if p.is_file()}


def missing_neffs(cache: Path, neffs: list[str]) -> list[str]:
    return [rel for rel in neffs if not (cache / rel).is_file()]


def read_manifest(cache: Path) -> dict[str, Entry]:
    """The manifest's entries; none when there is no manifest yet."""
    path = cache / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StageError(f"cannot read the compile manifest {path} ({e}): delete it to recompile everything") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise StageError(f"compile manifest {path} has no 'entries' mapping: delete it to recompile everything")
    return entries


@contextlib.contextmanager
def manifest_lock(cache: Path) -> Iterator[None]:
    """An flock on a sibling file: two runs finishing into one cache must not drop each other's entries."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{MANIFEST_NAME}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_manifest(cache: Path, entries: Mapping[str, Entry]) -> None:
    write_json(cache / MANIFEST_NAME, {"entries": dict(entries)})


def read_before(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(
            f"{path} does not exist: `compile_cache begin` was not run before the compile, so its new graphs "
            "cannot be told apart; run begin, the compile, then finish"
        ) from None
    except (OSError, ValueError) as e:
        raise StageError(f"cannot read {path} ({e}): run `compile_cache begin` and the compile again") from None
    return set(data.get("neffs", []))


# --- the commands -------------------------------------------------------------------------------------------


def current_key(cfg: HyperjobConfig) -> dict[str, object]:
    return graph_key(cfg, make_plan(cfg), model_config_sha256(cfg), neuronx_cc_version())


def check(paths: RunPaths, cfg: HyperjobConfig) -> int:
    """Exit 0 when every graph of this key is cached, NEEDS_COMPILE otherwise; one line says why."""
    key, cache = current_key(cfg), compile_cache_dir(cfg)
    write_json(paths.compile_output / KEY_FILE, key)
    digest, entries = key_digest(key), read_manifest(cache)
    entry = entries.get(digest)
    reason = why_compile(key, entries, missing_neffs(cache, entry["neffs"]) if entry else [])
    if reason is not None:
        print(f"compile needed (key {digest}): {reason}", flush=True)
        return NEEDS_COMPILE
    assert entry is not None
    print(
        f"nothing to compile: key {digest} was compiled at {entry['compiled_at']} by {entry['run_dir']}; "
        f"all {len(entry['neffs'])} graphs present in {cache}",
        flush=True,
    )
    return 0


def begin(paths: RunPaths, cfg: HyperjobConfig) -> int:
    """Record the NEFFs present before the compile, so finish can tell which ones it made."""
    cache = compile_cache_dir(cfg)
    before = find_neffs(cache)
    write_json(paths.compile_output / BEFORE_FILE, {"cache": str(cache), "neffs": sorted(before)})
    print(f"{len(before)} compiled graphs in {cache} before the compile", flush=True)
    return 0


def finish(paths: RunPaths, cfg: HyperjobConfig) -> int:
    """Record this compile's NEFFs under its key; a compile that made none (and has none cached) fails."""
    before = read_before(paths.compile_output / BEFORE_FILE)
    key, cache = current_key(cfg), compile_cache_dir(cfg)
    digest = key_digest(key)
    new = find_neffs(cache) - before
    with manifest_lock(cache):
        entries = read_manifest(cache)
        old = entries.get(digest)
        recorded = old["neffs"] if old else []
        gone = missing_neffs(cache, recorded)
        if not new and (old is None or gone):
            still = f"; {len(gone)} of {len(recorded)} graphs recorded for this key are still missing" if old else ""
            raise StageError(
                f"neuron_parallel_compile wrote no compiled graph (*.neff) into {cache}: the compile failed "
                f"silently{still}; see the messages above in this log (compiler errors, host out of memory, "
                "a --cache_dir in NEURON_CC_FLAGS other than this cache)"
            )
        entries[digest] = merged_entry(key, new, set(recorded) - set(gone), paths.run_dir)
        write_manifest(cache, entries)
    print(f"compiled {len(new)} new graphs into {cache} (key {digest})", flush=True)
    return 0


COMMANDS = {"check": check, "begin": begin, "finish": finish}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hyperjob.stages.compile_cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory holding config.yaml")
    parser.add_argument("command", choices=sorted(COMMANDS), help="check, begin or finish (see above)")
    args = parser.parse_args(argv)
    # The cache manifest, not the stage's completion marker, decides whether to compile (graphs can vanish from
    # the cache); check (nothing to compile) and finish (compiled) then mark the stage complete.
    mark = args.command != "begin"
    run_dir = ["--run-dir", str(args.run_dir)]
    return run_stage("compile", COMMANDS[args.command], run_dir, __doc__ or "", skip_done=False, mark=mark)


if __name__ == "__main__":
    raise SystemExit(main())
