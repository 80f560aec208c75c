"""Which device one training process uses, for backends whose device accelerate does not bind itself.

cpu and cuda need nothing here: accelerate binds each CUDA rank to `local_rank % device_count`. An out-of-tree
(PrivateUse1) device such as TorchNeuron's "neuron" is different: accelerate reads `torch.neuron.current_device()`
without setting it. So, for a Runtime with a `device_module`, this module imports that package (which registers
the device), starts the process group with the runtime's collective backend first (TorchNeuron's runtime must not
start before it, and its init pins the rank's logical NeuronCore), then binds the rank to
`local_rank % device_count()`: 0 when the runtime shows each process one core, the local rank when it shows all.
The Trainer then finds the group initialised and the device set.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from hyperjob.backends.base import Runtime
from hyperjob.stages.common import StageError

if TYPE_CHECKING:
    import torch


def bind(runtime: Runtime, *, local_rank: int | None = None, world_size: int | None = None) -> torch.device | None:
    """Bind this process to its device when the runtime needs it (see the module docstring); None otherwise."""
    if runtime.device_module is None:
        return None
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    try:
        importlib.import_module(runtime.device_module)
    except ImportError as e:
        raise StageError(
            f"device {runtime.device!r} needs the {runtime.device_module} package, which this interpreter cannot "
            f"import ({e}); run training from the environment `hyperjob env CONFIG` builds"
        ) from None
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=runtime.distributed)
    module: Any = getattr(torch, runtime.device, None)
    if module is None or not module.is_available():
        raise StageError(f"{runtime.device_module} is installed but torch sees no {runtime.device!r} device here")
    index = local_rank % module.device_count()
    module.set_device(index)
    return torch.device(runtime.device, index)
