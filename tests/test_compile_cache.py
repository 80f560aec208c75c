"""The compile cache manifest: an unchanged compile is skipped, any key change recompiles, a silent one fails.

Each test builds real run dirs for the Trainium example and runs the CLI in subprocesses, with the test itself
writing `.neff` files between begin and finish as a stand-in for neuron_parallel_compile.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fixtures_tiny import REPO_ROOT

from hyperjob.config.load import dump_config, load_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, base_model_dir, compile_cache_dir
from hyperjob.plan.planner import make_plan
from hyperjob.stages.compile_cache import (
    MANIFEST_NAME,
    NEEDS_COMPILE,
    find_neffs,
    graph_key,
    key_changes,
    key_digest,
    why_compile,
)

EXAMPLE = REPO_ROOT / "examples" / "trainium-llama3-8b.yaml"
FAKE_MODEL_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32, "num_key_value_heads": 8}
NEFFS = ("neuronxcc-2.21.33363.0+fake/MODULE_1111/model.neff", "neuronxcc-2.21.33363.0+fake/MODULE_2222/model.neff")


def make_neuron_run(work: Path, name: str, overrides: Sequence[str] = ()) -> tuple[Path, HyperjobConfig]:
    """A run dir for the Trainium example under `work`, with a fake downloaded config.json."""
    cfg = load_config(EXAMPLE, overrides=[f"workdir={work}", *overrides])
    run_dir = work / "runs" / name
    run_dir.mkdir(parents=True)
    RunPaths(run_dir).config.write_text(dump_config(cfg), encoding="utf-8")
    model_config = base_model_dir(cfg) / "config.json"
    if not model_config.exists():
        model_config.parent.mkdir(parents=True)
        model_config.write_text(json.dumps(FAKE_MODEL_CONFIG), encoding="utf-8")
    return run_dir, cfg


def cli(run_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "hyperjob.stages.compile_cache", "--run-dir", str(run_dir), command]
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def fake_compile(cache: Path, neffs: Sequence[str]) -> None:
    """What neuron_parallel_compile leaves behind: one NEFF per compiled graph module."""
    for rel in neffs:
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(b"NEFF")


def compile_run(run_dir: Path, cfg: HyperjobConfig, neffs: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """begin, the stand-in compile, finish; asserts begin succeeded and returns finish's result."""
    started = cli(run_dir, "begin")
    assert started.returncode == 0, started.stderr
    fake_compile(compile_cache_dir(cfg), neffs)
    return cli(run_dir, "finish")


def manifest(cfg: HyperjobConfig) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = json.loads((compile_cache_dir(cfg) / MANIFEST_NAME).read_text())["entries"]
    return entries


def digest_in(out: str) -> str:
    found = re.search(r"key ([0-9a-f]{16})", out)
    assert found, out
    return found.group(1)


def test_first_check_needs_compile_and_writes_the_key(tmp_path: Path) -> None:
    run_dir, _ = make_neuron_run(tmp_path, "a")
    result = cli(run_dir, "check")
    assert result.returncode == NEEDS_COMPILE, result.stderr
    assert "nothing compiled into this cache yet" in result.stdout
    key = json.loads((run_dir / "compile" / "key.json").read_text())
    assert key["seq_len"] == 2048 and key["tensor_parallel"] == 8 and key["neuronx_cc"] == "not installed"
    assert digest_in(result.stdout) == key_digest(key)  # the same digest in this process as in the CLI's


def test_compile_records_then_an_unchanged_run_skips(tmp_path: Path) -> None:
    first, cfg = make_neuron_run(tmp_path, "first")
    done = compile_run(first, cfg, NEFFS)
    assert done.returncode == 0, done.stderr
    assert f"compiled 2 new graphs into {compile_cache_dir(cfg)}" in done.stdout
    (entry,) = manifest(cfg).values()
    assert entry["neffs"] == sorted(NEFFS) and entry["run_dir"] == str(first)

    second, _ = make_neuron_run(tmp_path, "second")
    skip = cli(second, "check")
    assert skip.returncode == 0, skip.stdout + skip.stderr
    assert skip.stdout.count("\n") == 1
    assert "nothing to compile" in skip.stdout and "all 2 graphs present" in skip.stdout
    assert f"by {first}" in skip.stdout and str(entry["compiled_at"]) in skip.stdout
    assert digest_in(skip.stdout) == digest_in(done.stdout)


