"""A PEFT LoRA adapter as the streaming merge needs it: checked, its factors in memory as per-tensor deltas.

Kept apart from the merge loop so the rules (key names, rank/alpha patterns, rslora, embedding and
fan_in_fan_out transposes, refused variants) can be read and tested on their own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperjob.checkpoint.errors import MergeError
from hyperjob.checkpoint.hf_layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, torch_dtypes
from hyperjob.checkpoint.safetensors_io import SafetensorsReader, TensorInfo

PREFIX = "base_model.model."
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # what the merge computes in (fp32, or fp64 for F64)
_REFUSED = {  # adapter_config option -> why W + s * B @ A would not reproduce the adapter
    "use_dora": "DoRA (use_dora) rescales each column of W + s*B@A by a learned magnitude",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, so it cannot be merged",
    "velora_config": "VeLoRA changes the LoRA computation",
    "monteclora_config": "MonteCLoRA samples its LoRA weights",
    "use_bdlora": "block-diagonal LoRA changes the shape of B @ A",
    "arrow_config": "Arrow routes between several adapters per token",
    "kasa_config": "KaSA changes the LoRA computation",
    "use_qalora": "QA-LoRA pools its input and targets quantized weights",
    "trainable_token_indices": "trainable tokens store per-token embedding deltas",
    "target_parameters": "LoRA on raw parameters (MoE experts) is stored in another layout",
    "layer_replication": "layer replication changes which base weights each layer uses",
}
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.(?P<param>weight|bias)$")
_EMB_KEY = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<part>A|B)(?:\.[^.]+)?$")
_WRAPPED_KEY = re.compile(r"^(?P<mod>.+)\.(?:base_layer|modules_to_save(?:\.[^.]+)?)\.(?P<param>[^.]+)$")


@dataclass(frozen=True)
class Delta:
    """W[rows] += scale * (B @ A)[rows], or of (B @ A)^T when `transposed` (embeddings, fan_in_fan_out).

    A 0-d `a` marks a lora_bias update: the bias of lora_B, scaled, added to the base bias.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool

    def shape(self) -> tuple[int, ...]:
        if self.a.dim() == 0:
            return tuple(self.b.shape)
        return (self.a.shape[1], self.b.shape[0]) if self.transposed else (self.b.shape[0], self.a.shape[1])

    def apply(self, w: torch.Tensor, r0: int, r1: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Update rows [r0, r1) held in `w`; a, b are this delta's factors already in w's dtype."""
        if a.dim() == 0:
            w.view(-1).add_(b[r0:r1], alpha=self.scale)
        elif self.transposed:  # rows of W are columns of A: (A[:, rows]^T) @ B^T == ((B @ A)^T)[rows]
            w.addmm_(a[:, r0:r1].t(), b.t(), alpha=self.scale)
        else:
            w.addmm_(b[r0:r1], a, alpha=self.scale)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MergeError(f"{path} is not valid JSON: {e}") from None


def _pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule: the first key k (a regex) with module matching `(.*\\.)?(k)$`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(adapter_dir: Path) -> tuple[SafetensorsReader, dict[str, list[Delta]], dict[str, TensorInfo]]:
    """Parse and check the adapter: LoRA factors into memory, replacement tensors (modules_to_save) by reference."""
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    cfg = read_json(cfg_path)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for option, why in _REFUSED.items():
        if cfg.get(option):
            raise MergeError(f"{adapter_dir}: {option} is set; {why}; merge it with peft instead")
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MergeError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not supported)")
    reader = SafetensorsReader(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, TensorInfo] = {}
    for key, info in reader.tensors.items():
        if not key.startswith(PREFIX):
            raise MergeError(f"{path}: key {key!r} lacks the {PREFIX!r} prefix of a PEFT state dict")
        name = key[len(PREFIX) :]
        if m := _LORA_KEY.match(name) or _EMB_KEY.match(name):
            part = ("emb_" if "lora_embedding_" in name else "") + m["part"]
            part += "_bias" if m.groupdict().get("param") == "bias" else ""
            if info.dtype not in FLOAT_DTYPES or part == "A_bias":
                raise MergeError(f"{path}: cannot merge LoRA tensor {key} ({info.dtype})")
            t = (
                torch.frombuffer(reader.read_bytes(key), dtype=torch_dtypes()[info.dtype])
                if info.nbytes
                else torch.empty(0)
            )
            factors.setdefault(m["mod"], {})[part] = t.reshape(info.shape)
        elif m := _WRAPPED_KEY.match(name):
            if ".original_module." not in name:
                replacements[f"{m['mod']}.{m['param']}"] = info
        elif "lora_" in name:
            raise MergeError(f"{path}: unrecognized LoRA key {key} (a LoRA variant this engine cannot merge?)")
        else:
            replacements[name] = info  # modules_to_save / bias="all" tensors, saved under the base's own name
    deltas: dict[str, list[Delta]] = {}
    for module, parts in factors.items():
        r = _pattern(cfg.get("rank_pattern"), module, cfg.get("r", 8))
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        emb = "emb_A" in parts or "emb_B" in parts
        a, b = (parts.get("emb_A"), parts.get("emb_B")) if emb else (parts.get("A"), parts.get("B"))
        if a is None or b is None:
            raise MergeError(f"{path}: module {module} has only one of its two LoRA factors")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise MergeError(
                f"{path}: module {module}: lora A {list(a.shape)} and B {list(b.shape)} are not rank-{r} matrices "
                "(r from adapter_config r / rank_pattern; convolution LoRA is not supported)"
            )
        deltas.setdefault(f"{module}.weight", []).append(Delta(a, b, scale, emb or bool(cfg.get("fan_in_fan_out"))))
        if "B_bias" in parts:
            deltas.setdefault(f"{module}.bias", []).append(Delta(torch.empty(()), parts["B_bias"], scale, False))
    return reader, deltas, replacements
