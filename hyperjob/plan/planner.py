"""From a validated config to a parallel layout and step counts, with the checks
that would otherwise fail minutes into a job (or after a 40-minute compile).

Pure apart from reading a local model's config.json and counting the lines of a
local dataset file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.plan.catalogue import InstanceType, known_names, lookup


@dataclass(frozen=True)
class ModelFacts:
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int | None = None


# Facts of well-known models, so `plan` works before anything is downloaded.
KNOWN_MODELS: dict[str, ModelFacts] = {
    "tiny-llama": ModelFacts(4, 2, 512),
    "meta-llama/Meta-Llama-3-8B": ModelFacts(32, 8, 8192),
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelFacts(32, 8, 8192),
    "meta-llama/Llama-3.1-8B": ModelFacts(32, 8, 131072),
    "meta-llama/Llama-3.1-8B-Instruct": ModelFacts(32, 8, 131072),
    "meta-llama/Llama-3.2-1B": ModelFacts(32, 8, 131072),
    "meta-llama/Llama-3.2-3B": ModelFacts(24, 8, 131072),
    "meta-llama/Meta-Llama-3-70B": ModelFacts(64, 8, 8192),
    "meta-llama/Llama-2-7b-hf": ModelFacts(32, 32, 4096),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ModelFacts(32, 4, 2048),
    "mistralai/Mistral-7B-v0.1": ModelFacts(32, 8, 32768),
}
KNOWN_DATASET_ROWS: dict[str, int] = {"databricks/databricks-dolly-15k": 15011}


@dataclass(frozen=True)
class Plan:
    backend: str
    instance: InstanceType
    nodes: int
    procs_per_node: int
    tensor: int
    pipeline: int
    data: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    model: ModelFacts | None
    kv_size_multiplier: int | None
    dataset_rows: int | None
    notes: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.procs_per_node * self.nodes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.dataset_rows is None else math.ceil(self.dataset_rows / self.global_batch)


def total_steps(plan: Plan, cfg: HyperjobConfig) -> int | None:
    if cfg.training.max_steps > 0:
        return cfg.training.max_steps
    spe = plan.steps_per_epoch
    return None if spe is None else math.ceil(spe * cfg.training.epochs)


def model_facts(cfg: HyperjobConfig) -> ModelFacts | None:
    """Config overrides, then a local config.json, then the built-in table."""
    m = cfg.model
    found: ModelFacts | None = KNOWN_MODELS.get(m.id)
    local = Path(m.id) / "config.json"
    if Path(m.id).is_absolute() and local.is_file():
        try:
            data = json.loads(local.read_text())
            heads = int(data["num_attention_heads"])
            found = ModelFacts(
                heads, int(data.get("num_key_value_heads") or heads), data.get("max_position_embeddings")
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError([("model.id", f"{local} is not a usable model config: {e}")]) from None
    if m.num_attention_heads is not None:
        heads = m.num_attention_heads
        kv = m.num_key_value_heads or (found.num_key_value_heads if found else heads)
        pos = m.max_position_embeddings or (found.max_position_embeddings if found else None)
        return ModelFacts(heads, kv, pos)
    if found is not None and (m.num_key_value_heads or m.max_position_embeddings):
        return ModelFacts(
            found.num_attention_heads,
            m.num_key_value_heads or found.num_key_value_heads,
            m.max_position_embeddings or found.max_position_embeddings,
        )
    return found


def dataset_rows(cfg: HyperjobConfig) -> int | None:
    d = cfg.dataset
    if d.num_rows is not None:
        return d.num_rows
    if d.path is not None and d.path.is_file():
        with d.path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return KNOWN_DATASET_ROWS.get(d.id or "")


def _layout_checks(cfg: HyperjobConfig, procs: int, facts: ModelFacts | None) -> int | None:
    """Raise on layouts that cannot run; return the KV-head replication factor (neuron GQA) if any."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    world = procs * cfg.cluster.nodes
    if cfg.backend != "neuron":
        if tp != 1:
            raise ConfigError([("parallel.tensor", f"{tp} is not supported on backend {cfg.backend!r} (allowed: 1)")])
        if pp != 1:
            raise ConfigError([("parallel.pipeline", f"{pp} is not supported on backend {cfg.backend!r} (allowed: 1)")])
        return None
    kv_mult = _head_checks(tp, world, facts) if facts is not None else None
    if world % (tp * pp):
        raise ConfigError(
            [("parallel.tensor", f"tensor x pipeline = {tp * pp} does not divide the {world} processes of the job")]
        )
    if cfg.training.seq_len % tp:
        raise ConfigError(
            [("training.seq_len", f"{cfg.training.seq_len} must be a multiple of tensor={tp} (sequence parallelism)")]
        )
    return kv_mult


