"""Backend `cpu`: torchrun with gloo on plain CPU processes, for trying things out and for the tests."""

from __future__ import annotations

from hyperjob.backends.base import Backend, Runtime
from hyperjob.backends.catalogue import InstanceType
from hyperjob.config.models import HyperjobConfig


class CpuBackend(Backend):
    name = "cpu"
    accelerator = "cpu"
    parallelism = frozenset({"sequence"})  # Ulysses over gloo: slow, but the same numerics as on GPUs
    runtime = Runtime(device="cpu", distributed="gloo", bf16=False)

    def processes_per_node(self, cfg: HyperjobConfig, inst: InstanceType) -> int:
        """Processes, not devices: any count a machine can hold (default 2)."""
        return cfg.cluster.devices_per_node or inst.devices


BACKEND = CpuBackend()
