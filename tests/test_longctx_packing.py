"""Packing with sequence-ID masking: packed samples train exactly as if each ran alone.

The model tests run a real tiny LlamaForCausalLM (transformers builds the block-diagonal mask from position_ids);
the packer tests are pure Python.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperjob.longctx.packing import (
    IGNORE_INDEX,
    Example,
    PackStats,
    pack,
    pack_stats,
    padded_stats,
    real_tokens,
)
from hyperjob.stages.data import DataError, PadCollator, concat_examples
from hyperjob.stages.tiny import TINY_ARCH

VOCAB = 96
PAD = 0
TOL = 1e-5


def make_model(attn: str) -> Any:
    """A tiny Llama under a LoRA adapter (random, not zero, so it changes the outputs), as the train stage runs it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY_ARCH, "vocab_size": VOCAB, "max_position_embeddings": 256},
        initializer_range=0.2,  # larger than default so attention is far from uniform: leaks show up clearly
        attn_implementation=attn,
    )
    base = LlamaForCausalLM(config).float()
    # As the train stage sets it. transformers derives the packed mask from position_ids only without a KV cache:
    # with one (the default in eval), every packed sample would attend to the samples before it in its row.
    base.config.use_cache = False
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def example(n: int, rng: random.Random, prompt: int | None = None) -> Example:
    """Random tokens (never PAD); the first `prompt` labels ignored, as a prompt's are."""
    ids = [rng.randrange(1, VOCAB) for _ in range(n)]
    prompt = n // 3 if prompt is None else prompt
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy after the causal shift: [b, t] is the loss of predicting labels[b, t + 1]."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


def alone(model: Any, ex: Example) -> torch.Tensor:
    """The sample's per-token losses when it is the whole input (no mask, default positions)."""
    batch = {k: torch.tensor([ex[k]]) for k in ("input_ids", "labels")}
    return token_losses(model, batch)[0]


