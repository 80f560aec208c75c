"""Drive the REAL optimum-neuron 0.4.5 training classes with hyperjob's arguments; runs inside the neuron venv.

    python tests/neuron_upstream/cases.py {tiny,sft,targets,model} < request.json > results.json

Each command reads one JSON request on stdin and prints one JSON object on stdout (upstream's own output goes to
stderr), so tests/test_neuron_upstream.py batches many cases into one slow-to-import process per check. Results
are facts (what upstream built, or the exception it raised); the asserting happens in the test, in the main venv.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import stubs

# Fields of TrainingNeuronConfig worth reporting back (upstream overwrites tp/pp/dp with what NxD set up).
TRN_FIELDS = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "kv_size_multiplier",
    "sequence_parallel_enabled",
    "pipeline_parallel_num_microbatches",
    "pipeline_parallel_use_zero1_optimizer",
    "gradient_checkpointing",
    "fuse_qkv",
)


def _error(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "error_type": type(e).__name__, "error": str(e), "where": traceback.format_exc(limit=-3)}


def _capture(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One case's facts, or the exception upstream raised: one failing case must not hide the others."""
    try:
        return {"ok": True, **fn()}
    except Exception as e:
        return _error(e)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Upstream prints to stdout in places; keep stdout for our one JSON result."""
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = real


def _trn_facts(trn: Any) -> dict[str, Any]:
    return {name: getattr(trn, name, None) for name in TRN_FIELDS}


# --- tiny: the local model check 3 loads ------------------------------------------------------------------------------


def cmd_tiny(req: dict[str, Any]) -> dict[str, Any]:
    """Build hyperjob's tiny Llama with this venv's transformers (4.57), as a model downloaded for Trainium is."""
    from hyperjob.stages.tiny import build_tiny_llama

    out = build_tiny_llama(Path(req["out"]))
    return {"path": str(out)}


# --- sft: NeuronSFTConfig from the entry's trainer_config -------------------------------------------------------------


def _sft_case(case: dict[str, Any]) -> dict[str, Any]:
    from optimum.neuron import NeuronSFTConfig

    from hyperjob.stages.common import StageError
    from hyperjob.stages.train_neuron import check_trn_config

    stubs.reset_parallel_state(case["world"])
    args = NeuronSFTConfig(**case["kwargs"])
    trn = args.trn_config
    facts = _trn_facts(trn)
    kv_heads = case.get("num_key_value_heads")
    if kv_heads is not None:
        # What the model classes would infer; raises when the explicit multiplier disagrees with it.
        facts["auto_kv_size_multiplier"] = _capture(lambda: {"value": trn.auto_kv_size_multiplier(kv_heads)})
    try:
        check_trn_config(trn, case.get("expected", {}))
        facts["check_trn_config"] = None
    except StageError as e:
        facts["check_trn_config"] = str(e)
    return {
        "trn_config": facts,
        "train_batch_size": args.train_batch_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_steps": args.max_steps,
        "max_length": args.max_length,
        "packing": args.packing,
        "padding_free": args.padding_free,
    }


def cmd_sft(req: dict[str, Any]) -> dict[str, Any]:
    return {"results": {c["name"]: _capture(lambda c=c: _sft_case(c)) for c in req["cases"]}}


# --- targets: upstream's LoRA target rewriting on the real training Llama ---------------------------------------------


def _build_model(layout: dict[str, Any]) -> Any:
    """The real training LlamaForCausalLM from a config (no weights) at the layout's TP, in a world of TP ranks."""
    from optimum.neuron.models.training import NeuronModelForCausalLM
    from optimum.neuron.models.training.config import TrainingNeuronConfig
    from transformers import LlamaConfig

    heads, kv, tp = layout["heads"], layout["kv_heads"], layout["tp"]
    # Tiny (head_dim 8, two layers) and every size but the head counts a multiple of TP: a layout upstream
    # cannot build fails on its heads, nothing else.
    config = LlamaConfig(
        hidden_size=8 * heads,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=16 * tp,
        vocab_size=64 * tp,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    stubs.reset_parallel_state(tp)
    return NeuronModelForCausalLM.from_config(config, TrainingNeuronConfig(tensor_parallel_size=tp))


def _layout_facts(layout: dict[str, Any]) -> dict[str, Any]:
    attn = _build_model(layout).model.layers[0].self_attn
    return {
        "qkv_fused": bool(attn.qkv_linear),  # upstream's own decision (modeling_llama: KV heads vs TP)
        "kv_size_multiplier": attn.kv_size_multiplier,
        "attention_modules": sorted(name for name, _ in attn.named_children()),
    }


def _targets_case(layout: dict[str, Any], targets: list[str] | str) -> dict[str, Any]:
    from optimum.neuron.models.training.transformations_utils import adapt_peft_config_for_model
    from optimum.neuron.peft import get_peft_model
    from peft import LoraConfig

    from hyperjob.stages.lora_check import check_lora_applied

    def lora() -> Any:
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")

    model = _build_model(layout)
    adapted = adapt_peft_config_for_model(model, lora()).target_modules
    # What upstream accepts must also wrap: peft finds the (fused) modules and LoRA trains only them.
    wrapped = get_peft_model(model, lora())
    trainable, total = check_lora_applied(wrapped)
    lora_modules = sorted(
        {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    )
    return {"adapted": sorted(adapted), "trainable": trainable, "total": total, "lora_modules": lora_modules}


def cmd_targets(req: dict[str, Any]) -> dict[str, Any]:
    layouts = {lay["name"]: lay for lay in req["layouts"]}
    return {
        "layouts": {name: _capture(lambda lay=lay: _layout_facts(lay)) for name, lay in layouts.items()},
        "results": {
            c["name"]: _capture(lambda c=c: _targets_case(layouts[c["layout"]], c["targets"])) for c in req["cases"]
        },
    }


# --- model: the entry's load-and-wrap, from print-args ----------------------------------------------------------------


def _example_rows(n: int, length: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": list(range(4, 4 + length)), "labels": list(range(4, 4 + length))} for _ in range(n)]


def _model_case(case: dict[str, Any]) -> dict[str, Any]:
    """The entry's own functions (hyperjob/stages/train_neuron.py): neuron_config (the real NeuronSFTConfig and
    the trn_config check), load_model (the training class's from_pretrained with args.trn_config), make_trainer
    (NeuronSFTTrainer with the LoRA config and hyperjob's collator); LoRA also once through
    optimum.neuron.peft.get_peft_model; check_lora_applied on each, and on the bare model, which it must refuse."""
    from optimum.neuron.peft import get_peft_model
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from hyperjob.stages.common import StageError
    from hyperjob.stages.lora_check import check_lora_applied
    from hyperjob.stages.train_neuron import load_model, make_trainer, neuron_config

    arguments = case["arguments"]
    stubs.reset_parallel_state(case["world"])
    args = neuron_config(arguments)
    loader = arguments["model_loader"]

    def load() -> Any:
        return load_model(arguments, args.trn_config)

    out: dict[str, Any] = {"trn_config": _trn_facts(args.trn_config)}
    bare = load()
    out["model_class"] = f"{type(bare).__module__}.{type(bare).__qualname__}"
    out["param_dtype"] = str(next(bare.parameters()).dtype)
    out["attention_modules"] = sorted(name for name, _ in bare.model.layers[0].self_attn.named_children())
    try:
        check_lora_applied(bare)
        out["bare_check"] = None
    except StageError as e:
        out["bare_check"] = str(e)

    lora_kwargs = arguments["lora_config"]
    peft_model = get_peft_model(load(), LoraConfig(**lora_kwargs))
    out["get_peft_model"] = dict(zip(("trainable", "total"), check_lora_applied(peft_model), strict=True))
    out["adapted_targets"] = sorted(peft_model.peft_config["default"].target_modules)

    def through_trainer() -> dict[str, Any]:
        tokenizer = AutoTokenizer.from_pretrained(loader["path"])
        trainer = make_trainer(arguments, args, load(), _example_rows(8, 16), tokenizer)
        counts = check_lora_applied(trainer.model)
        batch = trainer.data_collator(_example_rows(2, 16))  # what the trainer's dataloader will feed the model
        return {
            "model_class": type(trainer.model).__name__,
            "trainable": counts[0],
            "total": counts[1],
            "batch_shapes": {key: list(value.shape) for key, value in batch.items()},
        }

    out["trainer"] = _capture(through_trainer)  # reported on its own: the steps above stand without it
    return out


def cmd_model(req: dict[str, Any]) -> dict[str, Any]:
    return {"results": {c["name"]: _capture(lambda c=c: _model_case(c)) for c in req["cases"]}}


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tiny": cmd_tiny,
    "sft": cmd_sft,
    "targets": cmd_targets,
    "model": cmd_model,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: cases.py {{{','.join(COMMANDS)}}} < request.json", file=sys.stderr)
        return 2
    request = json.load(sys.stdin)
    with _stdout_to_stderr():
        if argv[0] != "tiny":  # building the tiny model needs no optimum
            stubs.install()
            stubs.init_distributed()
        result = COMMANDS[argv[0]](request)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
