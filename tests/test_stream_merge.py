"""The streaming LoRA merge against peft's own merge_and_unload, plus its format, failure and memory guarantees.

Tolerances. fp32: both sides compute W + s * (B @ A) in fp32; only the order of the rank-r sum and where the
scale is applied differ, so elements agree to a few fp32 ulps (rtol 1e-6). bf16: both round the same fp32 sum
W + s*B@A to bf16 once (peft's bf16 += fp32 runs in fp32), so an element can differ only where the two fp32 sums
straddle a bf16 rounding boundary, by exactly one bf16 ulp (|x| * 2^-7 at most), in a tiny fraction of elements.
peft's embedding merge rounds the delta to bf16 before adding it (double rounding), so there the bound is 2 ulps.
Logits are compared in fp32 from the merged weights, so they only see those weight differences.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: E402

from hyperjob.checkpoint import direct_io, merge_pipeline, stream_merge  # noqa: E402
from hyperjob.checkpoint.errors import MergeError, SafetensorsError  # noqa: E402
from hyperjob.checkpoint.merge_pipeline import WRITERS, MergeStats  # noqa: E402
from hyperjob.checkpoint.safetensors_io import SafetensorsReader, SafetensorsWriter, plan_layout  # noqa: E402
from hyperjob.checkpoint.stream_merge import Sizing, merge_streaming, size_buffers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_spec = importlib.util.spec_from_file_location("merge_stream_bench", REPO / "bench" / "merge_stream.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

CASES: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32", "lora": {"r": 8, "lora_alpha": 16, "target_modules": ALL7}},
    "bf16": {"dtype": "bfloat16", "lora": {"r": 8, "lora_alpha": 16, "target_modules": ALL7}},
    "bf16-patterns-rslora-embedding-modules_to_save": {
        "dtype": "bfloat16",
        "lora": {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": [*ALL7, "embed_tokens"],
            "use_rslora": True,
            "rank_pattern": {"layers.1.mlp.down_proj": 4, "k_proj": 2},
            "alpha_pattern": {"q_proj": 5},
            "modules_to_save": ["lm_head"],
        },
        "perturb_saved_embedding": True,
    },
    "fp32-lora_bias": {
        "dtype": "float32",
        "bias": True,
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ALL7, "lora_bias": True},
    },
    "fp32-gpt2-fan_in_fan_out": {
        "dtype": "float32",
        "gpt2": True,
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    },
}


def _dt(name: str) -> Any:
    return getattr(torch, name)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny random bases saved in several shards, built once per (dtype, bias, arch) and per intermediate size."""
    root, made = tmp_path_factory.mktemp("bases"), {}

    def get(dtype: str, bias: bool = False, gpt2: bool = False, intermediate: int = 128) -> Path:
        key = (dtype, bias, gpt2, intermediate)
        if key not in made:
            torch.manual_seed(0)
            if gpt2:
                cfg: Any = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
            else:
                cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=64, attention_bias=bias, mlp_bias=bias)  # fmt: skip
            model = AutoModelForCausalLM.from_config(cfg).to(_dt(dtype))
            made[key] = root / "-".join(map(str, key))
            model.save_pretrained(made[key], max_shard_size=40_000 if dtype == "bfloat16" else 80_000)
        return made[key]

    return get


def _make_adapter(base: Path, out: Path, dtype: str, lora: dict[str, Any], seed: int = 1, **extra: Any) -> Path:
    """A peft LoRA with every LoRA factor and modules_to_save weight random (B non-zero), saved by peft itself."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=_dt(dtype))
    peft_model = get_peft_model(model, LoraConfig(**lora, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(out))
    return out


def _peft_merged(base: Path, adapter: Path, dtype: str) -> Any:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=_dt(dtype))
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def _safetensors_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.safetensors"))


def _ulp_bf16(x: Any) -> Any:
    """One bf16 ulp at |x| (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(1e-30))[1] - 8)


