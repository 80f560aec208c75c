"""Un-shard tensor-parallel rank tensors into standard names, one parameter at a time.

The plan comes from the checkpoint's metadata, not from name guessing: the transformation specs say which saved
keys are fused (FusedLinearsSpec: gate_up_proj, qkv_proj) or GQA-permuted (GQAQKVColumnParallelLinearSpec), and
every other key follows its metadata partition info (concat along partition_dim, or replicated). The rules are small
pure functions over the list of per-rank tensors, table-tested against hand-sharded tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from hyperjob.checkpoint.drift import DriftReport
from hyperjob.checkpoint.errors import CheckpointError

if TYPE_CHECKING:
    from hyperjob.checkpoint.reader import ShardedCheckpoint, StageMetadata

Rule = Literal["concat", "replicated", "unfuse", "gqa_q", "gqa_kv", "gqa_qkv", "gqa_o"]
# `<module>.lora_A.<adapter>.weight`, `<module>.lora_embedding_A.<adapter>`, `<module>.modules_to_save.<adapter>.w`
_ADAPTER_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)\.([^.]+)(?=\.|$)"
)


# ---- rules: pure functions of the per-rank tensors ----


def concat_shards(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Column parallel (dim 0), row parallel (dim 1), vocab-parallel embedding (dim 0)."""
    if shards and all(s.is_meta for s in shards):  # planning: torch.cat's meta kernel imports torch._dynamo (1.3 s)
        shape = list(shards[0].shape)
        if any(s.dim() != len(shape) or s.dtype != shards[0].dtype for s in shards):
            raise RuntimeError("concat_shards: shards differ in rank or dtype")
        if any(list(s.shape[:dim]) + list(s.shape[dim + 1 :]) != shape[:dim] + shape[dim + 1 :] for s in shards):
            raise RuntimeError(f"concat_shards: shard shapes {[list(s.shape) for s in shards]} differ off dim {dim}")
        shape[dim] = sum(s.shape[dim] for s in shards)
        return torch.empty(shape, dtype=shards[0].dtype, device="meta")
    return torch.cat(shards, dim=dim)


def unfuse_shards(shards: list[torch.Tensor], sizes: tuple[int, ...], fuse_axis: int, dim: int) -> list[torch.Tensor]:
    """Each rank holds its slice of every fused linear back to back along `fuse_axis` ([gate_r; up_r]); split each
    rank by `sizes` (per-rank sizes) and concatenate part i of every rank along the partition `dim`."""
    parts = [torch.split(s, list(sizes), dim=fuse_axis) for s in shards]
    return [concat_shards([p[i] for p in parts], dim) for i in range(len(sizes))]


