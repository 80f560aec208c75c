"""Find and check an optimum-neuron 0.4.x tensor-parallel checkpoint before anything is consolidated.

Layouts (see /work/shared/reference/neuron-checkpoints.md): LoRA in `checkpoint-N/adapter_<name>/adapter_shards/`,
full fine-tuning in `checkpoint-N/shards/`; each holds `done`, `mp_metadata_pp_rank_<p>.json` and
`model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt` (+ `.info.pt` and `.tensors/` with xser). `validate` checks everything
that can be checked without reading tensor data, so a broken checkpoint fails before any output is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hyperjob.checkpoint.errors import CheckpointError
from hyperjob.checkpoint.xser import (
    IndexEntry,
    PlainRankReader,
    TensorRef,
    check_tensor_file,
    info_file,
    is_xser,
    load_tensor,
    read_rank_index,
    tensor_file,
)

__all__ = ["ShardedCheckpoint", "StageMetadata", "resolve_checkpoint", "validate"]

_RANK_FILE_RE = re.compile(r"^dp_rank_(\d+)_tp_rank_(\d+)_pp_rank_(\d+)\.pt$")
_METADATA_RE = re.compile(r"^mp_metadata_pp_rank_(\d+)\.json$")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_MAX_PROBLEMS = 20


@dataclass
class StageMetadata:
    """`mp_metadata_pp_rank_<p>.json`: partition info of every parameter of the stage and the transformation specs."""

    path: Path
    parameters: dict[str, dict[str, Any]]
    specs: list[tuple[str, str, dict[str, Any]]]  # (module fully qualified name, spec class name, spec fields)


@dataclass
class ShardedCheckpoint:
    """A located checkpoint: what `resolve_checkpoint` found; `validate` says whether it is complete."""

    shards_dir: Path
    kind: Literal["lora", "full"]
    xser: bool
    tp_size: int
    pp_size: int
    adapter_name: str | None
    stages: dict[int, StageMetadata]
    adapter_config: dict[str, Any] | None = None
    adapter_config_path: Path | None = None
    model_dir: Path | None = None  # holds config.json / tokenizer files for a full checkpoint
    tied_embeddings: bool = False  # config.json tie_word_embeddings: lm_head.weight is saved but not in metadata
    notes: list[str] = field(default_factory=list)
    _indexes: dict[tuple[int, int], dict[str, IndexEntry]] = field(default_factory=dict, repr=False)
    _plain: PlainRankReader = field(default_factory=PlainRankReader, repr=False)

    def rank_file(self, tp: int, pp: int) -> Path:
        return self.shards_dir / "model" / f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"

    def index(self, tp: int, pp: int) -> dict[str, IndexEntry]:
        """Names -> index entries of one rank file, read once; shapes filled from the tensor files when an xser
        rank file has no `.info.pt` (neuronx-distributed <= 0.6)."""
        if (tp, pp) not in self._indexes:
            rank_file = self.rank_file(tp, pp)
            index = read_rank_index(rank_file)
            for name, entry in index.items():
                if isinstance(entry, TensorRef) and entry.shape is None:
                    t = load_tensor(rank_file, name, entry)
                    index[name] = TensorRef(entry.tid, tuple(t.shape), t.dtype)
            self._indexes[(tp, pp)] = index
        return self._indexes[(tp, pp)]

    def load(self, tp: int, pp: int, name: str) -> Any:
        """One tensor of one rank (only that tensor's data is read)."""
        return load_tensor(self.rank_file(tp, pp), name, self.index(tp, pp).get(name), self._plain)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def parse_metadata(path: Path) -> StageMetadata:
    data = _read_json(path)
    params = data.get("parameters") if isinstance(data, dict) else None
    spec_groups = data.get("model_weight_transformation_specs", []) if isinstance(data, dict) else None
    if not isinstance(params, dict) or not isinstance(spec_groups, list):
        raise CheckpointError(f"{path}: expected 'parameters' and 'model_weight_transformation_specs'")
    specs: list[tuple[str, str, dict[str, Any]]] = []
    for group in spec_groups:
        try:
            module = group["module_fully_qualified_name"]
            specs.extend((module, cls, dict(fields)) for cls, fields in group["specs"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed transformation spec {str(group)[:200]}") from None
    return StageMetadata(path, params, specs)


def _legacy_error(path: Path, what: str) -> CheckpointError:
    if what == "tp_rank_dirs":
        return CheckpointError(
            f"{path}: legacy optimum-neuron 0.0.x layout (tensor_parallel_shards/tp_rank_XX_pp_rank_YY); hyperjob "
            "reads the 0.4.x layout only. Consolidate it with `optimum-cli neuron consolidate` from the "
            "optimum-neuron version that wrote it (on a Neuron machine), or retrain with optimum-neuron 0.4.x."
        )
    return CheckpointError(
        f"{path}: adapter_shards/ without an adapter_<name>/ level (the 2024 AWS sample layout, written by an older "
        "optimum-neuron); hyperjob reads the 0.4.x layout only. Consolidate it with the AWS sample's "
        "consolidate_adapter_shards script or `optimum-cli neuron consolidate` of that optimum-neuron version; if it "
        "was in fact written by 0.4.x, move adapter_shards/ and adapter_config.json into <checkpoint>/adapter_default/."
    )


def _is_legacy_tp_layout(path: Path) -> bool:
    legacy = path if path.name == "tensor_parallel_shards" else path / "tensor_parallel_shards"
    return legacy.is_dir() or any(p.is_dir() and re.match(r"^tp_rank_\d+_pp_rank_\d+$", p.name) for p in _ls(path))


def _ls(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _build(shards_dir: Path, kind: str | None, adapter_dir: Path | None, adapter_name: str | None) -> ShardedCheckpoint:
    """Collect rank files, metadata and configs of one shards dir; tp/pp are the largest any source implies, so a
    missing last rank still shows up as missing."""
    model = shards_dir / "model"
    ranks = [m for p in _ls(model) if (m := _RANK_FILE_RE.match(p.name))]
    if not ranks:
        if any("_ep_rank_" in p.name for p in _ls(model)):
            raise CheckpointError(f"{model}: expert-parallel rank files are not supported")
        raise CheckpointError(f"{model}: no dp_rank_XX_tp_rank_XX_pp_rank_XX.pt rank files")
    stages = {
        int(m.group(1)): parse_metadata(shards_dir / m.group(0))
        for p in _ls(shards_dir)
        if (m := _METADATA_RE.match(p.name))
    }
    tp = max(int(m.group(2)) for m in ranks) + 1
    pp = max([int(m.group(3)) for m in ranks] + list(stages)) + 1
    for stage in stages.values():
        tp = max([tp] + [int(v.get("num_partitions", 1)) for v in stage.parameters.values() if isinstance(v, dict)])
        tp = max([tp] + [int(f.get("tp_size", 1)) for _, _, f in stage.specs])
    xser = any(is_xser(model / m.group(0)) for m in ranks)
    notes = [f"{model / m.group(0)}: ignored (model shards are always dp_rank_00)" for m in ranks if m.group(1) != "00"]
    ckpt = ShardedCheckpoint(shards_dir, "full", xser, tp, pp, adapter_name, stages, notes=notes)
    if kind is None:  # shards dir under an unexpected name: decide by content
        kind = "lora" if any(".lora_" in k for k in ckpt.index(0, 0)) else "full"
    ckpt.kind = "lora" if kind == "lora" else "full"
    if ckpt.kind == "lora":
        config_path = (adapter_dir or shards_dir.parent) / "adapter_config.json"
        ckpt.adapter_config_path = config_path
        ckpt.adapter_config = _read_json(config_path) if config_path.is_file() else None
        ckpt.adapter_name = adapter_name or "default"
    else:
        ckpt.model_dir = shards_dir.parent
        ckpt.adapter_name = None
        config = _read_json(shards_dir.parent / "config.json") if (shards_dir.parent / "config.json").is_file() else {}
        ckpt.tied_embeddings = isinstance(config, dict) and bool(config.get("tie_word_embeddings", False))
    return ckpt


def _resolve_here(path: Path, adapter_name: str) -> ShardedCheckpoint | None:
    """The checkpoint at `path` itself (a shards dir, an adapter dir or a checkpoint-N dir), or None."""
    if _is_legacy_tp_layout(path):
        raise _legacy_error(path, "tp_rank_dirs")
    if (path / "model").is_dir():
        if path.name == "adapter_shards":
            if not path.parent.name.startswith("adapter_"):
                raise _legacy_error(path, "no_adapter_level")
            return _build(path, "lora", path.parent, path.parent.name.removeprefix("adapter_"))
        return _build(path, "full" if path.name == "shards" else None, None, adapter_name)
    if path.name.startswith("adapter_") and (path / "adapter_shards").is_dir():
        return _build(path / "adapter_shards", "lora", path, path.name.removeprefix("adapter_"))
    wanted = path / f"adapter_{adapter_name}"
    if (wanted / "adapter_shards").is_dir():
        return _build(wanted / "adapter_shards", "lora", wanted, adapter_name)
    others = [p.name for p in _ls(path) if p.name.startswith("adapter_") and (p / "adapter_shards").is_dir()]
    if others:
        raise CheckpointError(f"{path}: no adapter_{adapter_name}/ here; found {', '.join(others)} (pass adapter_name)")
    if (path / "shards" / "model").is_dir():
        return _build(path / "shards", "full", None, None)
    if (path / "adapter_shards").is_dir():
        raise _legacy_error(path, "no_adapter_level")
    return None


def _quick_incomplete(ckpt: ShardedCheckpoint) -> str | None:
    """Why a checkpoint-N is not complete (done marker, rank files, metadata), without reading any tensor."""
    if not (ckpt.shards_dir / "done").is_file():
        return f"{ckpt.shards_dir / 'done'} missing"
    for pp in range(ckpt.pp_size):
        if pp not in ckpt.stages:
            return f"metadata of pipeline stage {pp} missing"
        for tp in range(ckpt.tp_size):
            if not ckpt.rank_file(tp, pp).is_file():
                return f"{ckpt.rank_file(tp, pp)} missing"
    return None


def resolve_checkpoint(path: Path, adapter_name: str = "default") -> ShardedCheckpoint:
    """Locate the shards from a training output dir (newest complete checkpoint-N), a checkpoint-N dir,
    `adapter_<name>/`, `adapter_<name>/adapter_shards` or `shards`. A dir that itself holds shards is used as is."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    found = _resolve_here(path, adapter_name)
    if found is not None:
        return found
    steps = sorted(
        ((int(m.group(1)), p) for p in _ls(path) if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))), reverse=True
    )
    skipped: list[str] = []
    for _, candidate in steps:
        try:
            ckpt = _resolve_here(candidate, adapter_name)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        reason = "no shards" if ckpt is None else _quick_incomplete(ckpt)
        if ckpt is not None and reason is None:
            ckpt.notes.extend(f"skipped newer incomplete checkpoint: {s}" for s in skipped)
            return ckpt
        skipped.append(f"{candidate}: {reason}")
    if steps:
        raise CheckpointError(f"{path}: no complete checkpoint-N: " + "; ".join(skipped[:5]))
    raise CheckpointError(
        f"{path}: not an optimum-neuron checkpoint (expected checkpoint-N/, adapter_<name>/adapter_shards/ or shards/)"
    )


def _check_rank_files(ckpt: ShardedCheckpoint, problems: list[str]) -> None:
    for pp in range(ckpt.pp_size):
        for tp in range(ckpt.tp_size):
            f = ckpt.rank_file(tp, pp)
            if not f.is_file():
                problems.append(f"{f}: rank file missing (tp={ckpt.tp_size}, pp={ckpt.pp_size})")
            elif ckpt.xser and not info_file(f).is_file():
                note = f"{info_file(f)}: absent, shapes are checked from the tensor files"
                ckpt.notes.extend([note] if note not in ckpt.notes else [])


def _check_tensors(
    ckpt: ShardedCheckpoint, tp: int, pp: int, index: dict[str, IndexEntry], problems: list[str]
) -> None:
    rank_file = ckpt.rank_file(tp, pp)
    for name, entry in index.items():
        if not isinstance(entry, TensorRef):
            continue
        numel = 1
        for d in entry.shape or ():
            numel *= d
        try:
            check_tensor_file(tensor_file(rank_file, entry.tid), numel * entry.dtype.itemsize if entry.dtype else None)
        except CheckpointError as e:
            problems.append(f"{e} [{name}]")


def _compare_ranks(ckpt: ShardedCheckpoint, pp: int, problems: list[str]) -> None:
    ref = ckpt.index(0, pp)
    for tp in range(1, ckpt.tp_size):
        other = ckpt.index(tp, pp)
        f = ckpt.rank_file(tp, pp)
        if set(other) != set(ref):
            missing, extra = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
            problems.append(f"{f}: key set differs from tp rank 0 (missing {missing[:3]}, extra {extra[:3]})")
            continue
        for name, entry in other.items():
            a, b = ref[name], entry
            if a.shape is not None and b.shape is not None and (a.shape, a.dtype) != (b.shape, b.dtype):
                problems.append(f"{f}: {name} is {b.shape} {b.dtype}, tp rank 0 has {a.shape} {a.dtype}")


def _check_adapter_config(ckpt: ShardedCheckpoint, problems: list[str]) -> None:
    cfg, path = ckpt.adapter_config or {}, ckpt.adapter_config_path
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        problems.append(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        problems.append(f"{path}: DoRA adapters cannot be consolidated (magnitude vectors are not un-sharded)")
    r = cfg.get("r")
    if isinstance(r, int) and not cfg.get("rank_pattern"):
        for pp in range(ckpt.pp_size):
            for name, entry in ckpt.index(0, pp).items():
                is_a = ".lora_A." in name or name.endswith(".lora_embedding_A")
                if is_a and entry.shape is not None and entry.shape[0] != r:
                    problems.append(f"{ckpt.rank_file(0, pp)}: {name} has rank {entry.shape[0]}, {path} says r={r}")


def _check_trn_config(ckpt: ShardedCheckpoint, problems: list[str]) -> None:
    """trn_config.json (beside a full checkpoint's shards) must agree with the tp/pp the rank files imply."""
    for path in (ckpt.shards_dir.parent / "trn_config.json", ckpt.shards_dir.parent.parent / "trn_config.json"):
        if path.is_file():
            cfg = _read_json(path)
            for key, have in (("tensor_parallel_size", ckpt.tp_size), ("pipeline_parallel_size", ckpt.pp_size)):
                if isinstance(cfg, dict) and isinstance(cfg.get(key), int) and cfg[key] != have:
                    problems.append(f"{path}: {key}={cfg[key]}, but the rank files and metadata imply {have}")
            return


def validate(ckpt: ShardedCheckpoint) -> None:
    """Raise CheckpointError listing every problem found (file: problem) before anything is written: `done`, every
    rank file, every referenced tensor file (present, not truncated), metadata, equal key sets and shapes across
    tp ranks, and shapes against the metadata's partition info and transformation specs."""
    from hyperjob.checkpoint.unshard import build_plan  # unshard imports this module's types

    problems: list[str] = []
    if not (ckpt.shards_dir / "done").is_file():
        problems.append(f"{ckpt.shards_dir / 'done'}: missing, the save did not finish (use an earlier checkpoint)")
    for pp in range(ckpt.pp_size):
        if pp not in ckpt.stages:
            legacy = (ckpt.shards_dir / f"mp_metadata_pp_rank_{pp}.pt").is_file()
            why = " (only the older .pt form is present, which hyperjob does not read)" if legacy else ""
            problems.append(f"{ckpt.shards_dir / f'mp_metadata_pp_rank_{pp}.json'}: metadata missing{why}")
    if ckpt.kind == "lora" and ckpt.adapter_config is None:
        problems.append(f"{ckpt.adapter_config_path}: adapter_config.json missing")
    _check_trn_config(ckpt, problems)
    _check_rank_files(ckpt, problems)
    if not problems:
        for pp in range(ckpt.pp_size):
            for tp in range(ckpt.tp_size):
                try:
                    _check_tensors(ckpt, tp, pp, ckpt.index(tp, pp), problems)
                except CheckpointError as e:
                    problems.append(str(e))
            if not problems:
                _compare_ranks(ckpt, pp, problems)
    if not problems and ckpt.kind == "lora":
        _check_adapter_config(ckpt, problems)
    if not problems:
        try:
            build_plan(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise CheckpointError(f"checkpoint {ckpt.shards_dir} is not usable:\n  " + "\n  ".join(shown) + more)