def _head_checks(tp: int, world: int, facts: ModelFacts) -> int | None:
    """Attention heads split evenly over TP ranks; KV heads split, or are replicated (GQA) when fewer than TP."""
    heads, kv = facts.num_attention_heads, facts.num_key_value_heads
    if heads % tp:
        allowed = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0 and world % d == 0)
        raise ConfigError(
            [("parallel.tensor", f"{tp} does not divide the model's {heads} attention heads (allowed: {allowed})")]
        )
    if kv >= tp:
        if kv % tp:
            raise ConfigError(
                [("parallel.tensor", f"{tp} does not divide the model's {kv} key/value heads (KV heads >= tensor)")]
            )
        return None
    if tp % kv:
        raise ConfigError(
            [("parallel.tensor", f"{tp} is not a multiple of the model's {kv} key/value heads (needed when KV < TP)")]
        )
    return tp // kv


def make_plan(cfg: HyperjobConfig) -> Plan:
    inst = lookup(cfg.cluster.instance_type)
    if inst is None:
        known = ", ".join(known_names())
        msg = f"unknown instance type {cfg.cluster.instance_type!r}; known: {known}"
        raise ConfigError([("cluster.instance_type", msg)])
    if inst.accelerator != cfg.backend:
        raise ConfigError(
            [("cluster.instance_type", f"{inst.name} is a {inst.accelerator} instance but backend is {cfg.backend!r}")]
        )
    procs = cfg.cluster.devices_per_node or inst.devices
    if inst.accelerator != "cpu" and procs > inst.devices:
        raise ConfigError(
            [("cluster.devices_per_node", f"{procs} exceeds the {inst.devices} devices of one {inst.name}")]
        )
    facts = model_facts(cfg)
    if facts and facts.max_position_embeddings and cfg.training.seq_len > facts.max_position_embeddings:
        raise ConfigError(
            [
                (
                    "training.seq_len",
                    f"{cfg.training.seq_len} exceeds the model's {facts.max_position_embeddings} positions",
                )
            ]
        )
    kv_mult = _layout_checks(cfg, procs, facts)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    notes: list[str] = []
    if facts is None:
        notes.append("model architecture unknown until download: head-count checks skipped (set model.num_*)")
    rows = dataset_rows(cfg)
    plan = Plan(
        backend=cfg.backend,
        instance=inst,
        nodes=cfg.cluster.nodes,
        procs_per_node=procs,
        tensor=tp,
        pipeline=pp,
        data=procs * cfg.cluster.nodes // (tp * pp),
        micro_batch=cfg.training.micro_batch,
        grad_accum=cfg.training.grad_accum,
        seq_len=cfg.training.seq_len,
        model=facts,
        kv_size_multiplier=kv_mult,
        dataset_rows=rows,
        notes=(),
    )
    if rows is not None and plan.global_batch > rows:
        notes.append(f"global batch {plan.global_batch} exceeds the dataset's {rows} rows")
    steps = total_steps(plan, cfg)
    if steps is not None and cfg.training.save_steps > steps:
        notes.append(f"save_steps {cfg.training.save_steps} > {steps} total steps: only the final adapter is saved")
    if rows is None:
        notes.append("dataset size unknown: steps per epoch unknown (set dataset.num_rows)")
    return Plan(**{**plan.__dict__, "notes": tuple(notes)})


def describe(plan: Plan, cfg: HyperjobConfig) -> list[tuple[str, str]]:
    """Rows for `hyperjob plan`: what will run, in the user's terms."""
    steps = total_steps(plan, cfg)
    rows = [
        ("backend", plan.backend),
        ("instance", f"{plan.instance.name} x {plan.nodes} ({plan.procs_per_node} x {plan.instance.device_name})"),
        ("processes", f"{plan.world_size} ({plan.procs_per_node} per node)"),
        ("tensor parallel (TP)", str(plan.tensor)),
        ("pipeline parallel (PP)", str(plan.pipeline)),
        ("data parallel (DP)", str(plan.data)),
    ]
    if plan.kv_size_multiplier:
        rows.append(("KV-head replication", f"x{plan.kv_size_multiplier} (GQA: KV heads < TP)"))
    rows += [
        ("global batch", f"{plan.global_batch} = micro {plan.micro_batch} x accum {plan.grad_accum} x DP {plan.data}"),
        ("tokens per step", f"{plan.global_batch * plan.seq_len:,} (seq_len {plan.seq_len})"),
        ("dataset rows", "unknown" if plan.dataset_rows is None else f"{plan.dataset_rows:,}"),
        ("steps per epoch", "unknown" if plan.steps_per_epoch is None else str(plan.steps_per_epoch)),
        ("total steps", "unknown" if steps is None else str(steps)),
        ("stages", " -> ".join(cfg.stage_list)),
    ]
    return rows
