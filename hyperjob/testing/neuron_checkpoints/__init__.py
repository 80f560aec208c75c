"""Synthetic optimum-neuron 0.4.5 tensor-parallel checkpoints, for tests and benchmarks.

A second, independent reading of the upstream rules (hyperjob/checkpoint/FORMAT.md), so the reader is not tested
against itself: `writer` writes checkpoints and the consolidation they should give, `model` walks the Llama
parameter list, `layout` holds the TP partitioning and GQA rules.
"""

from hyperjob.testing.neuron_checkpoints.layout import PROJECTIONS
from hyperjob.testing.neuron_checkpoints.writer import (
    default_adapter_config,
    expected_consolidation,
    llama3_8b_config,
    random_full_state,
    random_lora_state,
    tiny_llama_config,
    write_legacy_layout,
    write_neuron_checkpoint,
)

__all__ = [
    "PROJECTIONS",
    "default_adapter_config",
    "expected_consolidation",
    "llama3_8b_config",
    "random_full_state",
    "random_lora_state",
    "tiny_llama_config",
    "write_legacy_layout",
    "write_neuron_checkpoint",
]
