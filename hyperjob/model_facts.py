"""What the planner and the backends' layout rules need to know about a model: head counts and positions.

Known before anything is downloaded: config overrides, then a local model's config.json, then a built-in
table of well-known models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig


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
