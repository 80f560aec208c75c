"""A rough per-GPU activation-memory estimate for `hyperjob plan`: which long-context options a run needs.

Why an estimate at all: a 64K-token LoRA run that does not fit fails minutes in, after the model has loaded; the
order of magnitude of each term says which option to turn on (checkpointing, a chunked loss, a tiled MLP, more
sequence parallelism). It counts bf16 activations kept for backward per token and layer, as a LoRA run keeps them
(the frozen weights need no activation gradients of their own, but every LoRA input is kept), with flash or SDPA
attention (no [seq, seq] scores), plus the LM head's float32 logits. It leaves out the weights, the optimizer state,
and framework workspace: it is a guide, not a guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts

BF16, FP32 = 2, 4
# Logits in float32, their softmax, and their gradient alive at once in the standard cross-entropy.
LOGIT_COPIES = 3


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes per GPU: `layers` (kept between forward and backward), `peak_layer` (one layer's recomputation or
    its MLP intermediates), and `head` (LM head + loss)."""

    tokens_per_gpu: int
    layers: int
    peak_layer: int
    head: int

    @property
    def total(self) -> int:
        return self.layers + self.peak_layer + self.head


def _layer_bytes_per_token(m: ModelFacts, mlp_tile_fraction: float) -> tuple[int, int]:
    """(attention-side bytes, MLP-side bytes) kept per token in one decoder layer."""
    assert m.hidden_size is not None and m.intermediate_size is not None
    h, i = m.hidden_size, m.intermediate_size
    kv = h * m.num_key_value_heads // m.num_attention_heads
    # norm output, q, k, v, attention output, o_proj input; residual stream; MLP norm output
    attention = (5 * h + 2 * kv) * BF16
    # gate, up, act(gate), act(gate) * up: the large part, and the part a tiled MLP keeps for one tile only
    mlp = int(4 * i * BF16 * mlp_tile_fraction)
    return attention, mlp


def estimate(cfg: HyperjobConfig, m: ModelFacts) -> ActivationEstimate | None:
    """None when the model's sizes are unknown (set them by running `plan` after download)."""
    if not m.sized:
        return None
    assert m.num_hidden_layers is not None and m.vocab_size is not None and m.hidden_size is not None
    t = cfg.training
    tokens = t.micro_batch * t.seq_len // cfg.parallel.sequence
    tile = min(1.0, t.mlp_chunk / tokens) if t.mlp_chunk else 1.0
    attention, mlp = _layer_bytes_per_token(m, tile)
    if t.gradient_checkpointing:
        kept = 0 if t.activation_offload else m.hidden_size * BF16 * tokens * m.num_hidden_layers
        peak = (attention + mlp) * tokens
    else:
        kept = (attention + mlp) * tokens * m.num_hidden_layers
        peak = 0
    head_tokens = min(tokens, t.loss_chunk) if t.loss != "standard" else tokens
    head = head_tokens * m.vocab_size * FP32 * LOGIT_COPIES
    return ActivationEstimate(tokens, kept, peak, head)


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def describe_estimate(e: ActivationEstimate) -> str:
    return (
        f"~{gib(e.total)} (kept {gib(e.layers)} + one layer {gib(e.peak_layer)} + LM head/loss {gib(e.head)}; "
        "rough, weights and optimizer not included)"
    )
