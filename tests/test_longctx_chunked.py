"""Chunked LM head + CE and tiled MLP reproduce the plain computation; the chunked loss's peak memory is bounded.

Real tiny Llama (float32) with real peft LoRA; LoRA B is random so every adapter gradient is non-trivial.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hyperjob.longctx import chunked_loss as C
from hyperjob.longctx.memtrack import PeakMemory
from hyperjob.longctx.tiled_mlp import tile_mlp
from hyperjob.stages.tiny import TINY_ARCH

VOCAB = 512
CHUNK = 64
TOL = {"atol": 1e-5, "rtol": 1e-5}
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _model(head: str, targets: list[str]) -> Any:
    """Tiny Llama + LoRA. head: frozen (plain lm_head), trainable (modules_to_save) or lora (LoRA on lm_head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY_ARCH, "vocab_size": VOCAB, "max_position_embeddings": 1024}, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float()
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=[*targets, "lm_head"] if head == "lora" else targets,
        modules_to_save=["lm_head"] if head == "trainable" else None,
        init_lora_weights=False,  # random B: with B = 0 the A gradients would be trivially zero
    )
    torch.manual_seed(1)
    return get_peft_model(model, lora)


def _batch(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids and unshifted labels: a 5-token prompt per row is ignored, and so (when long) are the targets
    of positions 64..191, two whole chunks of 64 with no valid target after the shift."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, :5] = C.IGNORE_INDEX
    if length > 200:
        labels[:, 65:193] = C.IGNORE_INDEX
    return ids, labels


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """labels[i] -> target of position i (labels[i + 1]); the last position has none."""
    pad = torch.full_like(labels[:, :1], C.IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _loss_and_grads(model: Any, ids: torch.Tensor, labels: torch.Tensor, impl: str) -> tuple[float, dict]:
    base = model.get_base_model()
    hidden = base.model(input_ids=ids).last_hidden_state
    total, count = C.lm_loss(hidden, _shift(labels), base.lm_head, impl=impl, chunk=CHUNK)
    loss = total / count
    loss.backward()
    return loss.item(), _grads(model)


@pytest.mark.parametrize("head", ["frozen", "trainable", "lora"])
@pytest.mark.parametrize(("batch", "length"), [(2, 63), (1, 1000)])
def test_chunked_loss_and_grads_match_standard(head: str, batch: int, length: int) -> None:
    model = _model(head, ["q_proj", "v_proj", *MLP_TARGETS])
    ids, labels = _batch(batch, length)
    if length > 200:  # the scenario the labels were built for: chunks 1 and 2 have no valid target
        assert (_shift(labels)[0, 64:192] == C.IGNORE_INDEX).all()
    hf_loss = model(input_ids=ids, labels=labels).loss.item()
    model.zero_grad(set_to_none=True)

    std_loss, std_grads = _loss_and_grads(model, ids, labels, "standard")
    chk_loss, chk_grads = _loss_and_grads(model, ids, labels, "chunked")

    assert std_loss == pytest.approx(hf_loss, rel=1e-6)  # same shift and float32 CE as transformers
    assert chk_loss == pytest.approx(std_loss, rel=1e-6)
    assert std_grads.keys() == chk_grads.keys()
    assert all(g.abs().sum() > 0 for g in std_grads.values())
    for name, grad in std_grads.items():
        torch.testing.assert_close(chk_grads[name], grad, **TOL, msg=name)
    head_grads = {n for n in std_grads if "lm_head" in n}
    lm_head = model.get_base_model().lm_head
    if head == "frozen":
        assert not head_grads and lm_head.weight.grad is None
    elif head == "trainable":
        assert head_grads == {"base_model.model.lm_head.modules_to_save.default.weight"}
        assert lm_head.original_module.weight.grad is None
    else:
        assert head_grads == {f"base_model.model.lm_head.lora_{ab}.default.weight" for ab in "AB"}
        assert lm_head.base_layer.weight.grad is None


def test_chunked_flat_hidden_remainder_and_no_grad() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    hidden = torch.randn(20, 16)
    labels = torch.randint(0, 40, (20,))
    labels[7:14] = C.IGNORE_INDEX  # chunk 7 tokens: the second chunk has no valid target
    with torch.no_grad():
        std, std_n = C.standard_lm_loss(hidden, labels, head)
        chk, chk_n = C.chunked_lm_loss(hidden, labels, head, chunk=7)  # 7 + 7 + 6: the remainder counts
    assert int(chk_n) == int(std_n) == 13
    torch.testing.assert_close(chk, std, **TOL)
    dropped = C.chunked_lm_loss(hidden[:14], labels[:14], head, chunk=7)[0]
    assert abs(chk.item() - dropped.item()) > 1e-3  # the last 6 tokens do contribute


def test_chunked_all_ignored_is_zero_not_nan() -> None:
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    total, count = C.chunked_lm_loss(hidden, torch.full((2, 9), C.IGNORE_INDEX), head, chunk=4)
    total.backward()
    assert total.item() == 0.0 and int(count) == 0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0 and head.weight.grad.abs().sum() == 0


def _run_mlp_case(model: Any, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, dict]:
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.item(), _grads(model)


@pytest.mark.parametrize(("length", "tile"), [(1000, 64), (63, 16)])
def test_tiled_mlp_matches_untiled(length: int, tile: int) -> None:
    model = _model("frozen", ["q_proj", "v_proj", *MLP_TARGETS])
    ids, labels = _batch(1, length)
    logits, loss, grads = _run_mlp_case(model, ids, labels)

    assert tile_mlp(model, tile) == 2  # one per decoder layer, found through the peft wrapper
    calls = []
    gate = model.get_base_model().model.layers[0].mlp.gate_proj
    gate.register_forward_hook(lambda *_: calls.append(1))
    tiled = model(input_ids=ids, labels=labels)
    assert len(calls) == math.ceil(length / tile)  # it really runs tile by tile
    tiled.loss.backward()
    assert len(calls) == 2 * math.ceil(length / tile)  # and recomputes each tile in backward
    tiled_grads = _grads(model)

    torch.testing.assert_close(tiled.logits.detach(), logits, **TOL)
    assert tiled.loss.item() == pytest.approx(loss, rel=1e-6)
    assert any("mlp" in n and "lora_A" in n for n in grads)
    assert grads.keys() == tiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_tiled_mlp_retiles_and_works_under_gradient_checkpointing(reentrant: bool) -> None:
    model = _model("frozen", MLP_TARGETS)
    ids, labels = _batch(1, 100)
    _, loss, grads = _run_mlp_case(model, ids, labels)
    assert tile_mlp(model, 64) == 2
    assert tile_mlp(model, 30) == 2  # re-tiles, does not wrap the tiled forward again
    calls = []
    model.get_base_model().model.layers[1].mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert len(calls) == 4  # 30 + 30 + 30 + 10 tokens
    out.loss.backward()
    assert len(calls) > 2 * 4  # the layer's recompute also tiles (how often a tile reruns is torch's business)
    tiled_loss, tiled_grads = out.loss.item(), _grads(model)
    assert tiled_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, **TOL, msg=name)


def test_peak_memory_tracker_counts_allocations_views_and_frees() -> None:
    with PeakMemory() as mem:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:20]
        a.add_(1)
        del a, view
        b = torch.empty(500)
    assert (mem.peak, mem.live) == (4000, 2000)
    del b
    assert mem.live == 0