@pytest.mark.parametrize(
    ("overrides", "change"),
    [
        (["training.seq_len=4096"], "seq_len 2048 -> 4096"),
        (["lora.r=32"], "lora_r 16 -> 32"),
    ],
)
def test_a_changed_key_needs_compile_and_names_the_change(tmp_path: Path, overrides: list[str], change: str) -> None:
    first, cfg = make_neuron_run(tmp_path, "first")
    assert compile_run(first, cfg, NEFFS).returncode == 0
    changed, _ = make_neuron_run(tmp_path, "changed", overrides)
    result = cli(changed, "check")
    assert result.returncode == NEEDS_COMPILE, result.stderr
    assert f"no compiled graphs for these shapes: {change} " in result.stdout


def test_a_compile_that_wrote_nothing_fails(tmp_path: Path) -> None:
    run_dir, cfg = make_neuron_run(tmp_path, "a")
    result = compile_run(run_dir, cfg, [])
    assert result.returncode == 2
    assert "neuron_parallel_compile wrote no compiled graph (*.neff)" in result.stderr
    assert "failed silently" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (compile_cache_dir(cfg) / MANIFEST_NAME).exists()


def test_neffs_of_another_key_do_not_count_as_this_compiles(tmp_path: Path) -> None:
    first, cfg = make_neuron_run(tmp_path, "first")
    assert compile_run(first, cfg, NEFFS).returncode == 0
    other, _ = make_neuron_run(tmp_path, "other", ["training.seq_len=4096"])
    result = compile_run(other, cfg, [])
    assert result.returncode == 2 and "failed silently" in result.stderr


def test_a_deleted_graph_needs_compile(tmp_path: Path) -> None:
    run_dir, cfg = make_neuron_run(tmp_path, "a")
    assert compile_run(run_dir, cfg, NEFFS).returncode == 0
    (compile_cache_dir(cfg) / NEFFS[0]).unlink()
    result = cli(run_dir, "check")
    assert result.returncode == NEEDS_COMPILE
    assert "1 of 2 graphs recorded for this key are missing from the cache" in result.stdout


def test_a_recompile_that_restores_nothing_still_fails(tmp_path: Path) -> None:
    run_dir, cfg = make_neuron_run(tmp_path, "a")
    assert compile_run(run_dir, cfg, NEFFS).returncode == 0
    (compile_cache_dir(cfg) / NEFFS[0]).unlink()
    result = compile_run(run_dir, cfg, [])
    assert result.returncode == 2
    assert "failed silently; 1 of 2 graphs recorded for this key are still missing" in result.stderr


def test_a_recompile_merges_with_the_graphs_still_present(tmp_path: Path) -> None:
    run_dir, cfg = make_neuron_run(tmp_path, "a")
    assert compile_run(run_dir, cfg, NEFFS).returncode == 0
    (compile_cache_dir(cfg) / NEFFS[0]).unlink()
    extra = "neuronxcc-2.21.33363.0+fake/MODULE_3333/model.neff"
    result = compile_run(run_dir, cfg, [NEFFS[0], extra])
    assert result.returncode == 0 and "compiled 2 new graphs" in result.stdout
    (entry,) = manifest(cfg).values()
    assert entry["neffs"] == sorted([*NEFFS, extra])
    assert cli(run_dir, "check").returncode == 0


def test_finish_without_begin_fails(tmp_path: Path) -> None:
    run_dir, cfg = make_neuron_run(tmp_path, "a")
    fake_compile(compile_cache_dir(cfg), NEFFS)
    result = cli(run_dir, "finish")
    assert result.returncode == 2
    assert "neffs-before.json does not exist: `compile_cache begin` was not run" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_config_says_to_download(tmp_path: Path) -> None:
    run_dir, cfg = make_neuron_run(tmp_path, "a")
    (base_model_dir(cfg) / "config.json").unlink()
    result = cli(run_dir, "check")
    assert result.returncode == 2
    assert f"{base_model_dir(cfg) / 'config.json'} does not exist: run the download stage first" in result.stderr


