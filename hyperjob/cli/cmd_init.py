"""`hyperjob init`: write an annotated starter config from one of the shipped examples."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from hyperjob.cli.common import CliError
from hyperjob.fsutil import atomic_write_text
from hyperjob.resources import shipped_dir

PRESETS = {
    "trainium": "trainium-llama3-8b.yaml",
    "gpu": "gpu-llama3-8b.yaml",
    "cpu-tiny": "tiny-cpu.yaml",
}
# Data files a preset refers to by a relative path, copied beside the new config.
PRESET_DATA = {"cpu-tiny": ("data/dolly-tiny.jsonl",)}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write an annotated starter config",
        description="Write a starter config. Presets: trainium (Llama 3 8B on one ml.trn1.32xlarge, TP=8 x DP=4), "
        "gpu (Llama 3 8B on one p5.48xlarge), cpu-tiny (a tiny local model, minutes on a laptop).",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--output", "-o", type=Path, default=Path("hyperjob.yaml"), metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.exists() and not args.force:
        raise CliError(f"{out} already exists (use --force to overwrite)")
    src = shipped_dir("examples")
    atomic_write_text(out, (src / PRESETS[args.preset]).read_text())
    for rel in PRESET_DATA.get(args.preset, ()):
        target = out.parent / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)
            print(f"wrote {target}")
    print(f"wrote {out} (preset {args.preset}); next: hyperjob plan {out}")
    return 0