def segments(row: Example) -> list[tuple[int, int]]:
    """[start, end) of every position run in a packed row (the samples, then the padding block)."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, [*starts[1:], len(row["position_ids"])], strict=True))


# ---------------------------------------------------------------- the model sees each sample alone


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked(attn: str) -> None:
    model = make_model(attn)
    rng = random.Random(1)
    # Half the samples train their first token too (prompt=0), so packing must drop that target itself.
    examples = [example(n, rng, prompt=i % 2 * n // 3) for i, n in enumerate((9, 17, 5, 23, 11, 30, 14, 7))]
    rows = list(pack(examples, seq_len=48, pad_id=PAD, buffer=16))
    assert len(rows) >= 2 and any(real_tokens(r) < 48 for r in rows)  # a batch of several rows, with padding
    batch = PadCollator(PAD)(rows)
    assert "attention_mask" not in batch  # so transformers builds the packed mask from position_ids
    packed = token_losses(model, batch)
    by_ids = {tuple(ex["input_ids"]): ex for ex in examples}
    seen, total, count, worst = 0, 0.0, 0, 0.0
    for r, row in enumerate(rows):
        for a, z in segments(row)[: -1 if real_tokens(row) < 48 else None]:
            ex = by_ids[tuple(row["input_ids"][a:z])]
            single = alone(model, ex)
            # Positions a..z-2 predict the sample's own tokens; z-1 would predict the next sample's first token,
            # which packing ignores (as it does not exist when the sample runs alone).
            got = packed[r, a : z - 1]
            worst = max(worst, (got - single).abs().max().item())
            assert z == 48 or packed[r, z - 1].item() == 0.0
            trained = torch.tensor(ex["labels"][1:]) != IGNORE_INDEX
            assert got[trained].mean().item() == pytest.approx(single[trained].mean().item(), abs=TOL)
            total += single[trained].sum().item()
            count += int(trained.sum())
            seen += 1
    assert seen == len(examples) and worst < TOL, worst
    # And the model's own loss over the collated batch is the token-weighted mean of the samples run alone.
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(total / count, abs=TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_probe_sample_unchanged_by_what_is_packed_before_it(attn: str) -> None:
    model = make_model(attn)
    rng = random.Random(2)
    other, probe = example(20, rng), example(12, rng, prompt=1)
    expected = alone(model, probe)

    (row,) = pack([other, probe], seq_len=40, pad_id=PAD)
    (_, (a, z), _) = segments(row)
    assert row["input_ids"][a:z] == probe["input_ids"]  # packed after `other`
    packed = token_losses(model, PadCollator(PAD)([row]))[0, a : z - 1]
    assert (packed - expected).abs().max().item() < TOL

    # The old layout (one causal mask, positions running on) lets the probe attend to `other`: its losses move.
    # This is what the assertion above would catch if packing leaked.
    (old,) = concat_examples([other, probe], seq_len=40, pad_id=PAD)
    assert "position_ids" not in old and old["input_ids"][20:32] == probe["input_ids"]
    leaked = token_losses(model, PadCollator(PAD)([old]))[0, 20:31]
    assert (leaked - expected).abs().max().item() > 1e-3


def test_transformers_sees_one_block_per_sample_and_one_for_padding() -> None:
    from transformers.masking_utils import find_packed_sequence_indices

    rng = random.Random(3)
    (row,) = pack([example(5, rng), example(3, rng)], seq_len=12, pad_id=PAD)
    blocks = find_packed_sequence_indices(torch.tensor([row["position_ids"]]))
    assert blocks is not None and blocks[0].tolist() == [0] * 5 + [1] * 3 + [2] * 4


# ---------------------------------------------------------------- the packer


def check_rows(rows: list[Example], examples: list[Example], seq_len: int) -> None:
    """Every example exactly once, whole, in one position run; first label ignored; padding its own run."""
    keys = {"input_ids", "labels", "position_ids"}
    found: list[tuple[list[int], list[int]]] = []
    for row in rows:
        assert set(row) == keys and all(len(row[k]) == seq_len for k in keys)
        runs = segments(row)
        assert all(row["position_ids"][a:z] == list(range(z - a)) for a, z in runs)
        n = real_tokens(row)
        if n < seq_len:
            a, z = runs[-1]
            assert (a, z) == (n, seq_len) and row["input_ids"][a:] == [PAD] * (z - a)
            assert row["labels"][a:] == [IGNORE_INDEX] * (z - a)
            runs = runs[:-1]
        found += [(row["input_ids"][a:z], row["labels"][a:z]) for a, z in runs]
        assert any(label != IGNORE_INDEX for label in row["labels"])
    want = [(ex["input_ids"], [IGNORE_INDEX, *ex["labels"][1:]]) for ex in examples]
    assert sorted(found) == sorted(want)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 32), max_size=60),
    seq_len=st.integers(32, 80),
    buffer=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_pack_keeps_every_example_whole_once(lengths: list[int], seq_len: int, buffer: int, seed: int) -> None:
    rng = random.Random(seed)
    examples = [example(n, rng, prompt=rng.randint(0, 1)) for n in lengths]  # all keep a label once packed
    rows = list(pack(iter(examples), seq_len, PAD, buffer=buffer))
    check_rows(rows, examples, seq_len)
    assert rows == list(pack(examples, seq_len, PAD, buffer=buffer))  # deterministic


def test_pack_streams_holding_at_most_buffer_examples() -> None:
    rng = random.Random(4)
    examples = [example(rng.randint(2, 40), rng) for _ in range(300)]
    consumed = 0

    def source() -> Iterator[Example]:
        nonlocal consumed
        for ex in examples:
            consumed += 1
            yield ex

    emitted, first_row_at, rows = 0, None, []
    for row in pack(source(), seq_len=64, pad_id=PAD, buffer=10):
        first_row_at = consumed if first_row_at is None else first_row_at
        emitted += len(segments(row)) - (real_tokens(row) < 64)
        assert consumed - emitted <= 10, (consumed, emitted)
        rows.append(row)
    assert first_row_at == 10 and consumed == 300  # the first row comes out once the buffer is full
    check_rows(rows, examples, 64)


def _ex(labels: list[int]) -> Example:
    return {"input_ids": list(range(1, len(labels) + 1)), "labels": labels}


@pytest.mark.parametrize(
    ("examples", "expected_rows"),
    [
        pytest.param([], [], id="empty input"),
        pytest.param([_ex([IGNORE_INDEX] * 3), _ex([IGNORE_INDEX] * 5)], [], id="all labels ignored"),
        pytest.param([_ex([7, IGNORE_INDEX, IGNORE_INDEX])], [], id="only the first token trained"),
        pytest.param([{"input_ids": [], "labels": []}], [], id="empty example"),
        pytest.param(
            [_ex([1, 2, 3, 4, 5, 6])],
            [{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [IGNORE_INDEX, 2, 3, 4, 5, 6], "position_ids": [*range(6)]}],
            id="one example of exactly seq_len",
        ),
        pytest.param(
            [_ex([IGNORE_INDEX, 2]), _ex([IGNORE_INDEX] * 3)],
            [
                {
                    "input_ids": [1, 2, 0, 0, 0, 0],
                    "labels": [IGNORE_INDEX, 2, *[IGNORE_INDEX] * 4],
                    "position_ids": [0, 1, 0, 1, 2, 3],
                }
            ],
            id="padding tail is its own run",
        ),
    ],
)
def test_pack_edge_cases(examples: list[Example], expected_rows: list[Example]) -> None:
    assert list(pack(examples, seq_len=6, pad_id=PAD)) == expected_rows


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"input_ids": [1] * 7, "labels": [1] * 7}, "has 7 tokens, more than seq_len=6"),
        ({"input_ids": [1, 2], "labels": [1]}, "2 input_ids but 1 labels"),
    ],
)
def test_pack_refuses_bad_examples(bad: Example, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(pack([_ex([IGNORE_INDEX, 5]), bad], seq_len=6, pad_id=PAD))


# ---------------------------------------------------------------- stats


def test_pack_stats_count_real_and_pad_tokens() -> None:
    rng = random.Random(5)
    examples = [example(n, rng) for n in (30, 20, 10, 25)]
    stats = pack_stats(pack(examples, seq_len=40, pad_id=PAD))
    assert (stats.rows, stats.real_tokens, stats.pad_tokens) == (3, 85, 35)
    assert stats.pad_fraction == pytest.approx(1 - 85 / 120)
    assert stats.tokens_per_step(micro_batch=2, grad_accum=3, data_parallel=2) == pytest.approx(85 / 3 * 12)


def test_padded_stats_match_the_collator() -> None:
    lengths = [3, 5, 2]
    assert padded_stats(lengths, micro_batch=2) == PackStats.of(rows=3, real_tokens=10, pad_tokens=2)
    assert padded_stats(lengths, micro_batch=2, multiple=4).pad_tokens == 8 + 2
    assert padded_stats(lengths, micro_batch=2, pad_to=8).pad_tokens == 5 + 3 + 6
    batches = [
        [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths[:2]],
        [{"input_ids": [1] * 2, "labels": [1] * 2}],
    ]
    pads = sum(int((PadCollator(PAD, pad_to_multiple_of=4)(b)["attention_mask"] == 0).sum()) for b in batches)
    assert pads == padded_stats(lengths, micro_batch=2, multiple=4).pad_tokens


# ---------------------------------------------------------------- the collator


def test_collator_passes_position_ids_and_no_attention_mask() -> None:
    rng = random.Random(6)
    rows = list(pack([example(n, rng) for n in (7, 5, 9, 4)], seq_len=12, pad_id=PAD))
    out = PadCollator(PAD, pad_to_multiple_of=8)(rows)
    assert set(out) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (len(rows), 16) and v.dtype == torch.long for v in out.values())
    for i, row in enumerate(rows):  # the extra padding: pad ids, ignored labels, a fresh position run
        assert out["input_ids"][i].tolist() == row["input_ids"] + [PAD] * 4
        assert out["labels"][i].tolist() == row["labels"] + [IGNORE_INDEX] * 4
        assert out["position_ids"][i].tolist() == row["position_ids"] + [0, 1, 2, 3]
    with pytest.raises(DataError, match="mixes packed rows"):
        PadCollator(PAD)([rows[0], {"input_ids": [1, 2], "labels": [1, 2]}])
