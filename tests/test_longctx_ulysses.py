"""Ulysses sequence parallelism: SP=2 (and SP=2 x DP=2) reproduce the loss and LoRA gradients of SP=1.

The distributed runs use real gloo process groups in spawned processes, a real tiny Llama with LoRA on every
projection, and real DDP, so the gradient check covers the exchange's backward and sp_loss's scaling together.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from hyperjob.longctx import ulysses as U

SEQ = 64
VOCAB = 97
# Packed row: samples of 23, 30 and 11 tokens; the 2-rank split at 32 falls inside the second one.
PACK = (23, 30, 11)
CASES: dict[str, dict[str, Any]] = {
    "gqa_split_packed": {"kv_heads": 2, "attn": "sdpa", "packed": True, "batch": 1},
    "kv_replicated_packed": {"kv_heads": 1, "attn": "sdpa", "packed": True, "batch": 1},
    "eager_packed": {"kv_heads": 2, "attn": "eager", "packed": True, "batch": 1},
    "plain_causal_batch2": {"kv_heads": 2, "attn": "sdpa", "packed": False, "batch": 2},
    # layers recomputed in backward run the exchange again (and must reuse the forward's gathered mask)
    "checkpointed_packed": {"kv_heads": 2, "attn": "sdpa", "packed": True, "batch": 1, "checkpoint": True},
    # Mistral with a 16-token window: the full-sequence mask must be banded as well as block-diagonal
    "mistral_window16_packed": {"kv_heads": 2, "attn": "sdpa", "packed": True, "batch": 1, "window": 16},
}
TOL = 1e-5


def _model(case: dict[str, Any]) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    sizes = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": case["kv_heads"],
        "max_position_embeddings": SEQ,
        "tie_word_embeddings": False,
        "attn_implementation": case["attn"],
    }
    if "window" in case:
        model: Any = MistralForCausalLM(MistralConfig(sliding_window=case["window"], **sizes))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: with B = 0 the A gradients would be trivially zero
    )
    torch.manual_seed(1)
    peft_model = get_peft_model(model.float(), lora)
    if case.get("checkpoint"):
        peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


def _batch(case: dict[str, Any], dp_rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + dp_rank)
    ids = torch.randint(0, VOCAB, (case["batch"], SEQ), generator=gen)
    labels = ids.clone()
    labels[:, 3:9] = U.IGNORE_INDEX  # a prompt span
    labels[:, 28:37] = U.IGNORE_INDEX  # across the rank boundary
    batch = {"input_ids": ids, "labels": labels}
    if case["packed"]:
        batch["position_ids"] = torch.cat([torch.arange(n) for n in PACK]).unsqueeze(0)
    return batch


def _loss(model: Any, batch: dict[str, torch.Tensor], g: U.SPGroup) -> torch.Tensor:
    """Per-token CE summed over this rank's shifted labels, then sp_loss (the chunked-loss module's contract)."""
    local = U.shard_batch(batch, g)
    # use_cache=False: with a cache transformers skips its packed-sample mask (SP=1 reference would leak across samples)
    logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    target = local[U.SHIFT_LABELS]
    ce_sum = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), target.flatten(), ignore_index=U.IGNORE_INDEX, reduction="sum"
    )
    return U.sp_loss(ce_sum, (target != U.IGNORE_INDEX).sum(), g)


def _lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference(case: dict[str, Any], dp: int) -> tuple[float, dict[str, torch.Tensor]]:
    """SP=1: each DP rank's token mean on its full rows; DDP's average emulated by the mean over DP ranks."""
    model = _model(case)
    total = sum(_loss(model, _batch(case, r), U.SPGroup.single()) for r in range(dp)) / dp
    assert isinstance(total, torch.Tensor)
    total.backward()
    return float(total.detach()), _lora_grads(model)


def _worker(rank: int, world: int, sp: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    g = U.sp_group(sp)
    results: dict[str, Any] = {"dp_rank": g.dp_rank, "sp_rank": g.rank}
    for name, case in CASES.items():
        model = _model(case)
        U.enable(model, g)
        ddp = DDP(model)  # kept alive through backward: its reducer does the averaging
        loss = _loss(ddp, _batch(case, g.dp_rank), g)
        loss.backward()  # DDP averages over all DP x SP ranks
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # mean over all ranks = mean over DP of each group's token mean
        attn = model.config._attn_implementation
        results[name] = {"loss": float(mean) / world, "grads": _lora_grads(model), "attn": attn}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(world: int, sp: int, out: Path, timeout_s: float = 240) -> list[dict[str, Any]]:
    ctx = mp.start_processes(_worker, args=(world, sp, _free_port(), str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-process Ulysses run did not finish in {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def sp2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run(world=2, sp=2, out=tmp_path_factory.mktemp("ulysses_sp2"))


def _assert_matches(results: list[dict[str, Any]], name: str, dp: int) -> None:
    ref_loss, ref_grads = _reference(CASES[name], dp)
    for res in results:
        got = res[name]
        assert got["attn"] == "hyperjob_ulysses_" + CASES[name]["attn"]  # the exchange ran, not local attention
        assert abs(got["loss"] - ref_loss) < TOL, (name, got["loss"], ref_loss)
        assert got["grads"].keys() == ref_grads.keys()
        for pname, ref in ref_grads.items():
            assert float(ref.abs().max()) > 0, pname  # the comparison below would prove nothing on zeros
            err = float((got["grads"][pname] - ref).abs().max())
            assert err < TOL, (name, pname, err)


@pytest.mark.parametrize("name", list(CASES))
def test_sp2_matches_sp1_loss_and_lora_grads(sp2: list[dict[str, Any]], name: str) -> None:
    assert [r["sp_rank"] for r in sp2] == [0, 1] and {r["dp_rank"] for r in sp2} == {0}
    _assert_matches(sp2, name, dp=1)


def test_packing_changes_the_reference() -> None:
    """The packed cases above only test cross-sample masking if masking changes the answer."""
    packed = _reference(CASES["gqa_split_packed"], dp=1)[0]
    flat = _reference({**CASES["gqa_split_packed"], "packed": False}, dp=1)[0]
    assert abs(packed - flat) > 1e-3


@pytest.mark.slow
def test_sp2_x_dp2_matches_dp2(tmp_path: Path) -> None:
    results = _run(world=4, sp=2, out=tmp_path)
    assert [(r["dp_rank"], r["sp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for name in CASES:
        _assert_matches(results, name, dp=2)


# ---------------------------------------------------------------- pure rules and batch slicing
@pytest.mark.parametrize(
    ("heads", "kv", "seq", "sp", "expected"),
    [
        (32, 8, 4096, 1, []),
        (32, 8, 4096, 4, []),
        (32, 8, 4096, 16, []),  # 8 KV heads replicated twice
        (32, 32, 4096, 8, []),
        (32, 8, 4096, 3, ["32 attention heads (allowed: 1, 2, 4, 8, 16, 32)", "8 key/value heads", "seq_len=4096:"]),
        (28, 4, 4096, 8, ["28 attention heads (allowed: 1, 2, 4, 7, 14, 28)"]),
        (24, 6, 4096, 4, ["6 key/value heads"]),
        (
            32,
            8,
            1000,
            16,
            ["seq_len=1000: every rank needs an equal slice (use a seq_len that is a multiple of 16, e.g. 1008)"],
        ),
    ],
)
def test_sp_problems(heads: int, kv: int, seq: int, sp: int, expected: list[str]) -> None:
    problems = U.sp_problems(heads, kv, seq, sp)
    assert len(problems) == len(expected), problems
    for e, p in zip(expected, problems, strict=True):
        assert e in p, (e, p)
        assert p.startswith(f"parallel.sequence={sp} ")


@pytest.mark.parametrize(("kv", "sp", "rep"), [(8, 4, 1), (8, 8, 1), (2, 4, 2), (1, 8, 8), (4, 16, 4)])
def test_kv_replication(kv: int, sp: int, rep: int) -> None:
    assert U.kv_replication(kv, sp) == rep


def test_shard_batch_shifts_globally_then_slices() -> None:
    ids = torch.arange(100, 108).unsqueeze(0)
    labels = ids.clone()
    labels[0, 2] = U.IGNORE_INDEX
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])  # second sample starts at 5
    shards = [U.shard_batch({"input_ids": ids, "labels": labels, "position_ids": pos}, _fake(r)) for r in (0, 1)]
    assert set(shards[0]) == {"input_ids", "position_ids", U.SHIFT_LABELS}
    assert shards[0]["input_ids"].tolist() == [[100, 101, 102, 103]]
    assert shards[1]["position_ids"].tolist() == [[4, 0, 1, 2]]
    # rank 0's last target lives on rank 1; sample 1's last token (4) predicts nothing; the row's last, nothing
    assert shards[0][U.SHIFT_LABELS].tolist() == [[101, -100, 103, 104]]
    assert shards[1][U.SHIFT_LABELS].tolist() == [[-100, 106, 107, -100]]
    plain = U.shard_batch({"input_ids": ids}, _fake(1))
    assert plain["position_ids"].tolist() == [[4, 5, 6, 7]]
    assert plain[U.SHIFT_LABELS].tolist() == [[105, 106, 107, -100]]


def test_shard_batch_refuses_what_it_cannot_slice() -> None:
    ids = torch.arange(8).unsqueeze(0)
    with pytest.raises(ValueError, match="attention_mask"):
        U.shard_batch({"input_ids": ids, "attention_mask": torch.tensor([[1] * 6 + [0] * 2])}, _fake(0))
    with pytest.raises(ValueError, match="not a multiple"):
        U.shard_batch({"input_ids": ids[:, :7]}, _fake(0))
    with pytest.raises(ValueError, match="pixel_values"):
        U.shard_batch({"input_ids": ids, "pixel_values": ids}, _fake(0))
    ones = U.shard_batch({"input_ids": ids, "attention_mask": torch.ones(1, 8)}, _fake(0))
    assert "attention_mask" not in ones


def test_full_mask_blocks_samples_and_keeps_sdpa_causal_path() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    mask = U.full_mask(pos)
    assert mask is not None and mask.shape == (1, 1, 5, 5)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True]
    assert U.full_mask(torch.arange(5).unsqueeze(0)) is None  # plain causal: let sdpa use is_causal
    additive = U.full_mask(pos, torch.float32)
    assert additive is not None and additive[0, 0, 0, 1] == torch.finfo(torch.float32).min and additive[0, 0, 1, 0] == 0
    banded = U.full_mask(torch.arange(5).unsqueeze(0), sliding_window=2)
    assert banded is not None and banded[0, 0, 4].tolist() == [False, False, False, True, True]


def test_sp_loss_single_is_token_mean() -> None:
    out = U.sp_loss(torch.tensor(6.0), torch.tensor(4), U.SPGroup.single())
    assert float(out) == 1.5
    assert float(U.sp_loss(torch.tensor(0.0), torch.tensor(0), U.SPGroup.single())) == 0.0


def _fake(rank: int) -> U.SPGroup:
    """A rank of a 2-way SP group for the collective-free helpers."""
    return U.SPGroup(size=2, rank=rank, group=None, dp_rank=0, dp_size=1)
