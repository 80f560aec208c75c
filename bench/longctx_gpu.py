"""Long-context LoRA on one device: the longest trainable context and non-pad tokens/s, ours vs plain HF + peft.

Both sides are measured in the same run on the same model: a Llama built from a config (random weights, real shapes)
with LoRA r16 on q,k,v,o,gate,up,down, one micro-batch of 1, AdamW-free (a forward and backward is what decides
whether a context fits; the LoRA optimizer state is a few MB).

- plain: transformers + peft as a user writes it: activation checkpointing on, the model's own loss (all logits).
- ours: the same, plus hyperjob's chunked LM head + loss, and for the context search the tiled MLP
  (hyperjob.longctx); the tokens/s run leaves the MLP untiled, as a config at 8K would (tiles cost a recompute).
- max context: the length doubles from `--start` until a step fails (CUDA: out of memory) or passes the memory
  budget (CPU: the peak of tensors alive at once, hyperjob.longctx.memtrack, against `--budget-mib`); then a binary
  search to `--resolution` tokens.
- tokens/s: non-pad tokens per second at `--seq-len` on a dolly-like length mix (bench/packing.py's lengths):
  plain pads each micro-batch of `--batch` examples to its longest; ours packs them into `--seq-len` rows with
  sequence-ID masking (hyperjob.longctx.packing).

Goals on one GPU for a Llama-3.1-8B-shaped model in bf16 (`--model llama3-8b`, the default on CUDA): >= 128K context
and >= 1.4x tokens/s at 8K. Without a GPU it runs at toy shapes on CPU (`--model toy`) to show the code path works;
its figures say nothing about GPUs (bench/RESULTS.md keeps the GPU figures as pending until measured).

    .venv/bin/python bench/longctx_gpu.py [--model toy|llama3-8b] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hyperjob.longctx.chunked_loss import lm_loss
from hyperjob.longctx.memtrack import PeakMemory
from hyperjob.longctx.packing import pack
from hyperjob.longctx.tiled_mlp import tile_mlp
from hyperjob.longctx.ulysses import shift_labels

SHAPES: dict[str, dict[str, int]] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "toy": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000},
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, device: str, dtype: torch.dtype, tile: bool, chunk: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 20, rope_theta=5e5, use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    if tile:
        tile_mlp(model, chunk)
    return model


def step(model: Any, ids: torch.Tensor, pos: torch.Tensor | None, labels: torch.Tensor, ours: bool, chunk: int) -> None:
    """One forward and backward; ours never materialises the logits."""
    if ours:
        inner = model.get_base_model()
        hidden = inner.model(input_ids=ids, position_ids=pos).last_hidden_state
        total, count = lm_loss(hidden, shift_labels(labels, pos), inner.lm_head, impl="chunked", chunk=chunk)
        loss = total / count.clamp(min=1)
    else:
        loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def fits(model: Any, length: int, args: argparse.Namespace, ours: bool) -> bool:
    vocab = SHAPES[args.model]["vocab_size"]
    ids = torch.randint(0, vocab, (1, length), device=args.device)
    try:
        if args.device == "cuda":
            torch.cuda.empty_cache()
            step(model, ids, None, ids, ours, args.chunk)
            return True
        with PeakMemory() as mem:
            step(model, ids, None, ids, ours, args.chunk)
        return mem.peak <= args.budget_mib << 20
    except torch.OutOfMemoryError:
        return False


def max_context(model: Any, args: argparse.Namespace, ours: bool) -> int:
    """Doubling, then bisection between the last length that fit and the first that did not."""
    good, bad = 0, args.start
    while bad <= args.limit and fits(model, bad, args, ours):
        good, bad = bad, bad * 2
    if bad > args.limit:
        return good
    while bad - good > args.resolution:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(model, mid, args, ours) else (good, mid)
    return good


def dolly_lengths(n: int, seq_len: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [min(seq_len, 16 + int(rng.lognormvariate(4.64, 0.9))) for _ in range(n)]


def tokens_per_s(model: Any, args: argparse.Namespace, ours: bool) -> float:
    """Non-pad tokens per second over `--steps` micro-batches (after one warm-up)."""
    vocab = SHAPES[args.model]["vocab_size"]
    lengths = dolly_lengths(args.batch * (args.steps + 1) * 8, args.seq_len)
    batches: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]] = []
    if ours:
        examples = [{"input_ids": [1] * n, "labels": [2] * n} for n in lengths]
        for row in pack(iter(examples), args.seq_len, 0):
            real = sum(1 for label in row["labels"] if label != -100) + 1
            ids = torch.randint(0, vocab, (1, args.seq_len), device=args.device)
            pos = torch.tensor([row["position_ids"]], device=args.device)
            batches.append((ids, pos, ids, real))
    else:
        for i in range(0, len(lengths), args.batch):
            chunk = lengths[i : i + args.batch]
            longest = max(chunk)
            ids = torch.randint(0, vocab, (len(chunk), longest), device=args.device)
            labels = ids.clone()
            for row, n in enumerate(chunk):
                labels[row, n:] = -100
            batches.append((ids, None, labels, sum(chunk)))
    batches = batches[: args.steps + 1]
    sync: Callable[[], None] = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    step(model, batches[0][0], batches[0][1], batches[0][2], ours, args.chunk)  # warm-up
    sync()
    started, real = time.perf_counter(), 0
    for ids, pos, labels, n in batches[1:]:
        step(model, ids, pos, labels, ours, args.chunk)
        real += n
    sync()
    return real / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b" if cuda else "toy")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    # CPU toy defaults keep the run to about a minute: the tracker sees every op, and CPU steps are slow.
    p.add_argument("--chunk", type=int, default=1024 if cuda else 256, help="LM-head chunk and MLP tile, tokens")
    p.add_argument("--start", type=int, default=4096 if cuda else 512, help="first context length tried")
    p.add_argument("--limit", type=int, default=1 << 19 if cuda else 1 << 14, help="longest context tried")
    p.add_argument("--resolution", type=int, default=2048 if cuda else 512, help="bisection stops within this")
    p.add_argument("--budget-mib", type=int, default=256, help="CPU only: tracked peak memory budget per step")
    p.add_argument("--seq-len", type=int, default=8192 if cuda else 2048, help="row length of the tokens/s run")
    p.add_argument("--batch", type=int, default=8, help="examples per padded micro-batch (plain)")
    p.add_argument("--steps", type=int, default=4, help="timed micro-batches per side")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: torch sees no CUDA device")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"$ python bench/{shlex.join(['longctx_gpu.py', *sys.argv[1:]])}")
    print(f"model {args.model} ({SHAPES[args.model]}), {args.device}, {str(dtype).split('.')[-1]}, LoRA r16 all-linear")
    if args.device == "cpu":
        print(f"CPU toy run: 'fits' means a tracked peak <= {args.budget_mib} MiB; GPU figures are pending")
        print("(CPU attention over packed rows uses a dense mask, no varlen kernel: its tokens/s say nothing of GPUs)")
    results: dict[str, tuple[int, float]] = {}
    for name, ours in (("plain HF + peft", False), ("hyperjob", True)):
        torch.manual_seed(0)
        started = time.perf_counter()
        model = build(args.model, args.device, dtype, ours, args.chunk)
        context = max_context(model, args, ours)
        del model
        torch.manual_seed(0)
        model = build(args.model, args.device, dtype, False, args.chunk)
        rate = tokens_per_s(model, args, ours)
        results[name] = (context, rate)
        capped = " (the search limit)" if context * 2 > args.limit else ""
        took = time.perf_counter() - started
        print(f"{name:16s} max context {context:>8,} tokens{capped} | {rate:>10,.0f} non-pad tokens/s at "
              f"{args.seq_len} ({took:.0f} s)")  # fmt: skip
        del model
    (plain_ctx, plain_rate), (our_ctx, our_rate) = results["plain HF + peft"], results["hyperjob"]
    print(f"ratio: context {our_ctx / max(plain_ctx, 1):.2f}x, tokens/s {our_rate / plain_rate:.2f}x")
    if args.device == "cuda" and args.model == "llama3-8b":
        ok = our_ctx >= 131072 and our_rate >= 1.4 * plain_rate
        print(f"goals (>= 128K context, >= 1.4x tokens/s): {'met' if ok else 'NOT met'}")
        return 0 if ok else 1
    return 0 if our_ctx > plain_ctx else 1  # toy run: the code path works and the context grows


if __name__ == "__main__":
    raise SystemExit(main())
