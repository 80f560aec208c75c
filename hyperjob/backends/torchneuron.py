"""Backend `torchneuron`: TorchNeuron, native PyTorch on device "neuron" (Neuron 2.33+, public beta; trn2, trn3).

The XLA stack behind backend `neuron` reached end-of-support in Neuron 2.32; TorchNeuron is its successor, a
PrivateUse1 device that runs ordinary torch.distributed code. So this backend reuses the cpu/cuda train entry
(transformers Trainer + peft) and only says what differs: device "neuron" bound per rank by
`hyperjob.stages.device` (after `import torch_neuronx` and the "neuron" process group, which must come before the
Neuron runtime starts), one process per logical NeuronCore, bf16, DDP or FSDP2, eager by default
(`training.torch_compile` compiles with the neuron backend), no compile stage, its own pinned venv
(`neuron_env.TORCHNEURON`), and the compiled-graph cache on the shared filesystem. trn1 and trn1n are refused:
TorchNeuron does not run on NeuronCore-v2; backend `neuron` does.
"""

from __future__ import annotations

from hyperjob.backends.base import TRAIN_GROUP, Backend, Runtime
from hyperjob.backends.catalogue import InstanceType
from hyperjob.backends.neuron_env import TORCHNEURON
from hyperjob.backends.parallel_modes import mode_environment
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import compile_cache_dir
from hyperjob.stage_table import StageSpec

XLA_ONLY_FAMILIES = ("trn1", "trn1n")  # NeuronCore-v2: the PyTorch/XLA stack (backend neuron) only


def efa_env() -> list[tuple[str, str]]:
    """Collectives between nodes over EFA (libfabric), as on every Trainium cluster."""
    return [("FI_PROVIDER", "efa"), ("FI_EFA_USE_DEVICE_RDMA", "1"), ("FI_EFA_FORK_SAFE", "1")]


class TorchNeuronBackend(Backend):
    name = "torchneuron"
    accelerator = "neuron"
    default_stages = ("download", "train", "merge", "evaluate")
    parallel_modes = frozenset({"ddp", "fsdp2"})
    environment = TORCHNEURON
    runtime = Runtime(device="neuron", distributed="neuron", bf16=True, device_module="torch_neuronx")

    def instance_problem(self, inst: InstanceType) -> str | None:
        if inst.name.partition(".")[0] in XLA_ONLY_FAMILIES:
            return (
                f"{inst.name} has NeuronCore-v2, where TorchNeuron does not run (trn2 and trn3 only); "
                "train on it with backend: neuron (optimum-neuron, PyTorch/XLA), or pick a trn2 instance type"
            )
        return None

    def env(self, cfg: HyperjobConfig, stage: StageSpec) -> list[tuple[str, str]]:
        env = super().env(cfg, stage)
        if stage.group == TRAIN_GROUP:
            t = cfg.training
            env += sorted(mode_environment(cfg.parallel.mode, activation_offload=t.activation_offload).items())
            # Compiled graphs (torch.compile, and the eager ops TorchNeuron compiles) on the shared filesystem:
            # the default /tmp/neff_cache is per node and lost with it.
            env.append(("TORCH_NEURONX_NEFF_CACHE_DIR", str(compile_cache_dir(cfg) / "torchneuron")))
        return env + efa_env() if stage.distributed else env


BACKEND = TorchNeuronBackend()
