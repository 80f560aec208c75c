"""`hyperjob consolidate` and `hyperjob merge` as a user runs them: results, and bad input refused cleanly.

Each bad input must exit non-zero with one message naming the problem (and the file), and leave nothing at
the output path. Checkpoints are generated at test time in the exact optimum-neuron format
(hyperjob.testing.neuron_checkpoints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperjob.testing.neuron_checkpoints import (
    PROJECTIONS,
    default_adapter_config,
    random_lora_state,
    tiny_llama_config,
    write_neuron_checkpoint,
)

CONFIG = tiny_llama_config(hidden=64, intermediate=128, heads=8, kv_heads=2, layers=2, vocab=256)


def hyperjob(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperjob", *map(str, args)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "model"
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="100KB")
    return out


def make_checkpoint(tmp_path: Path, *, xser: bool = True) -> Path:
    """A TP 8 GQA LoRA checkpoint (8 heads, 2 KV heads: KV replicated x4) under tmp_path/out; returns out."""
    state = random_lora_state(CONFIG, 4, PROJECTIONS, seed=1)
    write_neuron_checkpoint(
        tmp_path / "out", config=CONFIG, state_dict=state, kind="lora", tp=8, xser=xser,
        adapter_config=default_adapter_config(4, PROJECTIONS, lora_alpha=8), step=6,
    )  # fmt: skip
    return tmp_path / "out"


def model_dir(ckpt_out: Path) -> Path:
    return ckpt_out / "checkpoint-6" / "adapter_default" / "adapter_shards" / "model"


@pytest.mark.slow
def test_consolidate_and_merge_in_one_command(tmp_path: Path, base_model: Path) -> None:
    out = hyperjob("consolidate", make_checkpoint(tmp_path), "--output", tmp_path / "adapter",
                   "--base-model", base_model, "--merged-output", tmp_path / "merged")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "lora checkpoint (TP 8, PP 1, xser)" in out.stdout and "replica drift:" in out.stdout
    merge_line = next(line for line in out.stdout.splitlines() if line.startswith("merge: "))
    assert "worker(s)" in merge_line and "busy: disk read" in merge_line and "bound by" in merge_line
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    targets = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"])
    assert targets == set(PROJECTIONS)  # un-fused: gate_proj/up_proj, q/k/v
    base_shards = sorted(p.name for p in base_model.glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == base_shards

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    wrapped = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        a, b = merged(ids).logits, wrapped(ids).logits
    # The merged weights were rounded to bf16 once; compare at bf16 resolution of the logits.
    assert (a - b).abs().max() <= 0.02 * b.abs().max(), (a - b).abs().max()


def _missing_rank(ckpt: Path) -> str:
    victim = model_dir(ckpt) / "dp_rank_00_tp_rank_03_pp_rank_00.pt"
    victim.unlink()
    return victim.name


def _truncated_tensor(ckpt: Path) -> str:
    victim = sorted((model_dir(ckpt) / "dp_rank_00_tp_rank_05_pp_rank_00.pt.tensors").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:40])
    return victim.name


def _wrong_metadata(ckpt: Path) -> str:
    meta = model_dir(ckpt).parent / "mp_metadata_pp_rank_0.json"
    data = json.loads(meta.read_text())
    for info in data["parameters"].values():
        if info.get("tensor_model_parallel"):
            info["num_partitions"] = 4  # the files hold 8 ranks
    meta.write_text(json.dumps(data))
    return meta.name


def _no_done(ckpt: Path) -> str:
    (model_dir(ckpt).parent / "done").unlink()
    return "done"


@pytest.mark.parametrize("breakage", [_missing_rank, _truncated_tensor, _wrong_metadata, _no_done])
def test_broken_checkpoint_is_refused_and_nothing_written(tmp_path: Path, breakage: object) -> None:
    ckpt = make_checkpoint(tmp_path)
    named = breakage(ckpt)  # type: ignore[operator]
    out = hyperjob("consolidate", ckpt, "--output", tmp_path / "adapter")
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("hyperjob: error:") and named in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "adapter").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no temp dir left behind


def test_dora_adapter_is_refused(tmp_path: Path, base_model: Path) -> None:
    adapter = tmp_path / "dora"
    adapter.mkdir()
    cfg = {**default_adapter_config(4, PROJECTIONS, lora_alpha=8), "use_dora": True}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in random_lora_state(CONFIG, 4, PROJECTIONS).items()},
              adapter / "adapter_model.safetensors")  # fmt: skip
    out = hyperjob("merge", adapter, "--base", base_model, "--output", tmp_path / "merged")
    assert out.returncode == 1 and "DoRA" in out.stderr, out.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_of_a_mismatched_base_names_both(tmp_path: Path, base_model: Path) -> None:
    ckpt = make_checkpoint(tmp_path)
    assert hyperjob("consolidate", ckpt, "--output", tmp_path / "adapter").returncode == 0
    other = tmp_path / "other"
    from transformers import AutoModelForCausalLM, LlamaConfig

    small = LlamaConfig(**{**CONFIG, "intermediate_size": 96})
    AutoModelForCausalLM.from_config(small).to(torch.bfloat16).save_pretrained(other)
    out = hyperjob("merge", tmp_path / "adapter", "--base", other, "--output", tmp_path / "merged")
    assert out.returncode == 1 and str(other) in out.stderr and "does not fit" in out.stderr, out.stderr
    assert not (tmp_path / "merged").exists()


def test_bad_sizes_and_flags(tmp_path: Path) -> None:
    out = hyperjob("merge", tmp_path, "--base", tmp_path, "--output", tmp_path / "m", "--max-memory", "lots")
    assert out.returncode == 2 and "size 'lots'" in out.stderr
    out = hyperjob("consolidate", tmp_path, "--output", tmp_path / "a", "--base-model", tmp_path)
    assert out.returncode == 2 and "--base-model and --merged-output go together" in out.stderr
    for bad in ("0", "-2", "many"):
        out = hyperjob("merge", tmp_path, "--base-model", tmp_path, "--output", tmp_path / "m", "--workers", bad)
        assert out.returncode == 2 and f"--workers {bad}: use a positive number or auto" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
