"""Replica drift: tensors every tensor-parallel rank should hold identically, compared across ranks.

LoRA A of column-parallel layers, LoRA B of row-parallel layers, norms, embedding LoRA and the kv_size_multiplier
copies of K/V heads are replicated. With sequence parallelism their gradients are not reduced over the TP group, so
the copies can drift apart; consolidating from rank 0 alone would then silently drop what the other ranks learned.

Threshold: replicas that did not drift are bit-identical (same initial values, same reduced gradients, same
deterministic kernels), so any difference is real drift, not rounding noise. The default tolerance,
`DEFAULT_DRIFT_THRESHOLD` = 1e-6 of the copy's largest magnitude, sits a few fp32 ulps above zero (fp32 eps is
1.2e-7) and far below one bf16 ulp (3.9e-3): it forgives at most last-bit disagreement of fp32 tensors and flags
any bf16 drift of the larger entries. Every nonzero difference is reported whatever the threshold.

Above the threshold consolidation fails unless `allow_drift` is set; then the fp32 mean of the copies (cast back to
the saved dtype) is used: each rank's shard was trained against its own copy, and the mean is the single tensor
with the least total error over the ranks when their deviations are alike; optimum-neuron likewise averages the
q/k/v LoRA A matrices when it fuses them. Below the threshold rank 0's copy is used unchanged (bit-exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hyperjob.checkpoint.errors import ReplicaDriftError

DEFAULT_DRIFT_THRESHOLD = 1e-6


@dataclass(frozen=True)
class DriftEntry:
    name: str
    copies: int
    max_abs_diff: float
    relative: float  # max_abs_diff / max |copy 0|; inf when copy 0 is all zeros and the others are not


def replica_difference(copies: list[torch.Tensor]) -> tuple[float, float]:
    """(largest absolute difference from copy 0, that difference relative to copy 0's largest magnitude)."""
    ref = copies[0].float()
    diff = max((float((c.float() - ref).abs().max()) for c in copies[1:] if c.numel()), default=0.0)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if diff == 0.0:
        return 0.0, 0.0
    return diff, diff / scale if scale > 0 else math.inf


def mean_of(copies: list[torch.Tensor]) -> torch.Tensor:
    """fp32 mean of the copies, in the copies' dtype."""
    return torch.stack([c.float() for c in copies]).mean(dim=0).to(copies[0].dtype)


@dataclass
class DriftReport:
    """Every replicated tensor compared, with its largest difference; `exceeding` lists those over the threshold."""

    threshold: float = DEFAULT_DRIFT_THRESHOLD
    allow_drift: bool = False
    entries: list[DriftEntry] = field(default_factory=list)

    def check(self, name: str, copies: list[torch.Tensor]) -> torch.Tensor | None:
        """Record the comparison; the tensor to use instead of copy 0 (the mean) when drift is allowed and over."""
        if len(copies) < 2:
            return None
        diff, rel = replica_difference(copies)
        self.entries.append(DriftEntry(name, len(copies), diff, rel))
        return mean_of(copies) if rel > self.threshold and self.allow_drift else None

    @property
    def max_abs_diff(self) -> float:
        return max((e.max_abs_diff for e in self.entries), default=0.0)

    @property
    def worst(self) -> DriftEntry | None:
        return max(self.entries, key=lambda e: (e.relative, e.max_abs_diff), default=None)

    def drifted(self) -> list[DriftEntry]:
        return sorted((e for e in self.entries if e.max_abs_diff > 0), key=lambda e: -e.relative)

    def exceeding(self) -> list[DriftEntry]:
        return [e for e in self.drifted() if e.relative > self.threshold]

    def summary(self, limit: int = 10) -> str:
        drifted = self.drifted()
        head = (
            f"{len(self.entries)} replicated tensors compared, {len(drifted)} differ across ranks, "
            f"{len(self.exceeding())} above relative threshold {self.threshold:g}; "
            f"largest abs diff {self.max_abs_diff:.3g}"
        )
        lines = [
            f"  {e.name}: max abs diff {e.max_abs_diff:.3g} (relative {e.relative:.3g}, {e.copies} copies)"
            for e in drifted[:limit]
        ]
        more = [f"  ... and {len(drifted) - limit} more"] if len(drifted) > limit else []
        return "\n".join([head, *lines, *more])

    def raise_if_exceeded(self) -> None:
        if self.exceeding() and not self.allow_drift:
            raise ReplicaDriftError(
                "replicated tensors differ across tensor-parallel ranks (typically sequence parallelism, whose "
                "replicated-weight gradients are not reduced over the TP group). Allow drift to use the fp32 mean "
                "of the copies (hyperjob consolidate --allow-drift; config consolidate.allow_drift), or raise the "
                "threshold.\n" + self.summary()
            )
