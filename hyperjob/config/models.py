"""Typed configuration: one YAML file in, validated models out.

Every field is checked here, before anything is rendered or written, so that a
bad value fails with a message naming its key instead of deep inside a job.
`backend` and `stages` are checked for shape here and against the backend
registry and the stage table by the planner, which sits above both.
Strings that end up in sbatch headers are restricted to safe character sets;
everything else is quoted when rendered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hyperjob.config.plugins import plugin_search_off
from hyperjob.config.secrets import looks_secret

# pydantic's plugin search is skipped while these models are built (hyperjob.config.plugins).
_restore_plugin_search = plugin_search_off()

DatasetFormat = Literal["dolly", "chat", "text"]
Schedule = Literal["linear", "cosine", "constant", "constant_with_warmup"]

# The built-in model id that builds a tiny random Llama locally instead of downloading.
TINY_MODEL_ID = "tiny-llama"

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_SLURM_WORD = r"^[A-Za-z0-9][A-Za-z0-9._,:=+-]{0,127}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
# ASCII digits ([0-9]: `\d` also matches other scripts' digits, which sbatch refuses) and at most 4 digits of days
# (past 24855 days Slurm's seconds overflow and the limit silently wraps).
_SLURM_TIME = r"^([0-9]{1,4}-)?[0-9]{1,3}(:[0-9]{2}){0,2}$|^UNLIMITED$|^INFINITE$"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSection(_Model):
    """The base model: a hub id, a local directory, or the built-in `tiny-llama`."""

    id: str = Field(min_length=1, description="HF hub id, local directory, or 'tiny-llama'")
    revision: str = Field(default="main", min_length=1)
    token_env: str | None = Field(default="HF_TOKEN", pattern=_ENV_NAME)
    token_file: Path | None = None
    # Architecture facts for planning when the model is not on local disk.
    num_attention_heads: PositiveInt | None = None
    num_key_value_heads: PositiveInt | None = None
    max_position_embeddings: PositiveInt | None = None
    rope_theta: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="RoPE base override for context extension; the merged model's config carries it"
    )
    quantize: Literal["none", "nf4"] = Field(
        default="none", description="nf4: QLoRA, the frozen base loaded in 4-bit by bitsandbytes (cuda only)"
    )

    @property
    def is_tiny(self) -> bool:
        return self.id == TINY_MODEL_ID


class DatasetSection(_Model):
    """Training data: a hub dataset id or a local JSONL file."""

    id: str | None = Field(default=None, min_length=1)
    path: Path | None = None
    format: DatasetFormat = "dolly"
    split: str = Field(default="train", min_length=1)
    num_rows: PositiveInt | None = Field(default=None, description="rows, when known, for planning")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSection:
        if (self.id is None) == (self.path is None):
            raise ValueError("set exactly one of dataset.id (hub dataset) or dataset.path (local JSONL)")
        return self


class ClusterSection(_Model):
    """Where and how jobs run: sbatch header values."""

    partition: str | None = Field(default=None, pattern=_SLURM_WORD)
    nodes: PositiveInt = 1
    instance_type: str = Field(default="cpu", min_length=1)
    devices_per_node: PositiveInt | None = Field(
        default=None, description="override the catalogue (cpu: processes per node, default 2)"
    )
    account: str | None = Field(default=None, pattern=_SLURM_WORD)
    qos: str | None = Field(default=None, pattern=_SLURM_WORD)
    time: str | None = Field(default=None, pattern=_SLURM_TIME)
    exclusive: bool = True
    requeue: bool = Field(
        default=True, description="Slurm requeues the train job after a node failure or preemption (--requeue)"
    )
    max_restarts: NonNegInt = Field(
        default=3, description="restarts of the train job (requeues) before it fails instead of trying again"
    )
    save_before_time_limit: PositiveInt = Field(
        default=300,
        description="seconds before the time limit at which train saves a checkpoint, stops and is requeued",
    )
    sbatch_extra: tuple[str, ...] = ()
    container_image: str | None = Field(default=None, min_length=1)

    @field_validator("sbatch_extra")
    @classmethod
    def _extra_options(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for opt in v:
            if not opt.startswith("--") or any(c in opt for c in "\n\r\0"):
                raise ValueError(f"sbatch option {opt!r} must start with '--' and be on one line")
        return v


ParallelMode = Literal["ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"]
LossImpl = Literal["standard", "chunked", "liger", "cut-cross-entropy"]


class ParallelSection(_Model):
    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    sequence: PositiveInt = Field(
        default=1, description="Ulysses sequence parallelism: each sample's tokens split over this many processes"
    )
    mode: ParallelMode = Field(default="ddp", description="how data-parallel processes hold the model")


class TrainingSection(_Model):
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(default=-1, ge=-1, description="-1: train for `epochs`")
    seq_len: PositiveInt = 2048
    micro_batch: PositiveInt = 1
    grad_accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0, lt=1)] = 2e-5
    schedule: Schedule = "linear"
    warmup: NonNegInt = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    save_steps: PositiveInt = 500
    seed: int = 42
    bf16: bool = True
    gradient_checkpointing: bool = False
    packing: bool = False
    logging_steps: PositiveInt = 10
    loss: LossImpl = Field(
        default="standard", description="chunked: LM head + loss over token chunks, never all logits at once"
    )
    loss_chunk: PositiveInt = Field(default=1024, description="tokens per LM-head chunk (training.loss: chunked)")
    mlp_chunk: PositiveInt | None = Field(default=None, description="tiled MLP: tokens per tile; None: untiled")
    torch_compile: bool = Field(
        default=False, description="torch.compile the model (the backend's compiler: neuron on torchneuron)"
    )
    activation_offload: bool = Field(
        default=False, description="keep checkpointed activations in host memory (needs gradient_checkpointing)"
    )

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> TrainingSection:
        if self.activation_offload and not self.gradient_checkpointing:
            raise ValueError("activation_offload needs gradient_checkpointing: true (it offloads the checkpoints)")
        return self


class LoraSection(_Model):
    r: PositiveInt = 16
    alpha: PositiveInt = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules_to_save: tuple[str, ...] = Field(
        default=(), description="modules trained in full beside the adapter, e.g. embed_tokens (trainable embeddings)"
    )

    @field_validator("target_modules", "modules_to_save")
    @classmethod
    def _targets(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not v and info.field_name == "target_modules":
            raise ValueError("target_modules must name at least one module")
        for name in v:
            if name != "all-linear" and not name.replace("_", "").replace(".", "").isalnum():
                msg = f"module name {name!r} may hold only letters, digits, '_' and '.' (or be 'all-linear')"
                raise ValueError(msg)
        return v


class NeedleSection(_Model):
    """Needle-in-a-haystack: can the tuned model find one fact placed at a depth of a long generated text?"""

    lengths: tuple[PositiveInt, ...] = Field(default=(1024,), min_length=1, description="context lengths in tokens")
    depths: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field(
        default=(0.0, 0.5, 1.0), min_length=1, description="where the needle sits: 0 start, 1 end of the haystack"
    )
    trials: PositiveInt = Field(default=1, description="needles per (length, depth) cell")
    seed: int = 0


class EvaluateSection(_Model):
    prompts: tuple[str, ...] = (
        "What is the capital of France?",
        "Explain what a large language model is in one sentence.",
    )
    max_new_tokens: PositiveInt = 64
    needle: NeedleSection | None = Field(default=None, description="needle-in-a-haystack accuracy table, if set")


_SIZE = r"^\d+(\.\d+)?(B|KB|MB|GB|KiB|MiB|GiB)$"


class ConsolidateSection(_Model):
    """Neuron sharded checkpoint -> PEFT adapter."""

    allow_drift: bool = Field(default=False, description="accept replicated LoRA factors that differ across TP ranks")


class MergeSection(_Model):
    """Streaming merge of the adapter into the base model."""

    max_shard_size: str | None = Field(default=None, pattern=_SIZE, description="None: keep the base's shards")
    max_memory: str = Field(default="1GB", pattern=_SIZE)
    workers: PositiveInt | Literal["auto"] = Field(
        default="auto", description="threads reading and merging blocks; auto: one per CPU core, within max_memory"
    )


class EnvironmentSection(_Model):
    """How jobs find Python on the cluster nodes, plus extra environment variables.

    `train_python` lets the training stack live in its own venv (on Trainium: the pinned Neuron venv for compile
    and train) while download, consolidate, merge and evaluate run with `python`.
    """

    python: str | None = Field(default=None, min_length=1, description="interpreter on the nodes; default: this one")
    train_python: str | None = Field(
        default=None, min_length=1, description="interpreter of the training stages (compile, train); default: python"
    )
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("python", "train_python")
    @classmethod
    def _interpreter(cls, v: str | None) -> str | None:
        """Scripts run `"$PYTHON"` as a command, or after srun's options: it must not read as an option or a job."""
        if v is not None and v.startswith(("-", "%")):
            raise ValueError("must not start with '-' or '%': srun would read it as its own option, bash as a job (fg)")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for key, value in v.items():
            if not re.match(_ENV_NAME, key):
                raise ValueError(f"environment variable name {key!r} must match {_ENV_NAME}")
            if looks_secret(key, value):  # these are written into every script; a credential must not be
                raise ValueError(
                    f"{key} looks like a credential; do not put it in the config: export it in the shell that runs "
                    "`hyperjob submit` (jobs inherit that environment), or for the Hugging Face token use "
                    "model.token_env or model.token_file"
                )
        return v


