"""`hyperjob consolidate` and `hyperjob merge`: checkpoints to standard files, on any CPU machine.

Both name the base model `--base-model` (merge also takes `--base`, its older spelling), and neither replaces a
non-empty output directory without `--force`, as `init` and `render` refuse to overwrite. Heavy imports (torch)
happen inside the verbs, so `hyperjob --help` stays light.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from hyperjob.cli.common import EXIT_RUN_FAILED, CliError

if TYPE_CHECKING:
    from hyperjob.checkpoint.stream_support import Prefetch


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "consolidate",
        help="Neuron tensor-parallel checkpoint -> PEFT adapter (and a merged model)",
        description="Read an optimum-neuron 0.4.x sharded checkpoint (xser or plain; an output dir means its newest "
        "complete checkpoint-N) and write a standard PEFT adapter; with --base-model, also merge it into a "
        "Hugging Face model. Needs no Neuron software; memory stays bounded. Everything is checked before "
        "anything is written, and outputs appear only when complete.",
        epilog="example:\n  hyperjob consolidate /fsx/run/checkpoints --output adapter/ \\\n"
        "      --base-model /fsx/models/Meta-Llama-3-8B --merged-output merged/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="output dir, checkpoint-N, or its shards dir")
    c.add_argument("--output", type=Path, required=True, metavar="DIR", help="adapter dir (full checkpoints: model)")
    c.add_argument("--base-model", type=Path, metavar="BASE_DIR", help="base model to merge the adapter into")
    c.add_argument("--merged-output", type=Path, metavar="DIR", help="where the merged model goes")
    c.add_argument("--adapter-name", default="default", help="adapter_<name> inside the checkpoint (default: default)")
    c.add_argument("--allow-drift", action="store_true", help="accept replicated tensors that differ across ranks")
    _add_merge_options(c, "replace --output and --merged-output if they exist and are not empty")
    c.set_defaults(func=cmd_consolidate)

    m = sub.add_parser(
        "merge",
        help="merge a PEFT LoRA adapter into its base model, streaming",
        description="W' = W + s * (B @ A) per tensor, in fp32 row chunks, cast back to W's dtype; untouched tensors "
        "are copied as bytes. Output shards keep the base's names (or --max-shard-size), plus the index, config, "
        "generation config and tokenizer. DoRA adapters are refused.",
    )
    m.add_argument("adapter", type=Path, metavar="ADAPTER_DIR", help="a PEFT LoRA adapter directory")
    m.add_argument("--base-model", "--base", dest="base_model", type=Path, required=True, metavar="BASE_DIR",
                   help="the base model the adapter was trained on (--base is an alias)")  # fmt: skip
    m.add_argument("--output", type=Path, required=True, metavar="MERGED_DIR", help="where the merged model goes")
    _add_merge_options(m, "replace MERGED_DIR if it exists and is not empty")
    m.set_defaults(func=cmd_merge)


def _add_merge_options(p: argparse.ArgumentParser, force_help: str) -> None:
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--max-memory", default="1GB", metavar="SIZE", help="memory budget for merging (default 1GB)")
    p.add_argument("--workers", default="auto", metavar="N",
                   help="threads reading and merging (default auto: one per CPU, within --max-memory)")  # fmt: skip
    p.add_argument("--max-shard-size", default=None, metavar="SIZE", help="reshard the output (default: as the base)")


def _sizes(args: argparse.Namespace) -> tuple[int, int | None]:
    from hyperjob.checkpoint.common import parse_size
    from hyperjob.checkpoint.merge import parse_workers

    try:
        memory = parse_size(args.max_memory)
        shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        parse_workers(args.workers)
    except ValueError:
        raise CliError(f"--workers {args.workers}: use a positive number or auto") from None
    return memory, shard


def _merge(args: argparse.Namespace, adapter: Path, output: Path, memory: int, shard: int | None) -> None:
    """The merge both verbs end with, reported with where its time went (disk reads, compute or write-back)."""
    from hyperjob.checkpoint.errors import MergeError
    from hyperjob.checkpoint.merge import merge_adapter
    from hyperjob.checkpoint.merge_pipeline import MergeStats

    stats = MergeStats()
    try:
        out = merge_adapter(adapter, args.base_model, output, max_shard_size=shard, max_memory=memory,
                            workers=args.workers, stats=stats)  # fmt: skip
    except (MergeError, FileNotFoundError) as e:
        raise CliError(str(e), EXIT_RUN_FAILED) from None
    print(f"merged model: {out}")
    print(f"merge: {stats.summary()}")


def _prefetch(base_model: Path) -> Prefetch:
    """Start reading the base into the page cache before torch is imported (stdlib only); see Prefetch."""
    from hyperjob.checkpoint.stream_support import Prefetch

    return Prefetch.of_model(base_model)


def refuse_existing(path: Path, option: str, *, force: bool) -> None:
    """A non-empty output directory is someone's work: replace it only when asked (it is swapped out only once
    the new output is complete). Anything else there (a file) is refused even with --force: it is no output of ours."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise CliError(f"{option} {path} exists and is not a directory; choose another path")
    if not force and any(path.iterdir()):
        raise CliError(f"{option} {path} already exists and is not empty; pass --force to replace it")


def cmd_merge(args: argparse.Namespace) -> int:
    memory, shard = _sizes(args)
    refuse_existing(args.output, "--output", force=args.force)
    prefetch = _prefetch(args.base_model)
    try:
        _merge(args, args.adapter, args.output, memory, shard)
    finally:
        prefetch.stop()
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    if (args.base_model is None) != (args.merged_output is None):
        raise CliError("--base-model and --merged-output go together")
    memory, shard = _sizes(args)
    refuse_existing(args.output, "--output", force=args.force)
    if args.merged_output is not None:
        refuse_existing(args.merged_output, "--merged-output", force=args.force)
    prefetch = _prefetch(args.base_model) if args.base_model is not None else None  # overlaps consolidation
    try:
        _consolidate(args, memory, shard)
    finally:
        if prefetch is not None:
            prefetch.stop()
    return 0


def _consolidate(args: argparse.Namespace, memory: int, shard: int | None) -> None:
    from hyperjob.checkpoint.consolidate import consolidate_any
    from hyperjob.checkpoint.errors import CheckpointError

    try:
        result = consolidate_any(args.checkpoint, args.output, adapter_name=args.adapter_name,
                                 allow_drift=args.allow_drift, max_shard_size=shard)  # fmt: skip
    except CheckpointError as e:
        raise CliError(str(e), EXIT_RUN_FAILED) from None
    print(f"{result.kind} checkpoint (TP {result.tp_size}, PP {result.pp_size}, {'xser' if result.xser else 'plain'}) "
          f"-> {result.output_dir}: {result.tensors} tensors, {result.total_bytes / 1e6:.1f} MB")  # fmt: skip
    print(f"replica drift: {result.drift.summary()}")
    for note in result.notes:
        print(f"note: {note}")
    if args.base_model is not None and result.kind == "lora":
        _merge(args, result.output_dir, args.merged_output, memory, shard)
