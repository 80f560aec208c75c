"""Import stubs that let the REAL optimum-neuron 0.4.5 training classes run on a CPU machine.

optimum-neuron imports torch_xla, torch_neuronx and neuronx_distributed (NxD) at module level, and those come only
from the Neuron pip index. The stubs below stand in for exactly what the training side touches: enough to import
`optimum.neuron`, construct `NeuronSFTConfig`, load the training `LlamaForCausalLM` at TP=1 (or build it from a
config at a faked TP) and wrap it with LoRA. Nothing here computes anything parallel; a test that needs a device
forward pass does not belong here (upstream hard-codes device="xla" in the attention mask).

Order matters: `install()` must run before anything imports optimum or accelerate (accelerate decides at import
time that torch_xla is available, as it would on a Trainium node). Each stub module has a real `__spec__` because
upstream probes them with importlib.util.find_spec.

This file runs inside the optimum-neuron venv (python 3.11); the main venv never imports it.
"""

from __future__ import annotations

import datetime
import enum
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "install", "register_xla_backend", "reset_parallel_state"]

# The faked NxD topology. `world` is the number of ranks the job would have (torch.distributed itself has one);
# tp/pp are None until initialize_model_parallel runs, as in NxD.
_STATE: dict[str, int | None] = {"world": 1, "tp": None, "pp": None}


def _module(name: str, doc: str, **attrs: Any) -> types.ModuleType:
    """A module with a spec (find_spec must succeed), registered in sys.modules and on its parent package."""
    mod = types.ModuleType(name, doc)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__path__ = []  # a package, so submodule imports resolve through sys.modules
    for key, value in attrs.items():
        setattr(mod, key, value)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:  # else the import system binds it when the real parent package is imported
        setattr(sys.modules[parent], child, mod)
    return mod


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _identity(x: Any, *_args: Any, **_kwargs: Any) -> Any:
    return x


# --- neuronx_distributed.parallel_layers.parallel_state ---------------------------------------------------------------
# TrainingNeuronConfig.__post_init__ calls initialize_model_parallel once and then reads the sizes back; the model
# classes read the TP size/rank to size their layers.


def _sizes() -> tuple[int, int]:
    """(tp, pp); (1, 1) before set-up. NxD would assert there, but upstream only asks that early (for its log
    level, before TrainingNeuronConfig runs) because we initialise torch.distributed ahead of it; under torchrun
    that check returns early instead."""
    return _STATE["tp"] or 1, _STATE["pp"] or 1


def _initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, **_kwargs: Any
) -> None:
    world = _STATE["world"] or 1
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world % (tp * pp) != 0:  # NxD refuses this layout the same way
        raise RuntimeError(f"world_size ({world}) is not divisible by tp ({tp}) x pp ({pp})")
    _STATE.update(tp=tp, pp=pp)


def _destroy_model_parallel() -> None:
    _STATE.update(tp=None, pp=None)


def _tp_size() -> int:
    return _sizes()[0]


def _pp_size() -> int:
    return _sizes()[1]


def _dp_size() -> int:
    tp, pp = _sizes()
    return (_STATE["world"] or 1) // (tp * pp)


def _world_group(*_args: Any, **_kwargs: Any) -> Any:
    return dist.group.WORLD


def _replica_groups(size_getter: Callable[[], int]) -> Callable[..., list[list[int]]]:
    return lambda *_a, **_k: [list(range(size_getter()))]


def _install_parallel_state() -> types.ModuleType:
    return _module(
        "neuronx_distributed.parallel_layers.parallel_state",
        "Fake NxD topology: this process is rank 0 of every group; the world size is set by reset_parallel_state.",
        initialize_model_parallel=_initialize_model_parallel,
        destroy_model_parallel=_destroy_model_parallel,
        model_parallel_is_initialized=lambda: _STATE["tp"] is not None,
        get_tensor_model_parallel_size=_tp_size,
        get_pipeline_model_parallel_size=_pp_size,
        get_data_parallel_size=_dp_size,
        get_context_model_parallel_size=lambda: 1,
        get_tensor_model_parallel_rank=lambda: 0,
        get_pipeline_model_parallel_rank=lambda: 0,
        get_data_parallel_rank=lambda: 0,
        get_tensor_model_parallel_group=_world_group,
        get_pipeline_model_parallel_group=_world_group,
        get_data_parallel_group=_world_group,
        get_tensor_model_parallel_replica_groups=_replica_groups(_tp_size),
        get_pipeline_model_parallel_replica_groups=_replica_groups(_pp_size),
        get_data_parallel_replica_groups=_replica_groups(_dp_size),
    )


