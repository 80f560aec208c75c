"""Did LoRA apply? Count the trainable parameters of a wrapped model and refuse the two silent failures.

Upstream has shipped runs that trained every weight (8.03B trainable: optimum-neuron #821) or none; both look
like training in the log. Every train entry calls this after wrapping the model, before the first step.
"""

from __future__ import annotations

from typing import Any

from hyperjob.stages.common import StageError


def check_lora_applied(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts of `model`; StageError when none or all of them are trainable."""
    trainable = total = 0
    for param in model.parameters():
        n = int(param.numel())
        total += n
        if param.requires_grad:
            trainable += n
    if trainable == 0:
        raise StageError(f"LoRA did not apply: 0 of {total:,} parameters are trainable (check lora.target_modules)")
    if trainable == total:
        raise StageError(
            f"LoRA did not apply: all {total:,} parameters are trainable, so this would be full fine-tuning "
            "(the base weights were not frozen)"
        )
    return trainable, total
