"""Backend `cuda`: torchrun DDP over NCCL, one process per GPU of the instance type."""

from __future__ import annotations

from hyperjob.backends.base import Backend, Runtime
from hyperjob.config.models import HyperjobConfig
from hyperjob.stage_table import StageSpec


class CudaBackend(Backend):
    name = "cuda"
    accelerator = "cuda"
    runtime = Runtime(device="cuda", distributed="nccl", bf16=True, pad_to_multiple_of=8, load_on_local_rank=True)

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        env = super().env(cfg, stage)
        if stage.distributed:
            # NCCL errors end the job instead of hanging it until the time limit.
            env += [("NCCL_DEBUG", "WARN"), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")]
        return env


BACKEND = CudaBackend()
