"""From a validated config to a parallel layout and step counts, with the checks
that would otherwise fail minutes into a job (or after a 40-minute compile).

Pure apart from reading a local model's config.json and counting the lines of a
local dataset file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hyperjob import backends
from hyperjob.backends.base import Layout
from hyperjob.backends.catalogue import InstanceType, known_names, lookup
from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts, model_facts
from hyperjob.plan.memory import describe_estimate, estimate
from hyperjob.plan.resources import check as check_stage_resources
from hyperjob.stage_table import resolve_stages

LONG_CONTEXT = 8192  # from this seq_len on, `plan` shows per-device tokens and activation memory
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
    stages: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    sequence: int = 1

    def layout(self) -> Layout:
        """What the backends' train arguments need of this plan."""
        return Layout(
            self.tensor, self.pipeline, self.world_size, self.kv_size_multiplier, self.model, sequence=self.sequence
        )

    @property
    def tokens_per_device(self) -> int:
        """Tokens of one micro-batch each process holds (sequence parallelism splits every sample)."""
        return self.micro_batch * self.seq_len // self.sequence

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


def dataset_rows(cfg: HyperjobConfig) -> int | None:
    d = cfg.dataset
    if d.num_rows is not None:
        return d.num_rows
    if d.path is not None and d.path.is_file():
        with d.path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return KNOWN_DATASET_ROWS.get(d.id or "")


def make_plan(cfg: HyperjobConfig) -> Plan:
    backend = backends.get(cfg.backend)
    stages = resolve_stages(cfg.stages, backend.name, backend.default_stages)
    check_stage_resources(cfg)
    inst = lookup(cfg.cluster.instance_type)
    if inst is None:
        known = ", ".join(known_names())
        msg = f"unknown instance type {cfg.cluster.instance_type!r}; known: {known}"
        raise ConfigError([("cluster.instance_type", msg)])
    if inst.accelerator != backend.accelerator:
        raise ConfigError(
            [("cluster.instance_type", f"{inst.name} is a {inst.accelerator} instance but backend is {cfg.backend!r}")]
        )
    if (problem := backend.instance_problem(inst)) is not None:
        raise ConfigError([("cluster.instance_type", problem)])
    procs = backend.processes_per_node(cfg, inst)
    facts = model_facts(cfg)
    notes: list[str] = []
    seq_len, max_pos = cfg.training.seq_len, facts.max_position_embeddings if facts else None
    if max_pos and seq_len > max_pos:
        if cfg.model.rope_theta is None:
            msg = f"{seq_len} exceeds the model's {max_pos} positions (to extend the context, raise model.rope_theta)"
            raise ConfigError([("training.seq_len", msg)])
        notes.append(f"seq_len {seq_len} extends the model's {max_pos} positions (rope_theta {cfg.model.rope_theta:g})")
    kv_mult = backend.check_layout(cfg, procs * cfg.cluster.nodes, facts)
    tp, pp, sp = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.sequence
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
        data=procs * cfg.cluster.nodes // (tp * pp * sp),
        micro_batch=cfg.training.micro_batch,
        grad_accum=cfg.training.grad_accum,
        seq_len=cfg.training.seq_len,
        model=facts,
        kv_size_multiplier=kv_mult,
        dataset_rows=rows,
        stages=stages,
        notes=(),
        sequence=sp,
    )
    if sp > 1 and procs % sp:
        notes.append(f"a sequence-parallel group of {sp} spans nodes of {procs} processes: all-to-all over the network")
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
    rows += _long_context_rows(plan, cfg)
    rows += [
        ("global batch", f"{plan.global_batch} = micro {plan.micro_batch} x accum {plan.grad_accum} x DP {plan.data}"),
        ("tokens per step", f"{plan.global_batch * plan.seq_len:,} (seq_len {plan.seq_len})"),
        ("dataset rows", "unknown" if plan.dataset_rows is None else f"{plan.dataset_rows:,}"),
        ("steps per epoch", "unknown" if plan.steps_per_epoch is None else str(plan.steps_per_epoch)),
        ("total steps", "unknown" if steps is None else str(steps)),
        ("stages", " -> ".join(plan.stages)),
    ]
    return rows + backends.get(plan.backend).plan_rows(cfg)


def _long_context_rows(plan: Plan, cfg: HyperjobConfig) -> list[tuple[str, str]]:
    """Sequence parallelism, the launch mode, and per-device tokens and activation memory, where they matter."""
    rows: list[tuple[str, str]] = []
    if plan.sequence > 1:
        rows.append(("sequence parallel (SP)", f"{plan.sequence} (Ulysses; world {plan.world_size} = DP x SP)"))
    if cfg.parallel.mode != "ddp":
        rows.append(("parallel mode", cfg.parallel.mode))
    if plan.sequence > 1 or plan.seq_len >= LONG_CONTEXT:
        rows.append(("tokens per device", f"{plan.tokens_per_device:,} per micro-batch"))
        est = estimate(cfg, plan.model) if plan.model else None
        if est is not None:
            rows.append(("activation memory", describe_estimate(est)))
    return rows
