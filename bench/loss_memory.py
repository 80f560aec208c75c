"""Peak memory of the LM head + causal-LM loss (forward and backward) at 32K tokens: chunked vs naive, on CPU.

Goal: the chunked loss (hyperjob.longctx.chunked_loss) peaks at <= 1/16 of the naive full-logits loss at 32768
tokens and Llama-3's vocabulary of 128256; exits 1 if not met, or if the cross-check below fails.

The naive 32K case holds 16.8 GB of float32 logits (plus the log-softmax and its gradient), too much to allocate
here, so both sides run under FakeTensorMode (tensors with shapes and no memory) while
hyperjob.longctx.memtrack.PeakMemory counts every storage the ops create until it is freed. To show those figures
are real, a size that fits (2048 tokens) runs both ways with real tensors too: the tracker must give the same peak
on real and fake tensors, and the process's resident-memory high-water mark (VmHWM, reset through
/proc/self/clear_refs) must agree with it.

Peaks are "total": the inputs (hidden states, labels, head weight) plus the most bytes the step allocated at once.
The head is frozen (LoRA); --trainable-head adds its weight gradient. The tracker counts tensors, not scratch a
kernel frees before returning; the resident-memory check bounds what that misses (~3% here). Both sides hold about
three [tokens, vocab] float32 arrays at their peak (logits, log-softmax, their gradient), so the ratio is close to
chunk / tokens: chunk 1024 is 1/30, 2048 just misses 1/16 and 4096 gives 1/8 at 32K tokens.

    .venv/bin/python bench/loss_memory.py [--tokens 32768] [--vocab 128256] [--hidden 128] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import shlex
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hyperjob.longctx.chunked_loss import lm_loss
from hyperjob.longctx.memtrack import PeakMemory

GOAL = 16  # chunked <= naive / GOAL
RSS_TOLERANCE = 0.10  # resident-memory check: within 10% of the tracker (+ RSS_SLACK for allocator/page rounding)
RSS_SLACK = 64 << 20
CLEAR_REFS = Path("/proc/self/clear_refs")
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def step_peak(impl: str, tokens: int, args: argparse.Namespace, chunk: int, fake: bool) -> tuple[int, int, int]:
    """(input bytes, step peak bytes, RSS high-water delta or -1) of one head + loss forward and backward."""
    dtype = getattr(torch, args.dtype)
    with FakeTensorMode() if fake else torch.enable_grad():
        torch.manual_seed(0)
        head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=dtype).requires_grad_(args.trainable_head)
        hidden = torch.randn(tokens, args.hidden, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, args.vocab, (tokens,))
        inputs = sum(t.untyped_storage().nbytes() for t in (head.weight, hidden, labels))
        rss = ResidentPeak(enabled=not fake)
        with rss, PeakMemory() as mem:
            total, count = lm_loss(hidden, labels, head, impl=impl, chunk=chunk)
            (total / count).backward()
    return inputs, mem.peak, rss.delta


class ResidentPeak:
    """The process's resident-memory high-water mark over a block, above its resident memory at the start."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.delta = -1
        self._start = 0

    def __enter__(self) -> ResidentPeak:
        if self.enabled:
            gc.collect()
            try:
                CLEAR_REFS.write_text("5")  # 5: reset VmHWM to the current VmRSS
            except OSError:  # not Linux, or not allowed: the check says "unavailable"
                return self
            self._start = status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start:
            self.delta = (status_kib("VmHWM") - self._start) * 1024


def return_freed_memory() -> None:
    """Make glibc serve every allocation >= 1 MiB by mmap, so freeing it lowers the resident memory at once.

    Otherwise glibc raises its mmap threshold (up to 32 MiB) after the first large free, and later tensors below it
    (a bf16 [128256, 128] weight gradient is 31 MiB) come from heap pages it keeps after they are freed: resident
    memory would then measure the allocator's retention, not the live tensors. No effect outside glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cross_check(args: argparse.Namespace) -> bool:
    """Tracker on real vs fake tensors, and vs resident memory, at a size that fits; prints a table."""
    tokens, chunk = args.check_tokens, args.check_chunk
    print(f"## Cross-check: {tokens} tokens, chunk {chunk}, real tensors vs fake\n")
    print("| loss | tracker, real | tracker, fake | RSS high-water delta | RSS / tracker |")
    print("| --- | --- | --- | --- | --- |")
    return_freed_memory()
    ok = True
    for impl in ("standard", "chunked"):
        _, real, rss = step_peak(impl, tokens, args, chunk, fake=False)
        _, fake, _ = step_peak(impl, tokens, args, chunk, fake=True)
        rss_ok = rss < 0 or abs(rss - real) <= RSS_TOLERANCE * real + RSS_SLACK
        ok = ok and real == fake and rss_ok
        rss_text = "unavailable" if rss < 0 else gib(rss)
        ratio = "-" if rss < 0 else f"{rss / real:.3f}"
        print(f"| {impl} | {gib(real)} | {gib(fake)} | {rss_text} | {ratio} |")
    print(f"\ncross-check {'OK' if ok else 'FAILED'} (tracker real == fake, RSS within 10% + 64 MiB)\n")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024, help="chunk measured against the goal")
    parser.add_argument("--also-chunks", type=int, nargs="*", default=[2048, 4096], help="printed, not gated")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--trainable-head", action="store_true")
    parser.add_argument("--check-tokens", type=int, default=2048)
    parser.add_argument("--check-chunk", type=int, default=256)
    args = parser.parse_args()
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}\n")
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}, head "
          f"{'trainable' if args.trainable_head else 'frozen'}; torch {torch.__version__}\n")  # fmt: skip
    checked = cross_check(args)

    inputs, naive_step, _ = step_peak("standard", args.tokens, args, args.chunk, fake=True)
    naive = inputs + naive_step
    print(f"## {args.tokens} tokens (fake tensors), inputs {gib(inputs)}\n")
    print("| loss | chunk | peak (inputs + step) | chunked / naive |")
    print("| --- | --- | --- | --- |")
    print(f"| naive | - | {gib(naive)} | 1 |")
    ratios = {}
    for chunk in [args.chunk, *args.also_chunks]:
        chunked = sum(step_peak("chunked", args.tokens, args, chunk, fake=True)[:2])
        ratios[chunk] = chunked / naive
        print(f"| chunked | {chunk} | {gib(chunked)} | 1/{naive / chunked:.1f} |")
    met = ratios[args.chunk] <= 1 / GOAL
    print(f"\ngoal chunked <= 1/{GOAL} of naive at chunk {args.chunk}: {'met' if met else 'NOT met'}")
    return 0 if met and checked else 1


if __name__ == "__main__":
    sys.exit(main())