def reset_parallel_state(world: int, tp: int | None = None, pp: int = 1) -> None:
    """Fake an NxD world of `world` ranks. With tp=None the state is left uninitialised, so the next
    TrainingNeuronConfig sets it up from its own arguments: upstream skips that set-up when a state exists, so
    without this a second config in one process silently keeps the first one's TP size."""
    _STATE.update(world=world, tp=None, pp=None)
    if tp is not None:
        _initialize_model_parallel(tp, pp)


# --- neuronx_distributed.parallel_layers.layers / .utils / modules.qkv_linear -----------------------------------------
# The training Llama builds its projections from these. Each holds this rank's shard as a plain weight carrying the
# tensor-parallel attributes upstream reads when loading and when building LoRA layers (TP=1: the whole weight).


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _shard_param(shape: Sequence[int], dtype: Any, partition_dim: int, stride: int = 1) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=_dtype(dtype)))
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride
    param.num_partitions = _tp_size()
    return param


def _init(param: nn.Parameter, init_method: Callable[[torch.Tensor], Any] | None) -> None:
    with torch.no_grad():
        (init_method or nn.init.xavier_normal_)(param)


class BaseParallelLinear(nn.Module):
    """Stands in for NxD's base class: LoRA's layer dispatch and save_and_load test isinstance against it."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, input_size: int, output_size: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.sequence_parallel_enabled = kwargs.get("sequence_parallel_enabled", False)
        self.sequence_dimension = kwargs.get("sequence_dimension")
        self.tensor_parallel_group = kwargs.get("tensor_model_parallel_group")
        self.dtype = _dtype(kwargs.get("dtype"))
        self.arg_init_method = kwargs.get("init_method")

    def initialize_weight_and_bias(self) -> None:
        """from_pretrained calls this on parallel layers the checkpoint does not cover."""
        _init(self.weight, self.arg_init_method)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class ColumnParallelLinear(BaseParallelLinear):
    """Output dimension sharded over TP (partition_dim 0)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        stride: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_size, output_size, kwargs)
        self.gather_output = gather_output
        self.weight = _shard_param((_divide(output_size, _tp_size()), input_size), self.dtype, 0, stride)
        self.bias = _shard_param((self.weight.shape[0],), self.dtype, 0, stride) if bias else None
        self.initialize_weight_and_bias()