def test_two_keys_keep_both_entries(tmp_path: Path) -> None:
    a, cfg = make_neuron_run(tmp_path, "a")
    b, _ = make_neuron_run(tmp_path, "b", ["training.micro_batch=2"])
    other = ("neuronxcc-2.21.33363.0+fake/MODULE_9999/model.neff",)
    assert compile_run(a, cfg, NEFFS).returncode == 0
    assert compile_run(b, cfg, other).returncode == 0
    entries = manifest(cfg)
    assert sorted(tuple(e["neffs"]) for e in entries.values()) == sorted([tuple(sorted(NEFFS)), other])
    assert cli(a, "check").returncode == 0 and cli(b, "check").returncode == 0


# --- pure functions -----------------------------------------------------------------------------------------


def test_graph_key_is_the_graph_shaping_fields(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, overrides=[f"workdir={tmp_path}", "lora.target_modules=[v_proj,q_proj]"])
    key = graph_key(cfg, make_plan(cfg), "ab" * 32, None)
    assert key == {
        "neuronx_cc": "not installed",
        "tensor_parallel": 8,
        "pipeline_parallel": 1,
        "data_parallel": 4,
        "kv_size_multiplier": None,
        "seq_len": 2048,
        "micro_batch": 1,
        "gradient_checkpointing": True,
        "bf16": True,
        "model_config_sha256": "ab" * 32,
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
    }
    assert key_digest(key) == key_digest(dict(reversed(key.items())))  # field order does not matter
    assert re.fullmatch(r"[0-9a-f]{16}", key_digest(key))


BASE: dict[str, object] = {"neuronx_cc": "2.21", "seq_len": 2048, "lora_r": 16, "lora_target_modules": ["q", "v"]}


@pytest.mark.parametrize(
    ("new", "changes"),
    [
        (BASE, []),
        ({**BASE, "seq_len": 4096}, ["seq_len 2048 -> 4096"]),
        ({**BASE, "seq_len": 1024, "lora_r": 8}, ["seq_len 2048 -> 1024", "lora_r 16 -> 8"]),
        ({**BASE, "lora_target_modules": ["k", "q", "v"]}, ["lora_target_modules [q,v] -> [k,q,v]"]),
        ({**BASE, "neuronx_cc": "not installed"}, ["neuronx_cc 2.21 -> not installed"]),
        ({**BASE, "bf16": False}, ["bf16 (absent) -> False"]),
        ({k: v for k, v in BASE.items() if k != "lora_r"}, ["lora_r 16 -> (absent)"]),
        ({**BASE, "seq_len": None}, ["seq_len 2048 -> none"]),
        ({**BASE, "neuronx_cc": "0" * 64}, ["neuronx_cc 2.21 -> 000000000000"]),
    ],
)
def test_key_changes(new: dict[str, object], changes: list[str]) -> None:
    assert key_changes(BASE, new) == changes


def test_why_compile() -> None:
    digest = key_digest(BASE)
    entry = {"key": BASE, "neffs": ["a.neff", "b.neff"], "compiled_at": "2026-01-01T00:00:00+00:00", "run_dir": "r1"}
    older = {**entry, "key": {**BASE, "seq_len": 512}, "compiled_at": "2025-01-01T00:00:00+00:00", "run_dir": "r0"}
    assert why_compile(BASE, {digest: entry}, []) is None
    assert why_compile(BASE, {digest: entry}, ["a.neff"]) == (
        "1 of 2 graphs recorded for this key are missing from the cache"
    )
    assert why_compile(BASE, {}, []) == "no compiled graphs for these shapes: nothing compiled into this cache yet"
    new = {**BASE, "seq_len": 4096}
    assert why_compile(new, {"x": older, digest: entry}, []) == (
        "no compiled graphs for these shapes: seq_len 2048 -> 4096 (vs the newest compile, by r1)"
    )


def test_find_neffs(tmp_path: Path) -> None:
    assert find_neffs(tmp_path / "absent") == set()
    fake_compile(tmp_path, NEFFS)
    (tmp_path / "neuronxcc-x" / "MODULE_5").mkdir(parents=True)
    (tmp_path / "neuronxcc-x" / "MODULE_5" / "model.hlo_module.pb").write_bytes(b"")
    assert find_neffs(tmp_path) == set(NEFFS)
