"""The built-in `tiny-llama` model: a random-weights Llama and a BPE tokenizer, built locally and deterministically.

It lets the whole pipeline (download, LoRA training, merge, evaluation) run on a laptop CPU in seconds with
the same code paths as a real Llama: GQA attention, untied embeddings, a chat template and safetensors files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hyperjob.resources import shipped_dir
from hyperjob.stages.data import format_prompt

TINY_VOCAB_SIZE = 1024
TINY_ARCH: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA on purpose: LoRA on k/v projections must cope with narrower shapes
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Each message ends with eos and nothing after it, so an assistant turn is exactly "content + eos".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_RESOURCES = Path(__file__).resolve().parent / "resources"
_CORPUS = _RESOURCES / "tiny_corpus.txt"
# The example data set doubles as tokenizer training text.
_DOLLY = ("data", "dolly-tiny.jsonl")


def _training_text() -> Iterator[str]:
    dolly = shipped_dir("examples").joinpath(*_DOLLY)
    for path in (_CORPUS, dolly):
        if not path.is_file():
            raise FileNotFoundError(f"tiny-llama tokenizer text is missing: {path}")
    yield from _CORPUS.read_text(encoding="utf-8").splitlines()
    for line in dolly.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            # As the model will see it, so the prompt headings become whole tokens.
            yield format_prompt(row, "dolly") + str(row.get("response") or "")


def build_tokenizer() -> object:
    """Train a byte-level BPE (no unknown bytes possible) and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(ROLE_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Add <s> like Llama tokenizers do; keep byte offsets untrimmed so label masks can use them.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]),
        ]
    )
    tok.add_special_tokens(list(ROLE_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=int(TINY_ARCH["max_position_embeddings"]),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Write config, generation config, safetensors weights and tokenizer files into `out_dir`.

    Bit-identical for the same seed (and library versions): the tokenizer trainer is deterministic and the
    weights come from a seeded CPU generator.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        **TINY_ARCH,
    )
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # type: ignore[attr-defined]
    _portable_tokenizer_config(out_dir / "tokenizer_config.json")
    return out_dir


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 names its own `TokenizersBackend` class, which 4.x cannot load; the generic name loads in both."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("backend", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