class RowParallelLinear(BaseParallelLinear):
    """Input dimension sharded over TP (partition_dim 1)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(input_size, output_size, kwargs)
        self.input_is_parallel = input_is_parallel
        self.weight = _shard_param((output_size, _divide(input_size, _tp_size())), self.dtype, 1)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=self.dtype)) if bias else None
        self.initialize_weight_and_bias()


class ParallelEmbedding(nn.Module):
    """Vocabulary sharded over TP; LoRA's layer dispatch maps it to its own embedding layer."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.sequence_parallel_enabled = kwargs.get("sequence_parallel_enabled", False)
        self.sequence_dim = kwargs.get("sequence_dimension", 0)
        self.weight = _shard_param((_divide(num_embeddings, _tp_size()), embedding_dim), kwargs.get("dtype"), 0)
        _init(self.weight, kwargs.get("init_method"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx)


class GQAQKVColumnParallelLinear(BaseParallelLinear):
    """The fused q/k/v projection the training Llama uses when KV heads < TP (KV heads repeated
    kv_size_multiplier times). Holds weight_qkv, or weight_q/k/v when not fused, per rank."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = True,
        gather_output: bool = True,
        kv_size_multiplier: int = 1,
        fuse_qkv: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_size, output_sizes[0], kwargs)
        self.output_sizes = list(output_sizes)
        self.gather_output, self.kv_size_multiplier, self.fuse_qkv = gather_output, kv_size_multiplier, fuse_qkv
        tp = _tp_size()
        self.q_output_size_per_partition = _divide(output_sizes[0], tp)
        self.kv_output_size_per_partition = _divide(output_sizes[1] * kv_size_multiplier, tp)
        sizes = {"q": self.q_output_size_per_partition, "k": self.kv_output_size_per_partition}
        sizes["v"] = sizes["k"]
        if fuse_qkv:
            self.weight_qkv = _shard_param((sum(sizes.values()), input_size), self.dtype, 0)
            _init(self.weight_qkv, self.arg_init_method)
        else:
            for name, rows in sizes.items():
                setattr(self, f"weight_{name}", _shard_param((rows, input_size), self.dtype, 0))
                _init(getattr(self, f"weight_{name}"), self.arg_init_method)
        if bias:
            raise NotImplementedError("stub GQAQKVColumnParallelLinear: bias is not needed by the training Llama")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        if self.fuse_qkv:
            q_rows, kv_rows = self.q_output_size_per_partition, self.kv_output_size_per_partition
            return tuple(nn.functional.linear(x, self.weight_qkv).split([q_rows, kv_rows, kv_rows], dim=-1))
        return tuple(nn.functional.linear(x, getattr(self, f"weight_{n}")) for n in "qkv")


def _create_local_weight(
    full_weight: torch.Tensor, partition_dim: int, per_partition_size: int, stride: int, out_weight: Any = None
) -> torch.Tensor:
    """This rank's shard of a full weight: the chunks of size per_partition_size/stride taken round-robin
    (so a stride-2 fused gate/up weight keeps half of gate and half of up on each rank)."""
    chunks = torch.split(full_weight, _divide(per_partition_size, stride), dim=partition_dim)
    mine = chunks[0 :: _tp_size()]  # this process is TP rank 0
    with torch.no_grad():
        return torch.cat(mine, dim=partition_dim, out=out_weight)


class _EmbeddingUtility:
    """Used by upstream's parallel cross-entropy only (never reached on CPU)."""


def _install_layers() -> None:
    _module(
        "neuronx_distributed.parallel_layers.layers",
        "Parallel linear/embedding layers as plain modules holding rank 0's shard.",
        BaseParallelLinear=BaseParallelLinear,
        ColumnParallelLinear=ColumnParallelLinear,
        RowParallelLinear=RowParallelLinear,
        ParallelEmbedding=ParallelEmbedding,
        create_local_weight=_create_local_weight,
    )
    _module(
        "neuronx_distributed.parallel_layers.utils",
        "from_pretrained asks for the local world size; the Llama layers divide head counts by TP.",
        divide=_divide,
        get_local_world_size=lambda: 1,
        move_model_to_device=_noop,
        move_all_tensor_to_cpu=_identity,
        EmbeddingUtility=_EmbeddingUtility,
    )
    _module(
        "neuronx_distributed.parallel_layers.mappings",
        "Collectives around sequence/tensor parallel regions: identities with one rank.",
        gather_from_sequence_parallel_region=_identity,
        scatter_to_sequence_parallel_region=_identity,
        reduce_from_tensor_model_parallel_region=_identity,
    )
    _module(
        "neuronx_distributed.parallel_layers.grads",
        "Gradient all-reduce and clipping used by the Neuron optimizer wrapper (never called here).",
        bucket_allreduce_gradients=_noop,
        clip_grad_norm=_noop,
    )
    _module("neuronx_distributed.modules", "Package of NxD modules.")
    _module(
        "neuronx_distributed.modules.qkv_linear",
        "The GQA q/k/v projection the training Llama builds when KV heads < TP.",
        GQAQKVColumnParallelLinear=GQAQKVColumnParallelLinear,
    )


# --- the rest of neuronx_distributed: names imported at module level by optimum.neuron --------------------------------


class NxDPPModel(nn.Module):
    """Pipeline-parallel wrapper; optimum subclasses it and tests isinstance against it."""


class NeuronZero1Optimizer:
    """ZeRO-1 optimizer; imported by optimum's accelerator and optimizer wrappers."""


class HFTracerWrapper:
    """Pipeline tracer; optimum subclasses it for its FX tracer."""


class NxDTracer:
    """Pipeline tracer whose is_leaf_module optimum calls (only when tracing a pipeline)."""


class LogicalNCConfig(enum.Enum):
    """Logical NeuronCore configuration read by the trainer's metrics collector."""

    LNC_1 = 1
    LNC_2 = 2


def _install_nxd_rest() -> None:
    _module("neuronx_distributed.kernels", "Package of NKI kernels.")
    _module(
        "neuronx_distributed.kernels.flash_attn",
        "NKI flash attention: registered as an attention implementation, only called on a device.",
        nki_flash_attn_func=_noop,
    )
    _module("neuronx_distributed.optimizer", "ZeRO-1 optimizer.", NeuronZero1Optimizer=NeuronZero1Optimizer)
    _module("neuronx_distributed.pipeline", "Pipeline parallelism.", NxDPPModel=NxDPPModel)
    _module(
        "neuronx_distributed.pipeline.partition",
        "Imported by upstream's parameter count (print_trainable_parameters); only used for an NxDPPModel.",
        analyze_shared_weights_across_stages=lambda *_a, **_k: [],
    )
    _module(
        "neuronx_distributed.pipeline.trace",
        "Pipeline FX tracing (pipeline_utils subclasses the tracer).",
        HFTracerWrapper=HFTracerWrapper,
        NxDTracer=NxDTracer,
        trace_model=_noop,
    )
    _module("neuronx_distributed.utils", "Package of NxD utilities.")
    _module(
        "neuronx_distributed.utils.model_utils",
        "Platform queries for the metrics collector; device placement for the accelerator.",
        LogicalNCConfig=LogicalNCConfig,
        get_platform_lnc=lambda: LogicalNCConfig.LNC_1,
        move_model_to_device=_noop,
    )


# --- torch_xla --------------------------------------------------------------------------------------------------------
# accelerate and optimum import xla_model/runtime at module level; xm.xla_device() is the CPU here.


# optimum's init_process_group (under torchrun only) checks the WORLD group against this class: here any process
# group counts, so it never initialises a second default group over the one init_distributed made.
ProcessGroupXla = dist.ProcessGroup


class MpDeviceLoader:
    """Device data loader wrapper imported by optimum's accelerator."""

    def __init__(self, loader: Any, device: Any, **_kwargs: Any) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Any:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _install_torch_xla() -> None:
    _module("torch_xla", "PyTorch/XLA: only the pieces optimum and accelerate import.", __version__="2.8.0", sync=_noop)
    _module("torch_xla.core", "Package.")
    _module(
        "torch_xla.core.xla_model",
        "Device and collectives of one process on the CPU.",
        xla_device=lambda *_a, **_k: torch.device("cpu"),
        get_xla_supported_devices=lambda *_a, **_k: ["xla:0"],
        get_local_ordinal=lambda: 0,
        get_ordinal=lambda: 0,
        is_master_ordinal=lambda local=True: True,
        mark_step=_noop,
        rendezvous=_noop,
        set_replication=_noop,
        add_step_closure=lambda fn, args=(), **_k: fn(*args),
        all_reduce=lambda _op, inputs, *_a, **_k: inputs,
        all_gather=_identity,
        save=lambda obj, path, *_a, **_k: torch.save(obj, path),
        REDUCE_SUM="sum",
    )
    _module(
        "torch_xla.runtime",
        "Runtime queries: the faked NxD world, rank 0.",
        world_size=lambda: _STATE["world"] or 1,
        global_ordinal=lambda: 0,
        local_ordinal=lambda: 0,
        device_type=lambda: "NEURON",
    )
    _module("torch_xla.distributed", "Package.")
    _module("torch_xla.distributed.parallel_loader", "Device loader.", MpDeviceLoader=MpDeviceLoader)
    _module("torch_xla.distributed.xla_backend", "The 'xla' process group class.", ProcessGroupXla=ProcessGroupXla)
    _module("torch_xla.distributed.xla_multiprocessing", "Imported by accelerate.", spawn=_noop)
    _module("torch_xla.utils", "Package.")
    _module(
        "torch_xla.utils.checkpoint",
        "Activation checkpointing: torch's own does the same on the CPU.",
        checkpoint=torch.utils.checkpoint.checkpoint,
    )


# --- torch_neuronx ----------------------------------------------------------------------------------------------------


def _install_torch_neuronx() -> None:
    _module(
        "torch_neuronx",
        "Neuron tracing: optimum.neuron.utils.misc imports DataParallel when torch_neuronx is importable.",
        __version__="2.8.0",
        DataParallel=type("DataParallel", (nn.Module,), {}),
        move_trace_to_device=_noop,
    )
    _module("torch_neuronx.utils", "Platform query for the metrics collector.", get_platform_target=lambda: "trn1")


# --- optimum.neuron.models.inference.auto_models ----------------------------------------------------------------------


def _install_inference_registry() -> None:
    _module(
        "optimum.neuron.models.inference.auto_models",
        "Empty: the training model lookup (auto_model.has_neuron_model_class) imports the inference models only to "
        "register them, and those need NxD's operators and kernels.",
    )


# --- entry points -----------------------------------------------------------------------------------------------------

_INSTALLED: list[bool] = []


def install() -> None:
    """Put every stub module into sys.modules. Call before importing optimum or accelerate; idempotent."""
    if _INSTALLED:
        return
    loaded = sorted(m for m in ("optimum.neuron", "accelerate") if m in sys.modules)
    if loaded:
        raise RuntimeError(f"stubs.install() must run before {', '.join(loaded)} is imported")
    _install_torch_xla()
    _install_torch_neuronx()
    _module("neuronx_distributed", "NeuronX Distributed: parallel layers and state.", __version__="0.15.22404")
    _module("neuronx_distributed.parallel_layers", "Package of parallel layers.")
    _install_parallel_state()
    _install_layers()
    _install_nxd_rest()
    _install_inference_registry()
    _INSTALLED.append(True)


def register_xla_backend() -> None:
    """Register a torch.distributed backend named "xla" that makes a gloo group, so upstream's
    init_process_group(backend="xla") (what it calls under torchrun) works on the CPU."""
    if "xla" in dist.Backend.backend_list:
        return

    def create(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)

    dist.Backend.register_backend("xla", create, devices=["cpu"])


def init_distributed() -> None:
    """A one-process torch.distributed world on the "xla" backend (a HashStore, no network): TrainingNeuronConfig
    refuses to construct without an initialised process group."""
    if dist.is_initialized():
        return
    register_xla_backend()
    dist.init_process_group(backend="xla", store=dist.HashStore(), rank=0, world_size=1)
