"""Packing whole examples into fixed-length rows whose samples cannot see each other.

A packed row carries `position_ids` that restart at 0 for every sample and no attention mask. transformers
(sdpa/eager via `masking_utils.find_packed_sequence_indices`, flash-attention-2 via varlen) starts a new
block-diagonal causal block wherever the positions do not step by exactly 1, so each sample attends only to itself
and sees the same RoPE positions as when it runs alone. The padding tail gets its own run 0..pad-1: it forms a block
of its own, so no real token attends to it and none of its rows is fully masked (which would give NaN in sdpa).

The first label of every sample is IGNORE_INDEX: after the causal shift, the previous sample's last token would
otherwise be trained to predict it, a target that does not exist when the sample runs alone. With that, every
sample's per-token losses equal its unpacked ones (tests/test_longctx_packing.py).

Pure Python (no torch), so the train stage, the bench and the tests can use it without a model.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
Example = dict[str, list[int]]

# Examples held at once. Best-fit-decreasing fills rows almost perfectly once the window holds a few rows' worth
# of short examples to plug the gaps. On a dolly-like length distribution (bench/packing.py) 2048 gives 0.2-0.3% pad
# at seq_len 1024, 2048 and 8192 (128 is already enough at 8192, 64 is not: 3.7%), with headroom for longer rows,
# and holds only a few MB of token lists.
DEFAULT_BUFFER = 2048


def _prepared(example: Example, seq_len: int, index: int) -> Example | None:
    """The example as it goes into a row (first label ignored), or None when it has nothing left to train on."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    if len(ids) != len(labels):
        raise ValueError(f"example {index}: {len(ids)} input_ids but {len(labels)} labels")
    if len(ids) > seq_len:
        raise ValueError(
            f"example {index} has {len(ids)} tokens, more than seq_len={seq_len}: truncate examples before packing"
        )
    if not ids:
        return None
    labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _best_fit_decreasing(items: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Bins of item indices: longest item first, each into the bin it fills most tightly.

    Within a bin, items keep their arrival order; bins are numbered in the order they were opened, so the result
    depends only on the item lengths and order (deterministic across processes).
    """
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin number), ascending; full bins are dropped
    for i in order:
        size = len(items[i]["input_ids"])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([i])
            space, number = seq_len - size, len(bins) - 1
        else:
            space, number = free.pop(at)
            bins[number].append(i)
            space -= size
        if space:
            bisect.insort(free, (space, number))
    return [sorted(b) for b in bins]


def _row(samples: Sequence[Example], seq_len: int, pad_id: int) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for sample in samples:
        ids += sample["input_ids"]
        labels += sample["labels"]
        positions += range(len(sample["input_ids"]))
    pad = seq_len - len(ids)
    return {
        "input_ids": ids + [pad_id] * pad,
        "labels": labels + [IGNORE_INDEX] * pad,
        "position_ids": positions + list(range(pad)),
    }


def pack(examples: Iterable[Example], seq_len: int, pad_id: int, buffer: int = DEFAULT_BUFFER) -> Iterator[Example]:
    """Rows of exactly `seq_len` tokens (`input_ids`, `labels`, `position_ids`), each holding whole examples.

    Streams: at most `buffer` examples are held at once. When the window is full it is packed best-fit-decreasing;
    every row but the least filled one (unless full) is yielded; its examples go back into the window to be packed
    with the next arrivals, so only the final flush leaves a partly empty row. Examples with no trained label once
    their first label is ignored are dropped (they add no loss), hence no row is all IGNORE_INDEX.
    Raises ValueError for an example longer than `seq_len`.
    """
    if seq_len < 1 or buffer < 1:
        raise ValueError(f"seq_len ({seq_len}) and buffer ({buffer}) must be positive")
    window: list[Example] = []
    for index, example in enumerate(examples):
        item = _prepared(example, seq_len, index)
        if item is None:
            continue
        window.append(item)
        if len(window) < buffer:
            continue
        bins = _best_fit_decreasing(window, seq_len)
        fill = [sum(len(window[i]["input_ids"]) for i in b) for b in bins]
        least = fill.index(min(fill))
        carried = bins[least] if len(bins) > 1 and fill[least] < seq_len else []
        for b in bins:
            if b is not carried:
                yield _row([window[i] for i in b], seq_len, pad_id)
        window = [window[i] for i in carried]
    for b in _best_fit_decreasing(window, seq_len):
        yield _row([window[i] for i in b], seq_len, pad_id)


# ---------------------------------------------------------------- stats


@dataclass(frozen=True)
class PackStats:
    """Token accounting of the rows the model is fed: what fraction of the compute is spent on padding.

    A plain dataclass so `dataclasses.asdict` puts it in train_summary.json.
    """

    rows: int
    real_tokens: int
    pad_tokens: int
    pad_fraction: float  # pad / (real + pad); for packed rows 1 - real / (rows * seq_len)

    @classmethod
    def of(cls, rows: int, real_tokens: int, pad_tokens: int) -> PackStats:
        total = real_tokens + pad_tokens
        return cls(rows, real_tokens, pad_tokens, pad_tokens / total if total else 0.0)

    def tokens_per_step(self, micro_batch: int, grad_accum: int = 1, data_parallel: int = 1) -> float:
        """Mean real (non-pad) tokens in one optimizer step of micro_batch * grad_accum * data_parallel rows."""
        return self.real_tokens / self.rows * micro_batch * grad_accum * data_parallel if self.rows else 0.0


def real_tokens(row: Example) -> int:
    """Tokens of a packed row that belong to examples: all but the padding tail.

    The tail is the last position run when all its labels are ignored; `pack` drops examples without a trained
    label, so a real sample never looks like that.
    """
    positions, labels = row["position_ids"], row["labels"]
    start = len(positions) - 1
    while start > 0 and positions[start] == positions[start - 1] + 1:
        start -= 1
    tail_is_pad = start > 0 and all(label == IGNORE_INDEX for label in labels[start:])
    return start if tail_is_pad else len(positions)


def pack_stats(rows: Iterable[Example]) -> PackStats:
    """Stats of packed rows (from `pack`)."""
    count = real = pad = 0
    for row in rows:
        n = real_tokens(row)
        count, real, pad = count + 1, real + n, pad + len(row["input_ids"]) - n
    return PackStats.of(count, real, pad)


def padded_stats(
    lengths: Iterable[int], micro_batch: int, pad_to: int | None = None, multiple: int | None = None
) -> PackStats:
    """Stats of the unpacked path: one example per row, each micro-batch padded to its longest example (what
    `PadCollator` does, rounded up to `multiple`), or every row to `pad_to` tokens when given."""
    batch: list[int] = []
    count = real = pad = 0

    def flush() -> None:
        nonlocal count, real, pad
        if not batch:
            return
        width = pad_to if pad_to is not None else max(batch)
        if multiple and pad_to is None:
            width = -(-width // multiple) * multiple
        count, real, pad = count + len(batch), real + sum(batch), pad + sum(width - n for n in batch)
        batch.clear()

    for n in lengths:
        batch.append(n)
        if len(batch) == micro_batch:
            flush()
    flush()
    return PackStats.of(count, real, pad)
