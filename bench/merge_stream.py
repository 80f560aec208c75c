"""Is the streaming LoRA merge as fast as copying the base, in bounded memory?

Goal (Llama-3-8B bf16, r16 LoRA on 7 projections): wall <= 1.5x `cp -r` of the base, peak RSS <= 1 GB, flat in
model size. Builds a Llama-shaped random bf16 base by streaming (never holding the model) and a random r16 adapter,
then times, each after `sync; echo 3 > /proc/sys/vm/drop_caches` when run as root (cold page cache):
`cp -r` of the base, `cp -r` + `sync` (the merge fsyncs its output, plain cp does not), the streaming merge in a
child process (wall with interpreter start, time inside merge_streaming, peak RSS), an import-only child (the RSS
floor of Python + torch), and for small bases peft's load + merge_and_unload + save_pretrained. Everything it
creates is removed at the end.

    .venv/bin/python bench/merge_stream.py                 # TinyLlama shapes, 22 layers: 2.2 GB
    .venv/bin/python bench/merge_stream.py --layers 8      # ~0.9 GB
    .venv/bin/python bench/merge_stream.py --preset 8b     # Llama-3-8B shapes, 16 GB in 4 shards (> 40 GB free)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hyperjob.checkpoint.safetensors_io import SafetensorsWriter

PRESETS = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B shapes, 2.2 GB
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama-3-8B shapes, 16.06 GB
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> list[tuple[str, tuple]]:
    """Tensor names and shapes in the order transformers writes a LlamaForCausalLM."""
    kv_dim = hidden // heads * kv
    out: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (kv_dim, hidden)),
                (f"{p}.self_attn.v_proj.weight", (kv_dim, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                (f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
                (f"{p}.mlp.down_proj.weight", (hidden, inter)), (f"{p}.input_layernorm.weight", (hidden,)),
                (f"{p}.post_attention_layernorm.weight", (hidden,))]  # fmt: skip
    return [*out, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


class _Noise:
    """Random bf16 bytes without generating them all: a few random blocks, cycled at varying offsets."""

    def __init__(self, block: int = 8 << 20, count: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.blocks = [(torch.randn(block // 2, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()
                       for _ in range(count)]  # fmt: skip
        self.i = 0

    def write(self, writer: SafetensorsWriter, nbytes: int) -> None:
        while nbytes:
            blk = self.blocks[self.i % len(self.blocks)]
            start = (self.i * 4096) % (len(blk) // 2)
            n = min(nbytes, len(blk) - start)
            writer.write(blk[start : start + n].data)
            nbytes -= n
            self.i += 1


def write_base(path: Path, dims: tuple[int, int, int, int, int, int], shard_bytes: int) -> int:
    """A random bf16 Llama base, sharded greedily at shard_bytes like save_pretrained; returns its byte size."""
    hidden, inter, layers, heads, kv, vocab = dims
    path.mkdir(parents=True)
    shapes = llama_shapes(*dims)
    groups: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    noise, weight_map, total = _Noise(), {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = SafetensorsWriter(path / file, [(n, "BF16", s) for n, s in group], {"format": "pt"})
        for name, shape in group:
            noise.write(writer, 2 * int(torch.Size(shape).numel()))
            weight_map[name] = file
        writer.close()
        total += sum(2 * int(torch.Size(s).numel()) for _, s in group)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16",
              "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return total


def write_adapter(path: Path, dims: tuple[int, int, int, int, int, int], r: int = 16, dtype: str = "BF16") -> None:
    """A random PEFT LoRA adapter (non-zero B) on all 7 projections of a base made by write_base."""
    path.mkdir(parents=True)
    shapes = dict(llama_shapes(*dims))
    g = torch.Generator().manual_seed(1)
    tdt = {"BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    entries, tensors = [], []
    for name, (out_f, in_f) in ((n, s) for n, s in shapes.items() if n.split(".")[-2] in PROJECTIONS):
        mod = "base_model.model." + name.removesuffix(".weight")
        for key, shape, std in (
            (f"{mod}.lora_A.weight", (r, in_f), in_f**-0.5),
            (f"{mod}.lora_B.weight", (out_f, r), 0.01),
        ):
            entries.append((key, dtype, shape))
            tensors.append((torch.randn(shape, generator=g) * std).to(tdt))
    writer = SafetensorsWriter(path / "adapter_model.safetensors", entries, {"format": "pt"})
    for t in tensors:
        writer.write(t.contiguous().view(torch.uint8).numpy().data)
    writer.close()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(PROJECTIONS),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "task_type": "CAUSAL_LM", "inference_mode": True, "base_model_name_or_path": None,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def drop_caches() -> bool:
    """Flush dirty pages and empty the page cache so every timed step starts cold; False when not root."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(code: str, *args: str) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, stdout) of one `python -c code` child.

    Peak RSS is the child's own VmHWM: getrusage's ru_maxrss would not do, as Linux carries the parent's peak (this
    script holds torch) across fork and exec into the child's figure.
    """
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + REPORT, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    report = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("HWM_KB="))
    return wall, int(report["HWM_KB"]) / 1024, out.stdout


def run_measured(code: str, *args: str) -> tuple[float, float, float | None]:
    """(wall s, peak RSS MB, engine s or None) of one `python -c code` child (see run_child)."""
    wall, rss, stdout = run_child(code, *args)
    report = dict(line.split("=", 1) for line in stdout.splitlines() if line.startswith("ENGINE_S="))
    return wall, rss, float(report["ENGINE_S"]) if "ENGINE_S" in report else None


REPORT = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(f"HWM_KB={line.split()[1]}")
"""
MERGE = """import sys, time
from pathlib import Path
from hyperjob.checkpoint.stream_merge import merge_streaming
t0 = time.perf_counter()
merge_streaming(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), max_memory=int(sys.argv[4]),
                workers=int(sys.argv[5]), progress=False)
print(f"ENGINE_S={time.perf_counter() - t0}")
"""
IMPORTS = "import torch, hyperjob.checkpoint.stream_merge\n"
PEFT = """import sys, time, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
base = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16, low_cpu_mem_usage=True)
PeftModel.from_pretrained(base, sys.argv[1]).merge_and_unload().save_pretrained(sys.argv[3], max_shard_size="5GB")
print(f"ENGINE_S={time.perf_counter() - t0}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (sets the size)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir under /tmp)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-memory", type=int, default=1 << 30)
    parser.add_argument("--peft", choices=("auto", "yes", "no"), default="auto", help="auto: only for bases < 4 GB")
    args = parser.parse_args()
    dims = list(PRESETS[args.preset])
    if args.layers:
        dims[2] = args.layers
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    rows: list[tuple[str, float, float | None, float | None]] = []  # step, wall, peak RSS MB, engine-only s
    try:
        t0 = time.perf_counter()
        size = write_base(work / "base", tuple(dims), 5 * 10**9)  # type: ignore[arg-type]
        write_adapter(work / "adapter", tuple(dims))  # type: ignore[arg-type]
        print(f"built {size / 1e9:.2f} GB base in {time.perf_counter() - t0:.1f} s at {work}", file=sys.stderr)
        cold = drop_caches()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "base"), str(work / "copy")], check=True)
        cp = time.perf_counter() - t0
        os.sync()
        cp_sync = time.perf_counter() - t0
        shutil.rmtree(work / "copy")
        rows += [("cp -r base", cp, None, None), ("cp -r base && sync", cp_sync, None, None)]
        drop_caches()
        wall, rss, _ = run_measured(IMPORTS)
        rows.append(("python + torch import only", wall, rss, None))
        for w in args.workers:
            drop_caches()
            dirs = [str(work / "adapter"), str(work / "base"), str(work / "out")]
            rows.append((f"merge_streaming workers={w}", *run_measured(MERGE, *dirs, str(args.max_memory), str(w))))
            shutil.rmtree(work / "out")
        if args.peft == "yes" or (args.peft == "auto" and size < 4e9):
            drop_caches()
            dirs = [str(work / "adapter"), str(work / "base"), str(work / "peft")]
            rows.append(("peft load + merge_and_unload + save", *run_measured(PEFT, *dirs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbase {size / 1e9:.2f} GB bf16, dims {dims}, page cache {'dropped before each step' if cold else 'warm'}")
    print("\n| step | wall s | x cp | x (cp+sync) | in-process s (no imports) | x (cp+sync) | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, secs, peak, engine in rows:
        eng = "" if engine is None else f"{engine:.1f} | {engine / cp_sync:.2f}"
        mb = "" if peak is None else f"{peak:.0f}"
        print(f"| {name} | {secs:.1f} | {secs / cp:.2f} | {secs / cp_sync:.2f} | {eng or ' | '} | {mb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
