"""Instance catalogue: what one node of each type offers to a training job.

`devices` is the number of training processes per node: NeuronCores for
Trainium (logical cores on trn2, where LNC=2 pairs physical cores), GPUs for
NVIDIA instances.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    """`accelerator` names the kind of device (neuron, cuda, cpu); a backend runs on instances of its kind."""

    name: str
    accelerator: str
    devices: int
    device_name: str
    default_tp: int = 1


def _family(prefix: str, sizes: dict[str, int], device: str) -> dict[str, InstanceType]:
    return {f"{prefix}.{size}": InstanceType(f"{prefix}.{size}", "cuda", n, device) for size, n in sizes.items()}


_G_SIZES = {
    "xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1,
    "12xlarge": 4, "24xlarge": 4, "48xlarge": 8,
}  # fmt: skip

CATALOGUE: dict[str, InstanceType] = {
    "trn1.2xlarge": InstanceType("trn1.2xlarge", "neuron", 2, "NeuronCore-v2", default_tp=2),
    "trn1.32xlarge": InstanceType("trn1.32xlarge", "neuron", 32, "NeuronCore-v2", default_tp=8),
    "trn1n.32xlarge": InstanceType("trn1n.32xlarge", "neuron", 32, "NeuronCore-v2", default_tp=8),
    "trn2.3xlarge": InstanceType("trn2.3xlarge", "neuron", 4, "NeuronCore-v3 (LNC=2)", default_tp=4),
    "trn2.48xlarge": InstanceType("trn2.48xlarge", "neuron", 64, "NeuronCore-v3 (LNC=2)", default_tp=4),
    "p4d.24xlarge": InstanceType("p4d.24xlarge", "cuda", 8, "A100 40GB"),
    "p4de.24xlarge": InstanceType("p4de.24xlarge", "cuda", 8, "A100 80GB"),
    "p5.48xlarge": InstanceType("p5.48xlarge", "cuda", 8, "H100 80GB"),
    "p5e.48xlarge": InstanceType("p5e.48xlarge", "cuda", 8, "H200 141GB"),
    "p5en.48xlarge": InstanceType("p5en.48xlarge", "cuda", 8, "H200 141GB"),
    **_family("g5", _G_SIZES, "A10G 24GB"),
    **_family("g6", _G_SIZES, "L4 24GB"),
    "cpu": InstanceType("cpu", "cpu", 2, "CPU process"),
}


def normalise(name: str) -> str:
    """SageMaker spells instance types with an `ml.` prefix; both spellings mean the same node."""
    return name.removeprefix("ml.")


def lookup(name: str) -> InstanceType | None:
    return CATALOGUE.get(normalise(name))


def natural_key(name: str) -> tuple[list[tuple[int, str]], int, str]:
    """Family by its numbers (p4d before p5, trn1 before trn1n before trn2), then size (xlarge, 2xlarge, 32xlarge)."""
    family, _, size = name.partition(".")
    parts = [(int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", family) if t]
    match = re.fullmatch(r"(\d*)xlarge", size)
    return parts, int(match.group(1) or 1) if match else 0, size


def known_names() -> list[str]:
    """The instance types, in the order a reader expects (trn1.2xlarge before trn1.32xlarge)."""
    return sorted(CATALOGUE, key=natural_key)