class StageResourceOverride(_Model):
    """One stage's own sbatch resources and interpreter, where the cluster's training values would waste a node.

    Every key is optional: unset inherits the stage table's default for that stage, then `cluster.*` (or
    `environment.*` for `python`); `hyperjob.plan.resources` decides. Stage names and node counts are checked
    against the stage table by the planner, which knows which stages are distributed.
    """

    partition: str | None = Field(default=None, pattern=_SLURM_WORD)
    nodes: PositiveInt | None = Field(
        default=None, description="1 for single-task stages; a distributed stage's is cluster.nodes (the layout's)"
    )
    time: str | None = Field(default=None, pattern=_SLURM_TIME)
    exclusive: bool | None = None
    sbatch_extra: tuple[str, ...] | None = Field(default=None, description="replaces cluster.sbatch_extra")
    python: str | None = Field(default=None, min_length=1, description="replaces environment.(train_)python")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        """Name the allowed keys: the generic message cannot, under a mapping keyed by stage."""
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                allowed = ", ".join(sorted(cls.model_fields))
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys here: {allowed}")
        return data

    @field_validator("sbatch_extra")
    @classmethod
    def _extra_options(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return v if v is None else ClusterSection._extra_options(v)

    @field_validator("python")
    @classmethod
    def _interpreter(cls, v: str | None) -> str | None:
        return EnvironmentSection._interpreter(v)


# Free text that never reaches a script line (it is read from config.yaml by Python).
_FREE_TEXT = {("evaluate", "prompts"), ("environment", "env")}


def _control_char_keys(data: object, path: tuple[str, ...]) -> list[str]:
    if path[:2] in _FREE_TEXT:
        return []
    if isinstance(data, dict):
        return [k for key, v in data.items() for k in _control_char_keys(v, (*path, str(key)))]
    if isinstance(data, (list, tuple)):
        return [k for v in data for k in _control_char_keys(v, path)]
    if isinstance(data, str) and any(not c.isprintable() for c in data):
        return [".".join(path)]
    return []


class HyperjobConfig(_Model):
    name: str = Field(pattern=_NAME)
    workdir: Path
    backend: str = Field(pattern=_NAME, description="a registered backend: cpu, cuda, neuron, torchneuron")
    model: ModelSection
    dataset: DatasetSection
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    consolidate: ConsolidateSection = Field(default_factory=ConsolidateSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    environment: EnvironmentSection = Field(default_factory=EnvironmentSection)
    stage_resources: dict[Annotated[str, Field(pattern=_NAME)], StageResourceOverride] = Field(
        default_factory=dict, description="per-stage partition, nodes, time, exclusive, sbatch_extra, python"
    )
    stages: tuple[Annotated[str, Field(pattern=_NAME)], ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: object) -> object:
        """Values that reach a script line or an #SBATCH header must be one line of printable text."""
        bad = _control_char_keys(data, ())
        if bad:
            raise ValueError(f"{bad[0]}: control characters (newline, tab, NUL...) are not allowed in this value")
        return data

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: Path) -> Path:
        """Logs go to an `#SBATCH --output` path in workdir: Slurm drops a backslash there, and stops expanding %j."""
        if "\\" in str(v):
            raise ValueError("a backslash is not allowed: Slurm would drop it from the job log path (--output)")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """Shape only: which stages exist, their order and their backends are the stage table's (planner) checks."""
        if v is None:
            return v
        if not v:
            raise ValueError("stages must name at least one stage")
        if len(set(v)) != len(v):
            raise ValueError(f"stages [{', '.join(v)}] repeat a stage")
        return v


_restore_plugin_search()
