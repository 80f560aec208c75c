"""Planner: layouts, batch arithmetic and the checks that stop a doomed job early (table-driven)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperjob.backends.catalogue import lookup
from hyperjob.config.load import ConfigError, load_config
from hyperjob.plan.planner import make_plan, total_steps

REPO = Path(__file__).resolve().parent.parent
TRN = REPO / "examples" / "trainium-llama3-8b.yaml"
GPU = REPO / "examples" / "gpu-llama3-8b.yaml"
TINY = REPO / "examples" / "tiny-cpu.yaml"


def plan_of(path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = load_config(path, overrides, check_inputs=False)
    return cfg, make_plan(cfg)


def test_seed_case_trn1_32xlarge() -> None:
    cfg, plan = plan_of(TRN)
    assert (plan.tensor, plan.data, plan.world_size, plan.global_batch) == (8, 4, 32, 12)
    assert plan.steps_per_epoch == 1251  # 15,011 dolly rows / 12: the seed's checkpoint-1251
    assert total_steps(plan, cfg) == 1251
    assert plan.kv_size_multiplier is None  # 8 KV heads, TP 8: no replication


@pytest.mark.parametrize(
    ("path", "overrides", "expect"),
    [
        # (world, TP, DP, global batch, kv multiplier)
        (TRN, ["cluster.nodes=2"], (64, 8, 8, 24, None)),
        (TRN, ["parallel.tensor=32"], (32, 32, 1, 3, 4)),
        (TRN, ["parallel.tensor=16"], (32, 16, 2, 6, 2)),
        (TRN, ["cluster.instance_type=trn2.48xlarge", "parallel.tensor=4"], (64, 4, 16, 48, None)),
        (TRN, ["cluster.instance_type=trn2.3xlarge", "parallel.tensor=4"], (4, 4, 1, 3, None)),
        (TRN, ["parallel.tensor=8", "parallel.pipeline=2", "cluster.nodes=2"], (64, 8, 4, 12, None)),
        (GPU, [], (8, 1, 8, 16, None)),
        (GPU, ["cluster.instance_type=g5.12xlarge"], (4, 1, 4, 8, None)),
        (GPU, ["cluster.instance_type=ml.p4d.24xlarge", "cluster.nodes=4"], (32, 1, 32, 64, None)),
        (TINY, [], (2, 1, 2, 8, None)),
    ],
)
def test_layouts(path: Path, overrides: list[str], expect: tuple[int, int, int, int, int | None]) -> None:
    _, plan = plan_of(path, *overrides)
    assert (plan.world_size, plan.tensor, plan.data, plan.global_batch, plan.kv_size_multiplier) == expect


@pytest.mark.parametrize(
    ("path", "overrides", "key", "fragment"),
    [
        (TRN, ["parallel.tensor=3"], "parallel.tensor", "does not divide"),
        (TRN, ["parallel.tensor=12"], "parallel.tensor", "does not divide"),
        (TRN, ["cluster.instance_type=trn9.huge"], "cluster.instance_type", "unknown instance type"),
        (TRN, ["cluster.instance_type=p5.48xlarge"], "cluster.instance_type", "is a cuda instance"),
        (TRN, ["training.seq_len=100000"], "training.seq_len", "exceeds the model's 8192"),
        (TRN, ["training.seq_len=2044"], "training.seq_len", "multiple of tensor=8"),
        (TRN, ["model.num_attention_heads=20", "model.num_key_value_heads=4"], "parallel.tensor", "does not divide"),
        (TRN, ["model.num_attention_heads=24", "model.num_key_value_heads=6"], "parallel.tensor", "not a multiple"),
        (GPU, ["parallel.tensor=2"], "parallel.tensor", "not supported on backend 'cuda'"),
        (GPU, ["cluster.devices_per_node=16"], "cluster.devices_per_node", "exceeds the 8 devices"),
    ],
)
def test_rejected_layouts(path: Path, overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        plan_of(path, *overrides)
    assert exc.value.problems[0][0] == key
    assert fragment in exc.value.problems[0][1]


def test_unknown_model_is_a_note_not_an_error() -> None:
    _, plan = plan_of(TRN, "model.id=someone/unknown-model")
    assert plan.model is None
    assert any("architecture unknown" in n for n in plan.notes)


def test_catalogue_accepts_sagemaker_spelling() -> None:
    assert lookup("ml.trn1.32xlarge") == lookup("trn1.32xlarge")
    assert lookup("trn1.32xlarge").devices == 32  # type: ignore[union-attr]
    assert lookup("trn2.48xlarge").devices == 64  # type: ignore[union-attr]
    assert lookup("p5en.48xlarge").devices == 8  # type: ignore[union-attr]