def _embedding_update(adapter: Path) -> tuple[Any, Any]:
    """(saved base embedding, s * (B @ A)^T) straight from the adapter files, for an rslora embedding LoRA."""
    sd, cfg = (
        load_file(adapter / "adapter_model.safetensors"),
        json.loads((adapter / "adapter_config.json").read_text()),
    )
    p = "base_model.model.model.embed_tokens."
    scale = cfg["lora_alpha"] / cfg["r"] ** 0.5
    return sd[p + "base_layer.weight"], scale * (
        sd[p + "lora_embedding_B"].float() @ sd[p + "lora_embedding_A"].float()
    ).T


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_merge_and_unload(case: str, bases: Any, tmp_path: Path) -> None:
    spec = CASES[case]
    dtype = spec["dtype"]
    base = bases(dtype, spec.get("bias", False), spec.get("gpt2", False))
    adapter = _make_adapter(base, tmp_path / "adapter", dtype, spec["lora"])
    if spec.get("perturb_saved_embedding"):  # peft loads a saved base_layer.weight over the base's: so must we
        weights = adapter / "adapter_model.safetensors"
        sd = load_file(weights)
        key = "base_model.model.model.embed_tokens.base_layer.weight"
        sd[key] = sd[key] + 0.05 * torch.randn_like(sd[key].float()).to(sd[key].dtype)
        save_file(sd, weights, metadata={"format": "pt"})
    out = merge_streaming(adapter, base, tmp_path / "out", progress=False)

    ref = _peft_merged(base, adapter, dtype)
    ref_sd = ref.state_dict()
    assert _safetensors_files(out) == _safetensors_files(base)
    base_index = base / "model.safetensors.index.json"
    if base_index.exists():
        assert json.loads((out / "model.safetensors.index.json").read_text()) == json.loads(base_index.read_text())
    for f in _safetensors_files(base):
        assert list(SafetensorsReader(out / f).tensors) == list(SafetensorsReader(base / f).tensors)  # same order
        for name, ours in load_file(out / f).items():
            theirs = ref_sd[name]
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            if dtype == "float32":
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
            else:
                diff = (ours.float() - theirs.float()).abs()
                bound = _ulp_bf16(torch.maximum(ours.float().abs(), theirs.float().abs()))
                if name == "model.embed_tokens.weight" and "embed_tokens" in spec["lora"]["target_modules"]:
                    # peft rounds this delta to bf16 before adding (30% of elements then differ): allow that error,
                    # and hold ours to the singly rounded value computed straight from the adapter's tensors.
                    w, delta = _embedding_update(adapter)
                    exact = (w.float() + delta).to(torch.bfloat16).float()
                    off = (ours.float() - exact).abs()
                    assert bool((off <= _ulp_bf16(exact)).all()) and (off > 0).float().mean().item() < 0.01
                    bound = bound + _ulp_bf16(delta)
                else:
                    assert (diff > 0).float().mean().item() < 0.01, name
                assert bool((diff <= bound).all()), f"{name}: {(diff > bound).sum()} elements beyond the bound"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_logits, ref_logits = merged(ids).logits, ref.float()(ids).logits
    scale = ref_logits.abs().max().item()
    # fp32: rounding only. bf16: a handful of 1-ulp (<= 0.8%) weight flips; with embedding LoRA peft's double
    # rounding shifts 30% of the embedding by up to an ulp, which moves logits by ~1% of their range.
    tol = 1e-5 if dtype == "float32" else 2e-2 if "embed_tokens" in spec["lora"]["target_modules"] else 2e-3
    print(f"{case}: max logit diff {(ours_logits - ref_logits).abs().max().item() / scale:.2e} of max logit")
    assert (ours_logits - ref_logits).abs().max().item() <= tol * scale


@pytest.fixture
def complex_adapter(bases: Any, tmp_path: Path) -> tuple[Path, Path]:
    base = bases("bfloat16")
    lora = CASES["bf16-patterns-rslora-embedding-modules_to_save"]["lora"]
    return _make_adapter(base, tmp_path / "adapter", "bfloat16", lora), base