def _loss_peak(impl: str, tokens: int, vocab: int, chunk: int, fake: bool) -> int:
    with FakeTensorMode() if fake else torch.enable_grad():
        torch.manual_seed(0)
        head = torch.nn.Linear(64, vocab, bias=False).requires_grad_(False)
        hidden = torch.randn(tokens, 64, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,))
        with PeakMemory() as mem:
            total, count = C.lm_loss(hidden, labels, head, impl=impl, chunk=chunk)
            (total / count).backward()
    return mem.peak


def test_tracker_fake_equals_real() -> None:
    for impl in ("standard", "chunked"):
        assert _loss_peak(impl, 256, 4096, 32, fake=True) == _loss_peak(impl, 256, 4096, 32, fake=False)


def test_chunked_logits_peak_is_bounded() -> None:
    tokens, vocab = 1000, 32000
    naive = _loss_peak("standard", tokens, vocab, CHUNK, fake=True)
    chunked = _loss_peak("chunked", tokens, vocab, CHUNK, fake=True)
    assert naive >= tokens * vocab * 4  # the full float32 logits existed
    assert CHUNK * vocab * 4 <= chunked <= naive / 12  # one chunk's logits did, and the ratio is ~ tokens / chunk


def test_dispatcher_errors_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed, wherever this runs
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    assert C.available_kernels() == {"liger": False, "cut-cross-entropy": False}
    head, hidden, labels = torch.nn.Linear(8, 11), torch.randn(5, 8), torch.randint(0, 11, (5,))
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        C.lm_loss(hidden, labels, head, impl="liger", chunk=4)
    with pytest.raises(ImportError, match="pip install cut-cross-entropy"):
        C.lm_loss(hidden, labels, head, impl="cut-cross-entropy", chunk=4)
    with pytest.raises(ValueError, match="chunked"):
        C.lm_loss(hidden, labels, head, impl="fused", chunk=4)
    monkeypatch.setattr(C, "_installed", lambda module: True)
    with pytest.raises(ValueError, match="CUDA"):
        C.lm_loss(hidden, labels, head, impl="liger", chunk=4)


@pytest.mark.parametrize("head", ["frozen", "trainable", "lora"])
def test_fused_kernels_get_a_plain_weight_or_a_clear_error(head: str) -> None:
    lm_head = _model(head, ["q_proj"]).get_base_model().lm_head
    if head == "lora":
        with pytest.raises(ValueError, match="use loss 'chunked'"):
            C.plain_linear(lm_head, "liger")
        return
    weight, bias = C.plain_linear(lm_head, "liger")
    trained = lm_head if head == "frozen" else lm_head.modules_to_save["default"]
    assert weight is trained.weight and bias is None
