"""Model-config overrides for context extension (RoPE base, positions), for training and the merged model alike.

Why one module: the model trains with a raised RoPE base, so the merged model must carry the same base or it
serves with the positions it was not tuned for. transformers 4.x keeps the base at `config.rope_theta`; 5.x keeps
it in `config.rope_parameters["rope_theta"]` (and still reads a top-level `rope_theta` from old files): the override
is written wherever the config has it. Pure apart from the config object it is handed; no torch import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hyperjob.config.models import HyperjobConfig
from hyperjob.model_facts import ModelFacts

ROPE_THETA = "rope_theta"
MAX_POSITIONS = "max_position_embeddings"


def config_overrides(cfg: HyperjobConfig, facts: ModelFacts | None) -> dict[str, Any]:
    """What to change in the base model's config: the RoPE base, and the positions when seq_len goes past them."""
    theta = cfg.model.rope_theta
    if theta is None:
        return {}
    out: dict[str, Any] = {ROPE_THETA: theta}
    max_pos = facts.max_position_embeddings if facts else None
    if max_pos is None or cfg.training.seq_len > max_pos:
        out[MAX_POSITIONS] = cfg.training.seq_len
    return out


def apply_to_dict(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json's content with the overrides applied (a new dict; the input is not changed)."""
    out = dict(config)
    for key, value in overrides.items():
        if key == ROPE_THETA and isinstance(out.get("rope_parameters"), Mapping):
            out["rope_parameters"] = {**out["rope_parameters"], ROPE_THETA: value}
            if ROPE_THETA not in out:
                continue
        out[key] = value
    return out


def apply_to_config(config: Any, overrides: Mapping[str, Any]) -> None:
    """Apply the overrides to a transformers PretrainedConfig in place, before the model is built from it."""
    for key, value in overrides.items():
        params = getattr(config, "rope_parameters", None)
        if key == ROPE_THETA and isinstance(params, dict):
            params[ROPE_THETA] = value
            if not hasattr(config, ROPE_THETA):
                continue
        setattr(config, key, value)
