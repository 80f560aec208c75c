"""How much padding does packing remove, and how many more real tokens does an optimizer step see?

Goal: packed pad fraction <= 2% at seq_len 1024, 2048 and 8192 on a dolly-like dataset (exit 1 otherwise).

The lengths are synthetic, so the bench needs no tokenizer or download. databricks-dolly-15k rendered in hyperjob's
dolly prompt format and tokenized with a Llama tokenizer is right-skewed: median about 120 tokens, a few percent
over 500, a long tail to several thousand (long `context` passages). The model here: 16 template tokens (the
"### Instruction / ### Response" scaffold, <s>, </s>) plus a log-normal body with median 104 and sigma 0.9, seeded;
that gives a median of ~120, mean ~172, p99 ~870 and a maximum of ~4,000 over 15,000 examples (seeds 0-3). The first
40% of each example (at least 8 tokens) is prompt (labels ignored), as in the real data. Examples longer than
seq_len are truncated first, as `build_examples` does.

Compared: packed rows (`hyperjob.longctx.packing.pack`) against the unpacked path, one example per row, padded to
the longest example of its micro-batch (what `PadCollator` does) or to seq_len. Rows are taken in dataset order,
which is random like the Trainer's shuffled sampler. Prints a markdown table for bench/RESULTS.md.

    .venv/bin/python bench/packing.py [--examples 15000] [--micro-batch 8] [--grad-accum 1] [--dp 1]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

from hyperjob.longctx.packing import DEFAULT_BUFFER, IGNORE_INDEX, Example, PackStats, pack, pack_stats, padded_stats

SEQ_LENS = (1024, 2048, 8192)
GOAL = 0.02
TEMPLATE_TOKENS = 16
BODY_MEDIAN, BODY_SIGMA = 104.0, 0.9


def dolly_like_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [TEMPLATE_TOKENS + round(rng.lognormvariate(math.log(BODY_MEDIAN), BODY_SIGMA)) for _ in range(n)]


def example(length: int, seq_len: int) -> Example:
    """Token ids do not matter to packing; the label mask does (the packer drops examples with nothing to train)."""
    n = min(length, seq_len)
    prompt = max(8, int(0.4 * n))
    ids = list(range(1, n + 1))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def describe(lengths: list[int]) -> str:
    s = sorted(lengths)
    median, p90, p99 = (s[min(len(s) - 1, int(q * len(s)))] for q in (0.5, 0.9, 0.99))
    return f"median {median}, mean {sum(s) / len(s):.0f}, p90 {p90}, p99 {p99}, max {s[-1]} tokens"


def row(seq_len: int, name: str, stats: PackStats, per_step: float, base: float) -> str:
    return (
        f"| {seq_len} | {name} | {stats.rows} | {100 * stats.pad_fraction:.2f}% | {per_step:,.0f} "
        f"| {per_step / base:.2f}x |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=15_000)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel processes")
    parser.add_argument("--buffer", type=int, default=DEFAULT_BUFFER, help="examples the packer holds at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = dolly_like_lengths(args.examples, args.seed)
    step = (args.micro_batch, args.grad_accum, args.dp)
    print(f"{args.examples} dolly-like examples ({describe(lengths)}); packer buffer {args.buffer} examples;")
    print(f"a step is micro-batch {args.micro_batch} x grad-accum {args.grad_accum} x dp {args.dp} rows\n")
    print("| seq_len | layout | rows | pad fraction | real tokens / step | vs padded-to-longest |")
    print("| --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    started = time.perf_counter()
    for seq_len in SEQ_LENS:
        clipped = [min(n, seq_len) for n in lengths]
        longest = padded_stats(clipped, args.micro_batch)
        full = padded_stats(clipped, args.micro_batch, pad_to=seq_len)
        packed = pack_stats(pack((example(n, seq_len) for n in lengths), seq_len, 0, buffer=args.buffer))
        worst = max(worst, packed.pad_fraction)
        base = longest.tokens_per_step(*step)
        print(row(seq_len, "padded to seq_len", full, full.tokens_per_step(*step), base))
        print(row(seq_len, "padded to longest in micro-batch", longest, base, base))
        print(row(seq_len, "packed", packed, packed.tokens_per_step(*step), base))
    elapsed = time.perf_counter() - started
    verdict = "ok" if worst <= GOAL else "FAIL"
    print(f"\nworst packed pad fraction {100 * worst:.2f}% (goal <= {100 * GOAL:.0f}%): {verdict}; {elapsed:.1f} s")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
