"""`hyperjob init`: write an annotated starter config from one of the shipped examples.

A preset's relative workdir (cpu-tiny's `../work`, relative to the examples directory) would land outside the
directory the user ran init in, so it is rewritten to an absolute `<config's directory>/work`, with the file's
comments kept. An absolute workdir (the cluster presets' /fsx/hyperjob, a shared filesystem) is kept as written.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

from hyperjob.cli.common import CliError
from hyperjob.fsutil import atomic_write_text
from hyperjob.resources import shipped_dir

PRESETS = {
    "trainium": "trainium-llama3-8b.yaml",
    "trn2": "trn2-llama3-8b.yaml",
    "gpu": "gpu-llama3-8b.yaml",
    "cpu-tiny": "tiny-cpu.yaml",
}
# Data files a preset refers to by a relative path, copied beside the new config.
PRESET_DATA = {"cpu-tiny": ("data/dolly-tiny.jsonl",)}
# The top-level `workdir:` line: its value, then an optional comment (kept).
_WORKDIR_LINE = re.compile(r"^workdir:[ \t]*(?P<value>[^#\n]*?)(?P<comment>[ \t]+#[^\n]*)?$", re.MULTILINE)
_PLAIN_SCALAR = re.compile(r"[A-Za-z0-9_./+-]+")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write an annotated starter config",
        description="Write a starter config. Presets: trainium (Llama 3 8B on one ml.trn1.32xlarge, TP=8 x DP=4), "
        "gpu (Llama 3 8B on one p5.48xlarge), cpu-tiny (a tiny local model, minutes on a laptop). "
        "cpu-tiny's runs go under work/ beside the config; the cluster presets keep their shared-filesystem "
        "workdir (/fsx/hyperjob): edit it to match your cluster.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny", help="which example to start from")
    p.add_argument("--output", "-o", type=Path, default=Path("hyperjob.yaml"), metavar="FILE",
                   help="the config to write (default: hyperjob.yaml)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument(
        "--cluster",
        type=Path,
        metavar="CLUSTER_CONFIG",
        help="take the workdir (on the cluster's FSx) and the partition and instance type of its first worker group "
        "from a `hyperjob cluster` config",
    )
    p.set_defaults(func=cmd_init)


def _yaml_string(value: str) -> str:
    """A YAML scalar for a path: plain when it is unambiguous, else double-quoted (JSON strings are YAML)."""
    return value if _PLAIN_SCALAR.fullmatch(value) else json.dumps(value)


def _cluster_config(path: Path) -> Any:
    from hyperjob.aws.cluster_config import load_cluster_config
    from hyperjob.config.load import ConfigError

    try:
        return load_cluster_config(path, check_inputs=False)
    except ConfigError as e:
        raise CliError("\n".join(e.lines())) from None


def absolute_workdir(text: str, config_dir: Path) -> tuple[str, str | None]:
    """The config text with a relative top-level workdir made `<config_dir>/work`, and the workdir it names."""
    match = _WORKDIR_LINE.search(text)
    if match is None:
        return text, None
    value = match["value"].strip().strip("'\"")
    if Path(value).expanduser().is_absolute():
        return text, value
    workdir = str(config_dir.resolve() / "work")
    line = f"workdir: {_yaml_string(workdir)}{match['comment'] or ''}"
    return text[: match.start()] + line + text[match.end() :], workdir


def _set_line(text: str, key: str, value: str, indent: str = "") -> str:
    """Replace the value of the first `<indent><key>:` line, keeping its comment."""
    pattern = re.compile(rf"^{indent}{key}:[ \t]*[^#\n]*?(?P<comment>[ \t]+#[^\n]*)?$", re.MULTILINE)
    return pattern.sub(lambda m: f"{indent}{key}: {_yaml_string(value)}{m['comment'] or ''}", text, count=1)


def from_cluster(text: str, cluster: Any) -> tuple[str, list[str]]:
    """The preset with its workdir on the cluster's FSx and its cluster.partition / instance_type those of the
    cluster's first worker group; and what was taken, for the user."""
    worker = cluster.workers[0]
    text = _set_line(text, "partition", worker.partition, "  ")
    text = _set_line(text, "instance_type", worker.instance_type, "  ")
    taken = [f"partition {worker.partition} and instance type {worker.instance_type} (worker group {worker.name})"]
    if cluster.fsx.mode != "none":
        workdir = f"{cluster.fsx.mount_path.rstrip('/')}/hyperjob"
        text = _set_line(text, "workdir", workdir)
        taken.append(f"workdir {workdir} (the cluster's FSx)")
    return text, taken


def cmd_init(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.exists() and not args.force:
        raise CliError(f"{out} already exists (use --force to overwrite)")
    src = shipped_dir("examples")
    preset = (src / PRESETS[args.preset]).read_text()
    taken: list[str] = []
    if args.cluster is not None:
        preset, taken = from_cluster(preset, _cluster_config(args.cluster))
    text, workdir = absolute_workdir(preset, out.parent)
    atomic_write_text(out, text)
    for line in taken:
        print(f"from {args.cluster}: {line}")
    for rel in PRESET_DATA.get(args.preset, ()):
        target = out.parent / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)
            print(f"wrote {target}")
    print(f"wrote {out} (preset {args.preset})")
    if workdir is not None:
        print(f"runs will go to {Path(workdir) / 'runs'} (workdir in {out})")
    print(f"next: hyperjob plan {out}")
    return 0