def test_workers_tiny_chunks_and_blocks_give_identical_bytes(
    complex_adapter: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter, base = complex_adapter
    ref = merge_streaming(adapter, base, tmp_path / "ref", workers=1, progress=False)
    monkeypatch.setattr(stream_merge, "CHUNK_CAP", 2048)  # 5 rows per compute chunk
    monkeypatch.setattr(stream_merge, "BLOCK_CAP", direct_io.ALIGN)  # blocks cut rows and elements apart
    monkeypatch.setattr(merge_pipeline, "READAHEAD", 4096)
    calls: list[tuple[int, int]] = []
    stats = MergeStats()
    out = merge_streaming(adapter, base, tmp_path / "out", workers=3, progress=lambda d, t: calls.append((d, t)),
                          stats=stats)  # fmt: skip
    for f in _safetensors_files(base):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert len(calls) > 50 and calls[-1][0] == calls[-1][1] >= total  # progress counts file bytes (headers too)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(calls))
    assert stats.workers == 3 and stats.bytes == total and stats.wall > 0 and stats.direct
    assert "bound by" in stats.summary() and stats.bound() in stats.shares()


def test_buffered_writes_where_direct_io_is_refused(
    complex_adapter: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tmpfs and some network filesystems refuse O_DIRECT writes with EINVAL: the file goes on buffered."""
    adapter, base = complex_adapter
    ref = merge_streaming(adapter, base, tmp_path / "ref", progress=False)
    plain = merge_streaming(adapter, base, tmp_path / "plain", direct=False, progress=False)
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    stats = MergeStats()
    out = merge_streaming(adapter, base, tmp_path / "out", progress=False, stats=stats)
    assert refused and not stats.direct and "buffered writes" in stats.summary()
    for f in _safetensors_files(base):
        assert (out / f).read_bytes() == (ref / f).read_bytes() == (plain / f).read_bytes(), f


def test_auto_workers_fit_the_memory_budget() -> None:
    fixed = (WRITERS + 1) * stream_merge.BLOCK_CAP
    per = stream_merge.CHUNK_CAP + stream_merge.BLOCK_CAP
    assert size_buffers(fixed + 3 * per, None, cpus=64) == Sizing(3, stream_merge.CHUNK_CAP, stream_merge.BLOCK_CAP)
    auto = size_buffers(1 << 30, None, cpus=2)
    assert auto is not None and auto.workers == 2  # one per CPU when memory allows
    small = size_buffers(8 << 20, 2, cpus=2)  # an explicit count is kept; buffers shrink to fit
    assert small is not None and small.workers == 2 and small.block % direct_io.ALIGN == 0
    assert 2 * small.chunk + (2 + WRITERS + 1) * small.block <= 8 << 20
    assert size_buffers(1 << 20, 2, cpus=2) is None


def test_blocks_cover_every_byte_once() -> None:
    """Pieces tile each block, blocks tile the file: header, then each tensor's bytes in order."""
    entries = [("a", "BF16", (3, 5)), ("b", "F32", (7,)), ("c", "BF16", (4000,)), ("d", "F32", (0,))]
    layout = plan_layout(entries, {"format": "pt"})
    items = [merge_pipeline.Item(n, None, layout.tensors[n], dt, ()) for n, dt, _ in entries]  # type: ignore[arg-type]
    out = merge_pipeline.OutFile(None, layout, 0)  # type: ignore[arg-type]
    blocks = merge_pipeline.cut_blocks(out, items, direct_io.ALIGN)
    assert [b.offset for b in blocks] == list(range(0, layout.size, direct_io.ALIGN))
    assert sum(b.length for b in blocks) == layout.size and all(b.length <= direct_io.ALIGN for b in blocks)
    covered = []
    for b in blocks:
        assert [p.dst for p in b.pieces] == list(itertools.accumulate([0, *[p.n for p in b.pieces][:-1]]))
        assert sum(p.n for p in b.pieces) == b.length
        covered += [(p.item.name if p.item else "header", p.rel, p.n) for p in b.pieces]
    first = direct_io.ALIGN - layout.tensors["c"].start  # bytes of c in block 0
    assert covered[0] == ("header", 0, len(layout.header))
    assert [c[0] for c in covered] == ["header", "a", "b", "c", "c", "c"]  # c: 8000 bytes over three blocks
    second = first + direct_io.ALIGN
    assert covered[3:] == [("c", 0, first), ("c", first, direct_io.ALIGN), ("c", second, 8000 - second)]


@pytest.mark.parametrize(
    ("lo", "hi", "rows", "want"),
    [(0, 10, 100, (0, 10)), (5, 6, 100, (5, 9)), (98, 100, 100, (96, 100)), (1, 2, 3, (0, 3)), (0, 1, 1, (0, 1))],
)
def test_widen_gives_chunks_of_at_least_four_rows(lo: int, hi: int, rows: int, want: tuple[int, int]) -> None:
    assert merge_pipeline.widen(lo, hi, rows) == want


def test_reshard_with_max_shard_size(complex_adapter: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = complex_adapter
    ref = merge_streaming(adapter, base, tmp_path / "ref", progress=False)
    out = merge_streaming(adapter, base, tmp_path / "out", max_shard_size=100_000, progress=False)
    files = _safetensors_files(out)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    ours = {k: v for f in files for k, v in load_file(out / f).items()}
    theirs = {k: v for f in _safetensors_files(ref) for k, v in load_file(ref / f).items()}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    AutoModelForCausalLM.from_pretrained(out)  # the new index is one transformers accepts
    single = merge_streaming(adapter, base, tmp_path / "single", max_shard_size=10**9, progress=False)
    assert (
        _safetensors_files(single) == ["model.safetensors"] and not (single / "model.safetensors.index.json").exists()
    )


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced files through /proc")
def test_every_output_file_is_fsynced(
    complex_adapter: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter, shared = complex_adapter
    base = Path(shutil.copytree(shared, tmp_path / "base"))  # the base fixture is shared: leave it as it is
    (base / "tokenizer.json").write_text("{}")
    (adapter / "tokenizer_config.json").write_text("{}")  # not in the base: taken from the adapter
    fsynced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isfile(path := os.readlink(f"/proc/self/fd/{fd}")):
            fsynced.add(Path(path).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = merge_streaming(adapter, base, tmp_path / "out", workers=2, progress=False)
    written = {f.name for f in out.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer_config.json"} <= written
    assert fsynced == written


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "staging dir left behind"


def test_refuses_dora_and_unknown_types(bases: Any, tmp_path: Path) -> None:
    base = bases("float32")
    dora = _make_adapter(base, tmp_path / "dora", "float32", {"r": 4, "target_modules": ["q_proj"], "use_dora": True})
    with pytest.raises(MergeError, match="DoRA"):
        merge_streaming(dora, base, tmp_path / "out", progress=False)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False, "peft_type": "IA3"}))
    with pytest.raises(MergeError, match="IA3"):
        merge_streaming(dora, base, tmp_path / "out", progress=False)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(MergeError, match="lora_magnitude_vector"):  # DoRA weights under a non-DoRA config
        merge_streaming(dora, base, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")


def test_shape_mismatch_refused_before_writing(bases: Any, tmp_path: Path) -> None:
    adapter = _make_adapter(bases("float32"), tmp_path / "adapter", "float32", CASES["fp32"]["lora"])
    other = bases("float32", intermediate=96)
    with pytest.raises(MergeError) as err:
        merge_streaming(adapter, other, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "mlp.gate_proj" in msg and "[128, 64]" in msg and "[96, 64]" in msg
    assert str(adapter) in msg and str(other) in msg
    _no_output(tmp_path / "out")


def test_truncated_shard_names_file_and_keeps_previous_output(
    complex_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    adapter, good = complex_adapter
    base = Path(shutil.copytree(good, tmp_path / "base"))
    out = merge_streaming(adapter, base, tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    victim = base / _safetensors_files(base)[2]
    os.truncate(victim, victim.stat().st_size - 10)
    with pytest.raises(MergeError, match=f"{victim}.*truncated"):
        merge_streaming(adapter, base, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.*"))
    with pytest.raises(MergeError, match="truncated"):
        merge_streaming(adapter, base, tmp_path / "fresh", progress=False)
    _no_output(tmp_path / "fresh")


def test_stale_partial_dirs_removed_live_ones_kept(complex_adapter: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, base = complex_adapter
    stale, live = tmp_path / ".out.dead.partial", tmp_path / ".out.live.partial"
    stale.mkdir()
    (stale / "junk").write_text("x")
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running merge holds it
    try:
        merge_streaming(adapter, base, tmp_path / "out", progress=False)
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(MergeError, match="not a model directory"):
        merge_streaming(adapter, base, tmp_path / "notes", progress=False)  # would replace an unrelated dir


def test_plain_progress_lines_when_not_a_tty(
    complex_adapter: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, base = complex_adapter
    merge_streaming(adapter, base, tmp_path / "out")
    assert "(100%)" in capsys.readouterr().err


@pytest.fixture
def big_tmp(tmp_path: Path) -> Any:
    """tmp_path, emptied afterwards: pytest keeps the last runs' temp dirs, and these hold gigabytes."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _big_model(root: Path, layers: int, hidden: int, inter: int, vocab: int) -> tuple[Path, Path, int]:
    dims = (hidden, inter, layers, hidden // 64, hidden // 128, vocab)
    size = bench.write_base(root / "base", dims, 300 << 20)
    bench.write_adapter(root / "adapter", dims)
    return root / "adapter", root / "base", size


# The child reports VmHWM (peak RSS of its own address space). getrusage's ru_maxrss would not do: Linux carries
# the parent's peak across fork and exec, so a child of this pytest process (torch, transformers, peft and models
# loaded: ~600 MB) would report at least that much whatever it did itself.
CHILD = """
import os, sys, time
from pathlib import Path
from hyperjob.checkpoint import stream_merge

def hwm_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

print("IMPORTED", hwm_kb(), flush=True)
slow = float(os.environ.get("SLOW_S", "0"))
if slow:
    stream_merge.CHUNK_CAP = 64 << 10
    stream_merge.BLOCK_CAP = 64 << 10
stream_merge.merge_streaming(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), max_memory=int(sys.argv[4]),
                             progress=(lambda d, t: time.sleep(slow)) if slow else False)
print("PEAK", hwm_kb(), flush=True)
"""


def _child(args: list[str], **env: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", textwrap.dedent(CHILD), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})


@pytest.mark.slow
@pytest.mark.parametrize("previous", [False, True])
def test_kill_9_mid_merge_leaves_nothing_or_previous(previous: bool, big_tmp: Path) -> None:
    tmp_path = big_tmp
    adapter, base, _ = _big_model(tmp_path, layers=4, hidden=512, inter=1408, vocab=32000)
    out = tmp_path / "out"
    if previous:
        merge_streaming(adapter, base, out, progress=False)
        (out / "marker").write_text("previous")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _child([str(adapter), str(base), str(out), str(1 << 30)], SLOW_S="0.002")
    deadline = time.monotonic() + 60
    while not any(p.glob("*.safetensors") for p in tmp_path.glob(".out.*.partial")):
        assert proc.poll() is None and time.monotonic() < deadline, "merge ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert list(tmp_path.glob(".out.*.partial")), "the killed run's staging dir should be left for the next run"
    merge_streaming(adapter, base, out, progress=False)  # the next run cleans up and completes
    assert not list(tmp_path.glob(".out.*")) and not (out / "marker").exists()
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)


@pytest.mark.slow
def test_peak_rss_stays_flat_for_a_1gb_model(big_tmp: Path) -> None:
    tmp_path = big_tmp
    adapter, base, size = _big_model(tmp_path, layers=40, hidden=1024, inter=2816, vocab=32000)
    assert size > 1e9
    budget = 256 << 20
    proc = _child([str(adapter), str(base), str(tmp_path / "out"), str(budget)])
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    report = dict(line.split() for line in stdout.splitlines())
    imported, peak = int(report["IMPORTED"]) * 1024, int(report["PEAK"]) * 1024
    print(
        f"model {size / 1e6:.0f} MB: peak RSS {peak / 1e6:.0f} MB, {(peak - imported) / 1e6:.0f} MB above the imports"
    )
    assert peak - imported < budget and peak < 600e6  # measured: ~35 MB above a ~230 MB import floor
    assert sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")) > size


def test_writer_bytes_equal_safetensors_save_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 5, generator=g).to(torch.bfloat16) for i in range(5)}
    tensors["scalar"], tensors["empty"] = (
        torch.tensor(1.5, dtype=torch.bfloat16),
        torch.zeros(0, 4, dtype=torch.bfloat16),
    )
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    names = sorted(tensors)  # the reference orders equal-dtype tensors by name
    w = SafetensorsWriter(
        tmp_path / "ours.safetensors", [(n, "BF16", tensors[n].shape) for n in names], {"format": "pt"}
    )
    for n in names:
        w.write(tensors[n].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    w.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_streams_mixed_dtypes_for_safe_open(tmp_path: Path) -> None:
    t = {"a": torch.arange(12, dtype=torch.int64).reshape(3, 4), "b": torch.randn(7, 3), "c": torch.ones(5).half()}
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [(k, {torch.int64: "I64", torch.float32: "F32", torch.float16: "F16"}[v.dtype],
                                  v.shape) for k, v in t.items()], None)  # fmt: skip
    for v in t.values():
        w.write(v.view(torch.uint8).numpy().tobytes())
    w.close()
    with safe_open(path, "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in t.items())
    r = SafetensorsReader(path)
    buf = bytearray(64)
    rows = r.read_rows("b", 2, 5, memoryview(buf))
    assert torch.equal(torch.frombuffer(bytearray(rows), dtype=torch.float32).view(3, 3), t["b"][2:5])
    with pytest.raises(SafetensorsError, match="of 96 tensor bytes written"):
        SafetensorsWriter(tmp_path / "short.safetensors", [("a", "F32", (24,))], None).close()


@pytest.mark.parametrize("direct", [True, False])
def test_block_file_takes_blocks_in_any_order_and_checks_completeness(direct: bool, tmp_path: Path) -> None:
    data = os.urandom(3 * direct_io.ALIGN + 100)
    f = direct_io.BlockFile(tmp_path / "x", len(data), direct=direct)
    for offset in (2 * direct_io.ALIGN, 0, 3 * direct_io.ALIGN, direct_io.ALIGN):  # the last block is padded
        buf = direct_io.aligned_buffer(direct_io.ALIGN)
        chunk = data[offset : offset + direct_io.ALIGN]
        buf[: len(chunk)] = chunk
        f.write(offset, buf, len(chunk))
    f.close()
    assert (tmp_path / "x").read_bytes() == data
    short = direct_io.BlockFile(tmp_path / "y", len(data), direct=direct)
    short.write(0, direct_io.aligned_buffer(direct_io.ALIGN), direct_io.ALIGN)
    with pytest.raises(SafetensorsError, match=f"{direct_io.ALIGN} of {len(data)} bytes written"):
        short.close()
    with pytest.raises(ValueError, match="unaligned"):
        direct_io.BlockFile(tmp_path / "z", 10_000, direct=direct).write(100, direct_io.aligned_buffer(10), 10)


def _corrupt(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "unexpected bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "starts at 4"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', b"\0" * 4, "corrupt safetensors header"),
        (b"[1, 2]  ", b"", "does not start with"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{}}', b"\0" * 4, "duplicate"),
    ],
)
def test_reader_rejects_corrupt_files(tmp_path: Path, header: Any, data: bytes, match: str) -> None:
    path = _corrupt(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=match) as err:
        SafetensorsReader(path)
    assert str(path) in str(err.value)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x08\0\0")
    with pytest.raises(SafetensorsError, match="too short"):
        SafetensorsReader(tmp_path / "tiny.safetensors")
