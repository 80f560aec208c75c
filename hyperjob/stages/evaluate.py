"""Evaluate stage: greedy answers to `evaluate.prompts` from the base and the tuned model, side by side.

Prompts are formatted exactly as in training (same template, same prompt token ids), so differences come
from the fine-tuning, not from the prompt. One model is in memory at a time. With `evaluate.needle` set, the
tuned model also gets the needle-in-a-haystack table (hyperjob.stages.needle), written beside the answers.
"""

from __future__ import annotations

import gc
import json
import logging
import unicodedata
from pathlib import Path
from typing import Any

from hyperjob import backends
from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import atomic_dir
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages.common import (
    StageError,
    dtype_kwargs,
    is_model_dir,
    require_model_dir,
    run_stage,
    setup_logging,
)
from hyperjob.stages.needle import NeedleResult, run_needle, total_tokens, write_needle


def greedy_answer(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, device: Any) -> str:
    """Greedy-decode from prompt token ids (batch 1: no padding effects); the answer text, stripped."""
    import torch
    from transformers import GenerationConfig

    from hyperjob.stages.data import pad_id_of

    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id_of(tokenizer),
    )
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen)
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)).strip()


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], fmt: Any, max_new_tokens: int, device: Any
) -> list[str]:
    """Greedy-decode an answer for each prompt (one at a time: no padding effects, prompts are few)."""
    from hyperjob.stages.data import encode_prompt, format_prompt, prompt_row

    ids = (encode_prompt(tokenizer, format_prompt(prompt_row(p, fmt), fmt, tokenizer), fmt) for p in prompts)
    return [greedy_answer(model, tokenizer, prompt_ids, max_new_tokens, device) for prompt_ids in ids]


def _load(path: Path, dtype: Any, device: Any, adapter: Path | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval()


def _free(model: Any) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Text a terminal would act on rather than show: C0/C1 controls (ESC sequences, \r, NUL...), line and paragraph
# separators, unpaired surrogates (unencodable), and the bidi controls that reorder what is displayed.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSAFE = frozenset(("Cc", "Cs", "Zl", "Zp"))
TINY_NOTE = (
    "tiny-llama has random weights and a toy tokenizer: these answers are noise by design "
    "(the run tests the pipeline, not a model)"
)


def escape_controls(text: str, *, keep_newlines: bool = True) -> str:
    """`text` with every character a terminal would interpret written as a Python escape (\\x1b, \\r, \\u202e),
    so `cat answers.md` shows what a model emitted instead of acting on it. Tabs (and newlines if kept) stay."""
    keep = {"\t", "\n"} if keep_newlines else {"\t"}
    return "".join(
        ch if ch in keep or (unicodedata.category(ch) not in _UNSAFE and ch not in _BIDI) else ascii(ch)[1:-1]
        for ch in text
    )


def render_markdown(name: str, base: Path, tuned: str, records: list[dict[str, str]], note: str | None = None) -> str:
    """answers.md: each prompt with the base and the tuned answer, quoted, control characters escaped."""
    lines = [f"# Evaluation: {name}", "", f"- base model: `{base}`", f"- tuned model: `{tuned}`"]
    lines += [f"- note: {note}", ""] if note else [""]
    for i, rec in enumerate(records, start=1):
        lines += [f"## {i}. {escape_controls(rec['prompt'], keep_newlines=False)}", ""]
        for key in ("base", "tuned"):
            answer = escape_controls(rec[key]) or "(empty)"
            lines += [f"**{key}:**", "", *(f"> {line}" for line in answer.split("\n")), ""]
    return "\n".join(lines)


def _needle(model: Any, tokenizer: Any, cfg: HyperjobConfig, device: Any, log: logging.Logger) -> NeedleResult | None:
    """The needle-in-a-haystack table of the tuned model, when `evaluate.needle` is configured; else None."""
    section = cfg.evaluate.needle
    if section is None:
        return None
    log.info(
        "needle in a haystack: lengths %s, depths %s, %d trial(s) per cell, up to %d prompt tokens",
        list(section.lengths), list(section.depths), section.trials,
        total_tokens(section.lengths, section.depths, section.trials),
    )  # fmt: skip
    return run_needle(model, tokenizer, section, cfg.dataset.format, device, cfg.evaluate.max_new_tokens, log)


def _evaluate(paths: RunPaths, cfg: HyperjobConfig) -> int:
    log = setup_logging("evaluate")
    base = base_model_dir(cfg)
    require_model_dir(base, "base model", "run the download stage first")
    merged = paths.merged if is_model_dir(paths.merged) else None
    if merged is None and not (paths.adapter / "adapter_config.json").is_file():
        raise StageError(f"no tuned model: neither {paths.merged} nor {paths.adapter} exists (run train first)")

    import torch
    from transformers import AutoTokenizer

    use_cuda = backends.get(cfg.backend).runtime.device == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype: Any = (torch.bfloat16 if cfg.training.bf16 else "auto") if use_cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = list(cfg.evaluate.prompts)
    fmt, max_new = cfg.dataset.format, cfg.evaluate.max_new_tokens

    log.info("base model %s: %d prompts, up to %d new tokens each", base, len(prompts), max_new)
    model = _load(base, dtype, device)
    base_answers = generate_answers(model, tokenizer, prompts, fmt, max_new, device)
    _free(model)

    tuned_label = str(merged) if merged else f"{base} + {paths.adapter}"
    log.info("tuned model %s", tuned_label)
    model = _load(merged, dtype, device) if merged else _load(base, dtype, device, adapter=paths.adapter)
    tuned_answers = generate_answers(model, tokenizer, prompts, fmt, max_new, device)
    needle = _needle(model, tokenizer, cfg, device, log)
    _free(model)

    records = [
        {"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_answers, tuned_answers, strict=True)
    ]
    with atomic_dir(paths.evaluation) as tmp:
        (tmp / "answers.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "answers.md").write_text(
            render_markdown(cfg.name, base, tuned_label, records, TINY_NOTE if cfg.model.is_tiny else None),
            encoding="utf-8",
        )
        if needle is not None:
            write_needle(tmp, needle)
    print(f"answers: {paths.evaluation / 'answers.json'} (readable: {paths.evaluation / 'answers.md'})", flush=True)
    if needle is not None:
        print(f"needle accuracy: {paths.evaluation / 'needle.json'} (table: {paths.evaluation / 'needle.md'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", _evaluate, argv, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
