"""What the planner and the backends' layout rules need to know about a model: head counts, positions and sizes.

Known before anything is downloaded: config overrides, then a local model's config.json, then a built-in
table of well-known models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from hyperjob.config.load import ConfigError
from hyperjob.config.models import HyperjobConfig


@dataclass(frozen=True)
class ModelFacts:
    """Head counts (layout rules), positions (seq_len), and sizes (the planner's activation-memory estimate)."""

    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None

    @property
    def sized(self) -> bool:
        return None not in (self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size)


_L3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 128256}


# Facts of well-known models, so `plan` works before anything is downloaded.
KNOWN_MODELS: dict[str, ModelFacts] = {
    "tiny-llama": ModelFacts(4, 2, 512, 64, 128, 2),
    "meta-llama/Meta-Llama-3-8B": ModelFacts(32, 8, 8192, **_L3_8B),
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelFacts(32, 8, 8192, **_L3_8B),
    "meta-llama/Llama-3.1-8B": ModelFacts(32, 8, 131072, **_L3_8B),
    "meta-llama/Llama-3.1-8B-Instruct": ModelFacts(32, 8, 131072, **_L3_8B),
    "meta-llama/Llama-3.2-1B": ModelFacts(32, 8, 131072, 2048, 8192, 16, 128256),
    "meta-llama/Llama-3.2-3B": ModelFacts(24, 8, 131072, 3072, 8192, 28, 128256),
    "meta-llama/Meta-Llama-3-70B": ModelFacts(64, 8, 8192, 8192, 28672, 80, 128256),
    "meta-llama/Llama-2-7b-hf": ModelFacts(32, 32, 4096, 4096, 11008, 32, 32000),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ModelFacts(32, 4, 2048, 2048, 5632, 22, 32000),
    "mistralai/Mistral-7B-v0.1": ModelFacts(32, 8, 32768, 4096, 14336, 32, 32000),
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
            sizes = {k: data.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
            found = ModelFacts(
                heads, int(data.get("num_key_value_heads") or heads), data.get("max_position_embeddings"), **sizes
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError([("model.id", f"{local} is not a usable model config: {e}")]) from None
    if m.num_attention_heads is not None:
        heads = m.num_attention_heads
        kv = m.num_key_value_heads or (found.num_key_value_heads if found else heads)
        pos = m.max_position_embeddings or (found.max_position_embeddings if found else None)
        if found is None:
            return ModelFacts(heads, kv, pos)
        return replace(found, num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=pos)
    if found is not None and (m.num_key_value_heads or m.max_position_embeddings):
        return replace(
            found,
            num_key_value_heads=m.num_key_value_heads or found.num_key_value_heads,
            max_position_embeddings=m.max_position_embeddings or found.max_position_embeddings,
        )
    return found
