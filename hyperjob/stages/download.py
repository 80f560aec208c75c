"""Download stage: put the base model (and a hub dataset) on the shared filesystem before any GPU job starts.

Models go to the shared cache `base_model_dir(cfg)`, complete or not at all: files land in a hidden staging
dir beside the target that is renamed into place only after the download is verified, and a marker file
says "complete" so later runs skip the work. A failed hub download keeps its staging dir so the next try
resumes instead of starting a multi-gigabyte transfer again. A lock file serialises concurrent runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from hyperjob.config.models import HyperjobConfig
from hyperjob.fsutil import apply_umask, atomic_dir, replace_dir
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages.common import (
    COMPLETE_MARKER,
    StageError,
    read_token,
    run_stage,
    setup_logging,
)

# What a causal LM needs to load and tokenize; no *.bin/*.pth/*.gguf/original/ duplicates.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]
_NETWORK_ERRORS = (
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectionError",
    "ConnectTimeout",
    "OfflineModeIsEnabled",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def is_complete(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file()


def write_marker(model_dir: Path, source: str, revision: str | None) -> None:
    info = {"source": source, "revision": revision, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (model_dir / COMPLETE_MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def missing_model_files(model_dir: Path) -> list[str]:
    """What a model directory lacks to be loadable: config, weights, tokenizer."""
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors)")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    return missing


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """An flock beside the target: a second run downloading the same model waits, then finds it complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _describe_hub_error(exc: BaseException, what: str) -> str:
    """One line naming what failed and why, from the exception type and HTTP status only (never its text,
    which could echo request headers)."""
    name = type(exc).__name__
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if name == "GatedRepoError":
        reason = "gated repository: accept its licence on the hub and set a token with access"
    elif name == "RevisionNotFoundError":  # before the status test: the hub answers a missing revision with 404
        reason = "revision not found"
    elif name in ("RepositoryNotFoundError",) or status in (401, 404):
        reason = f"not found or no access (HTTP {status or '401/404'}): check the id and the token"
    elif status == 403:
        reason = "forbidden (HTTP 403): the token lacks access"
    elif name in _NETWORK_ERRORS:
        reason = "network unreachable or hub offline"
    else:
        reason = f"{name}" + (f" (HTTP {status})" if status else "")
    return f"cannot download {what}: {reason}"


def download_hub_model(repo_id: str, revision: str, target: Path, token: str | None) -> None:
    from huggingface_hub import snapshot_download

    staging = target.parent / f".{target.name}.partial"
    print(f"downloading {repo_id}@{revision} into {target}", flush=True)
    try:
        snapshot_download(
            repo_id=repo_id, revision=revision, token=token, local_dir=staging, allow_patterns=ALLOW_PATTERNS
        )
    except Exception as exc:  # hub, HTTP and OS errors all become one line naming the repo
        raise StageError(_describe_hub_error(exc, f"model {repo_id!r} (revision {revision!r})")) from None
    missing = missing_model_files(staging)
    if missing:
        raise StageError(f"model {repo_id!r} (revision {revision!r}) has no {', '.join(missing)} on the hub")
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # hub bookkeeping, only useful while resuming
    write_marker(staging, repo_id, revision)
    apply_umask(staging)
    replace_dir(staging, target)


def fetch_dataset(dataset_id: str, split: str, token: str | None) -> int:
    """Fill the HF datasets cache so the train stage (on GPU nodes, maybe offline) reads it locally."""
    import datasets

    print(f"fetching dataset {dataset_id} (split {split}) into the HF datasets cache", flush=True)
    try:
        ds = datasets.load_dataset(dataset_id, split=split, token=token)
    except Exception as exc:
        raise StageError(_describe_hub_error(exc, f"dataset {dataset_id!r} split {split!r}")) from None
    return len(ds)


def ensure_model(cfg: HyperjobConfig) -> Path:
    """Make `base_model_dir(cfg)` a complete model directory; return it."""
    from hyperjob.stages.tiny import build_tiny_llama

    target = base_model_dir(cfg)
    model_id = cfg.model.id
    if Path(model_id).is_absolute():
        missing = missing_model_files(target) if target.is_dir() else ["the directory itself"]
        if missing:
            raise StageError(f"local model {target} is missing {', '.join(missing)}")
        print(f"using local model {target}", flush=True)
        return target
    with _lock(target):
        if is_complete(target):
            print(f"model {model_id} already complete in {target}; skipping", flush=True)
            return target
        if cfg.model.is_tiny:
            print(f"building {model_id} into {target}", flush=True)
            with atomic_dir(target) as tmp:
                build_tiny_llama(tmp)
                write_marker(tmp, model_id, None)
        else:
            download_hub_model(model_id, cfg.model.revision, target, read_token(cfg.model))
    print(f"model ready: {target}", flush=True)
    return target


def _download(paths: RunPaths, cfg: HyperjobConfig) -> int:
    setup_logging("download")
    ensure_model(cfg)
    if cfg.dataset.id is not None:
        rows = fetch_dataset(cfg.dataset.id, cfg.dataset.split, read_token(cfg.model))
        print(f"dataset {cfg.dataset.id} ready: {rows} rows", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage("download", _download, argv, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
