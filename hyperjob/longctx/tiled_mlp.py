"""Tiled MLP: each decoder layer's MLP runs over token tiles, each tile under activation checkpointing.

A gated MLP's intermediate activations (gate, up, act(gate) * up: [tokens, intermediate], intermediate ~3.5x
hidden) are the largest per-layer tensors at long context after the logits. The MLP is token-wise, so running it on
`chunk` tokens at a time gives the same result; with every tile under non-reentrant checkpoint those activations
exist for one tile at a time, in forward and in backward (the tile is recomputed there, as in the mini-sequence
transformer). The cost is one extra MLP forward per layer. Parameters, LoRA adapters on gate/up/down included,
still get their gradients: checkpoint recomputes through the module itself, and it preserves the RNG state, so
LoRA dropout masks match between the forward and the recompute.

Imports torch only inside functions; the patched models belong to the train process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_UNTILED = "_hyperjob_untiled_forward"  # the MLP's own forward, kept on the module so patching twice re-tiles it


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Llama-style MLP (LlamaMLP, Qwen2MLP, MistralMLP...): class name ends with MLP, has gate/up/down projections.

    Both conditions, so attention blocks, MoE blocks (whose experts are not token-wise per module) and projections
    named alike elsewhere are left alone.
    """
    import torch

    return type(module).__name__.endswith("MLP") and all(
        isinstance(getattr(module, name, None), torch.nn.Module) for name in PROJECTIONS
    )


def _tiled_forward(forward: Callable[[torch.Tensor], torch.Tensor], chunk: int, x: torch.Tensor) -> torch.Tensor:
    """forward(x) computed `chunk` tokens at a time (the last tile is the remainder), each tile checkpointed."""
    import torch
    from torch.utils.checkpoint import checkpoint

    tokens = x.reshape(-1, x.shape[-1])
    tiles = []
    for start in range(0, tokens.shape[0], chunk):
        tile = tokens[start : start + chunk]
        tiles.append(checkpoint(forward, tile, use_reentrant=False) if torch.is_grad_enabled() else forward(tile))
    if not tiles:  # no tokens at all
        return forward(x)
    out = torch.cat(tiles)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def tile_mlp(model: torch.nn.Module, chunk: int) -> int:
    """Make every gated MLP in `model` (also under a peft wrapper) run tiled; returns how many were patched.

    Patching again only changes the tile size: the MLP's own forward is kept and wrapped once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    patched = 0
    for module in model.modules():
        if not is_gated_mlp(module):
            continue
        untiled = module.__dict__.get(_UNTILED) or module.forward
        module.__dict__[_UNTILED] = untiled
        module.forward = functools.partial(_tiled_forward, untiled, chunk)
        patched += 1
    return patched