def gqa_query_head_order(tp: int, heads: int, kv_heads: int, kv_multiplier: int) -> list[int]:
    """Original query head at each position of the rank-concatenated GQA query weight (optimum-neuron's
    compute_query_indices_for_rank for ranks 0..tp-1, in closed form). Ranks hold `heads/tp` query heads grouped
    under `kv_heads*m/tp` KV heads; the m KV copies cycle through the kv heads, and later copies of the same kv head
    take the next slice of its query group."""
    heads_r, kv_r = heads // tp, kv_heads * kv_multiplier // tp
    if (
        heads % tp
        or kv_heads * kv_multiplier % tp
        or kv_r == 0
        or heads_r % kv_r
        or heads % kv_heads
        or kv_heads % kv_r
    ):
        raise CheckpointError(
            f"GQA layout heads={heads} kv_heads={kv_heads} kv_size_multiplier={kv_multiplier} tp={tp}"
        )
    group, group_r = heads // kv_heads, heads_r // kv_r
    span = (kv_heads // kv_r) * heads_r  # positions before the next slice of the same query group
    order = [(g % group_r) + group * ((g // group_r) % kv_heads) + group_r * (g // span) for g in range(heads)]
    if sorted(order) != list(range(heads)):
        raise CheckpointError(
            f"GQA layout heads={heads} kv_heads={kv_heads} m={kv_multiplier} tp={tp} is no permutation"
        )
    return order


def restore_head_order(t: torch.Tensor, order: list[int], heads: int, dim: int) -> torch.Tensor:
    """`t` holds heads along `dim` in `order`; return them in original order (index by the inverse permutation)."""
    inverse = torch.argsort(torch.tensor(order)).to(t.device)
    moved = t.movedim(dim, 0)
    grouped = moved.reshape(heads, moved.shape[0] // heads, *moved.shape[1:])
    return grouped.index_select(0, inverse).reshape(moved.shape).movedim(0, dim).contiguous()


def split_kv_copies(full: torch.Tensor, kv_multiplier: int) -> list[torch.Tensor]:
    """Concatenated K (or V) ranks hold kv_size_multiplier identical copies [K; K; ...]: the copies."""
    return list(torch.chunk(full, kv_multiplier, dim=0))


def split_qkv(t: torch.Tensor, q_rows: int, kv_rows: int) -> tuple[torch.Tensor, ...]:
    """One rank of a fused GQA `weight_qkv`: [q_r; k_r; v_r] along dim 0."""
    return tuple(torch.split(t, [q_rows, kv_rows, kv_rows], dim=0))


# ---- plan ----


@dataclass(frozen=True)
class GQALayout:
    tp: int
    heads: int
    kv_heads: int
    kv_multiplier: int
    q_rows: int  # q_output_size_per_partition
    kv_rows: int  # kv_output_size_per_partition

    def order(self) -> list[int]:
        return gqa_query_head_order(self.tp, self.heads, self.kv_heads, self.kv_multiplier)


@dataclass(frozen=True)
class Step:
    """Turn one saved key (present on every tp rank of stage `pp`) into `outputs`."""

    rule: Rule
    pp: int
    key: str
    outputs: tuple[str, ...]
    dim: int = 0  # partition dim
    fuse_axis: int = 0
    sizes: tuple[int, ...] = ()
    gqa: GQALayout | None = None


@dataclass
class Combined:
    outputs: list[torch.Tensor]
    replicas: list[tuple[str, list[torch.Tensor], tuple[int, ...]]]  # (label, copies, indices into outputs)


def apply_step(step: Step, shards: list[torch.Tensor]) -> Combined:
    """Combine the tp rank tensors of one saved key; replicated copies are returned for the drift check."""
    g = step.gqa
    if step.rule == "concat":
        return Combined([concat_shards(shards, step.dim)], [])
    if step.rule == "replicated":
        outs = [shards[0]] * len(step.outputs)
        return Combined(outs, [(step.key, shards, tuple(range(len(outs))))])
    if step.rule == "unfuse":
        return Combined(unfuse_shards(shards, step.sizes, step.fuse_axis, step.dim), [])
    assert g is not None
    if step.rule == "gqa_q":
        return Combined([restore_head_order(concat_shards(shards, 0), g.order(), g.heads, 0)], [])
    if step.rule == "gqa_o":
        return Combined([restore_head_order(concat_shards(shards, step.dim), g.order(), g.heads, step.dim)], [])
    if step.rule == "gqa_kv":
        copies = split_kv_copies(concat_shards(shards, 0), g.kv_multiplier)
        return Combined([copies[0]], [(f"{step.key} (kv copies)", copies, (0,))])
    parts = [split_qkv(s, g.q_rows, g.kv_rows) for s in shards]
    q = restore_head_order(concat_shards([p[0] for p in parts], 0), g.order(), g.heads, 0)
    k = split_kv_copies(concat_shards([p[1] for p in parts], 0), g.kv_multiplier)
    v = split_kv_copies(concat_shards([p[2] for p in parts], 0), g.kv_multiplier)
    return Combined([q, k[0], v[0]], [(f"{step.key} (k copies)", k, (1,)), (f"{step.key} (v copies)", v, (2,))])


def saved_name(meta_name: str) -> tuple[str, str | None]:
    """Metadata names carry the adapter name, saved keys do not: (saved key, adapter or None).
    `x.lora_A.default.weight` -> `x.lora_A.weight`; `x.modules_to_save.default.weight` -> `x.weight`."""
    m = _ADAPTER_PART.search(meta_name)
    if not m:
        return meta_name, None
    keep = "" if m.group(1) == "modules_to_save" else f".{m.group(1)}"
    return meta_name[: m.start()] + keep + meta_name[m.end() :], m.group(2)


def saved_metadata(stage: StageMetadata, adapter: str | None) -> dict[str, dict[str, Any]]:
    """Saved key -> partition info, for the parameters of `adapter` (and non-adapter ones). modules_to_save copies
    lose their tensor-parallel attributes (peft deep-copies the module and Parameter.__deepcopy__ drops them), so
    they take the partition info of the `original_module` they copy."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in stage.parameters.items():
        key, owner = saved_name(name)
        if owner is not None and owner != adapter:
            continue
        if ".modules_to_save." in name:
            original = stage.parameters.get(name.replace(f".modules_to_save.{owner}.", ".original_module.", 1))
            entry = original if isinstance(original, dict) and original.get("tensor_model_parallel") else entry
        out[key] = entry if isinstance(entry, dict) else {}
    return out


class _Planner:
    """Steps of one pipeline stage."""

    def __init__(self, ckpt: ShardedCheckpoint, pp: int) -> None:
        self.ckpt, self.tp, self.pp, self.stage = ckpt, ckpt.tp_size, pp, ckpt.stages[pp]
        self.index = ckpt.index(0, pp)
        self.meta = saved_metadata(self.stage, ckpt.adapter_name)
        self.steps: dict[str, Step] = {}

    def fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.stage.path}: {msg}")

    def rows(self, key: str, dim: int = 0) -> int:
        shape = self.index[key].shape
        assert shape is not None
        if dim >= len(shape):
            raise self.fail(f"{key} has shape {shape}, no dim {dim}")
        return shape[dim]

    def add(self, rule: Rule, key: str, outputs: tuple[str, ...], **kw: Any) -> None:
        if key in self.steps:
            raise self.fail(f"{key} is claimed by two transformation specs")
        self.steps[key] = Step(rule, self.pp, key, outputs, **kw)

    def fused(self, module: str, f: dict[str, Any]) -> None:
        name, linears, dims = f["fused_linear_name"], list(f["linear_names"]), [int(d) for d in f["original_dims"]]
        axis = {"column": 0, "row": 1}.get(f["fuse_axis"], f["fuse_axis"])
        if int(f.get("tp_size", self.tp)) != self.tp or any(d % self.tp for d in dims):
            raise self.fail(f"{module}.{name}: spec tp_size {f.get('tp_size')} / dims {dims} do not fit tp={self.tp}")
        sizes = tuple(d // self.tp for d in dims)
        for p in ["weight", "bias"] if f.get("bias") else ["weight"]:
            base, a, b = (f"{module}.{name}.{s}{p}" for s in ("", "lora_A.", "lora_B."))
            if base in self.index:
                self.check_rows(base, sum(sizes), axis)
                dim = int(self.meta.get(base, {}).get("partition_dim", axis))
                self.add(
                    "unfuse", base, tuple(f"{module}.{n}.{p}" for n in linears), dim=dim, fuse_axis=axis, sizes=sizes
                )
            if a not in self.index and b not in self.index:
                continue
            if axis != 0:
                raise self.fail(
                    f"{module}.{name}: LoRA on a row-fused linear is not supported (no Llama layer has one)"
                )
            if a in self.index:
                if self.meta.get(a, {}).get("tensor_model_parallel"):
                    raise self.fail(f"{a}: LoRA A of a column-parallel fused linear should be replicated")
                self.add("replicated", a, tuple(f"{module}.{n}.lora_A.{p}" for n in linears))
            if b not in self.index:
                raise self.fail(f"{a} is saved but {b} is not")
            self.check_rows(b, sum(sizes), 0)
            self.add("unfuse", b, tuple(f"{module}.{n}.lora_B.{p}" for n in linears), dim=0, fuse_axis=0, sizes=sizes)
        self.claimed_all(f"{module}.{name}.")

    def claimed_all(self, prefix: str) -> None:
        """Every saved key of a spec's module must follow the spec: a generic concat would silently mis-order it."""
        stray = [k for k in self.index if k.startswith(prefix) and k not in self.steps]
        if stray:
            raise self.fail(f"{stray[0]} belongs to a transformation spec's module but matches none of its rules")

    def check_rows(self, key: str, want: int, dim: int = 0) -> None:
        if self.rows(key, dim) != want:
            raise self.fail(f"{key}: per-rank size {self.rows(key, dim)} along dim {dim} contradicts the spec ({want})")

    def gqa(self, module: str, f: dict[str, Any]) -> None:
        qkv, names = f["gqa_qkv_projection_name"], [f[f"{x}_projection_name"] for x in ("query", "key", "value")]
        heads, kv, m = int(f["num_attention_heads"]), int(f["num_key_value_heads"]), int(f["kv_size_multiplier"])
        q_rows, kv_rows = int(f["q_output_size_per_partition"]), int(f["kv_output_size_per_partition"])
        head_dim = q_rows * self.tp // heads
        if (
            int(f.get("tp_size", self.tp)) != self.tp
            or head_dim * heads != q_rows * self.tp
            or kv_rows * self.tp != kv * m * head_dim
        ):
            raise self.fail(f"{module}.{qkv}: GQA spec {f} does not fit tp={self.tp}"[:400])
        g = GQALayout(self.tp, heads, kv, m, q_rows, kv_rows)
        g.order()  # raises on an impossible layout
        for p in ["weight", "bias"] if f.get("bias") else ["weight"]:
            for lora in ("", "lora_B."):
                prefix, outs = f"{module}.{qkv}.{lora}{p}", tuple(f"{module}.{n}.{lora}{p}" for n in names)
                if f["fuse_qkv"] and prefix + "_qkv" in self.index:
                    self.check_rows(prefix + "_qkv", q_rows + 2 * kv_rows)
                    self.add("gqa_qkv", prefix + "_qkv", outs, gqa=g)
                separate: list[tuple[str, int, Rule, str]] = [
                    ("_q", q_rows, "gqa_q", outs[0]),
                    ("_k", kv_rows, "gqa_kv", outs[1]),
                    ("_v", kv_rows, "gqa_kv", outs[2]),
                ]
                for suffix, rows, rule, out in separate:
                    if not f["fuse_qkv"] and prefix + suffix in self.index:
                        self.check_rows(prefix + suffix, rows)
                        self.add(rule, prefix + suffix, (out,), gqa=g)
            a = f"{module}.{qkv}.lora_A.{p}"
            if a in self.index:
                self.add("replicated", a, tuple(f"{module}.{n}.lora_A.{p}" for n in names))
        # o_proj's input dim follows the permuted query heads, whether or not q/k/v carry LoRA.
        for key in (
            f"{module}.{f['output_projection_name']}.weight",
            f"{module}.{f['output_projection_name']}.lora_A.weight",
        ):
            if key in self.index:
                dim = int(self.meta.get(key, {}).get("partition_dim", 1))
                self.check_rows(key, q_rows, dim)
                self.add("gqa_o", key, (key,), dim=dim, gqa=g)
        self.claimed_all(f"{module}.{qkv}.")

    def generic(self, key: str) -> Step:
        entry = self.meta.get(key)
        if entry is None:
            raise self.fail(f"saved parameter {key} has no metadata entry: cannot tell how it is sharded")
        if not entry.get("tensor_model_parallel"):
            return Step("replicated", self.pp, key, (key,))
        dim, stride = int(entry.get("partition_dim", 0)), int(entry.get("partition_stride", 1))
        parts = int(entry.get("num_partitions", self.tp))
        if parts != self.tp:
            raise self.fail(f"{key}: metadata says {parts} partitions, checkpoint has tp={self.tp}")
        if stride != 1:
            raise self.fail(f"{key}: partition_stride {stride} without a transformation spec (unknown interleaving)")
        self.rows(key, dim)
        return Step("concat", self.pp, key, (key,), dim=dim)

    def plan(self) -> list[Step]:
        for module, cls, fields in self.stage.specs:
            try:
                if cls == "FusedLinearsSpec":
                    self.fused(module, fields)
                elif cls == "GQAQKVColumnParallelLinearSpec":
                    self.gqa(module, fields)
                else:
                    raise self.fail(f"unknown transformation spec {cls} for {module}")
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise self.fail(f"malformed {cls} for {module}: {e!r}") from None
        return [self.steps.get(key) or self.generic(key) for key in self.index if not self.tied_alias(key)]

    def tied_alias(self, key: str) -> bool:
        """A tied lm_head is in state_dict() (so saved) but not in named_parameters() (so not in the metadata);
        HF ties it back on load, as upstream's consolidator (which drops it) relies on too."""
        if not (self.ckpt.tied_embeddings and key.endswith("lm_head.weight") and key not in self.meta):
            return False
        note = f"{key}: tied to the input embeddings (config tie_word_embeddings), not written"
        if note not in self.ckpt.notes:
            self.ckpt.notes.append(note)
        return True


def build_plan(ckpt: ShardedCheckpoint) -> list[Step]:
    """Every saved key of every stage, in saved order, with its rule and output names; checks shapes against the
    specs and metadata and that no output name repeats."""
    steps = [s for pp in range(ckpt.pp_size) for s in _Planner(ckpt, pp).plan()]
    seen: dict[str, str] = {}
    for s in steps:
        for out in s.outputs:
            if out in seen:
                raise CheckpointError(f"{ckpt.shards_dir}: {out} produced by both {seen[out]} and {s.key}")
            seen[out] = s.key
    return steps


def planned_outputs(ckpt: ShardedCheckpoint, steps: list[Step]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every output in write order, from the rank indexes only (rules run on meta tensors)."""
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for s in steps:
        shards = []
        for tp in range(ckpt.tp_size):
            e = ckpt.index(tp, s.pp)[s.key]
            assert e.shape is not None and e.dtype is not None
            shards.append(torch.empty(e.shape, dtype=e.dtype, device="meta"))
        out.extend((n, tuple(t.shape), t.dtype) for n, t in zip(s.outputs, apply_step(s, shards).outputs, strict=True))
    return out


def _concat_streamed(ckpt: ShardedCheckpoint, step: Step) -> torch.Tensor:
    """concat_shards, copying one rank at a time into the preallocated result: peak is the result plus one shard
    instead of twice the result."""
    entries = [ckpt.index(tp, step.pp)[step.key] for tp in range(ckpt.tp_size)]
    shape = list(entries[0].shape or ())
    shape[step.dim] = sum((e.shape or ())[step.dim] for e in entries)
    out = torch.empty(shape, dtype=entries[0].dtype)
    offset = 0
    for tp, e in enumerate(entries):
        n = (e.shape or ())[step.dim]
        out.narrow(step.dim, offset, n).copy_(ckpt.load(tp, step.pp, step.key))
        offset += n
    return out


def iter_unsharded(
    ckpt: ShardedCheckpoint,
    report: DriftReport,
    steps: list[Step] | None = None,
    on_step: Callable[[int, int, Step], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (standard name, tensor) in plan order, loading only the tp rank tensors of one saved key at a time.
    Replicas are drift-checked into `report`; after the last tensor, drift over the threshold raises (unless the
    report allows it), so a consumer writing into a temp dir never publishes a drifted result."""
    steps = build_plan(ckpt) if steps is None else steps
    for i, step in enumerate(steps):
        if step.rule == "concat":  # the largest tensors (embeddings, lm_head): never hold all shards at once
            combined = Combined([_concat_streamed(ckpt, step)], [])
        else:
            shards = [ckpt.load(tp, step.pp, step.key) for tp in range(ckpt.tp_size)]
            combined = apply_step(step, shards)
            del shards
        for label, copies, indices in combined.replicas:
            replacement = report.check(label, copies)
            for j in indices:
                combined.outputs[j] = combined.outputs[j] if replacement is None else replacement
        if on_step is not None:
            on_step(i, len(steps), step)
        yield from zip(step.outputs, combined.outputs, strict=True)
        del combined  # before the next key's shards are loaded
    report.raise_if_exceeded()
