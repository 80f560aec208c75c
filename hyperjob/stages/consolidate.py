"""Consolidate stage: the newest complete tensor-parallel checkpoint of the train stage -> a standard PEFT adapter.

Runs on CPU without the Neuron stack; the merge stage then folds the adapter into the base model.
"""

from __future__ import annotations

from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths
from hyperjob.stages.common import StageError, run_stage, setup_logging


def _consolidate(paths: RunPaths, cfg: HyperjobConfig) -> int:
    from hyperjob.checkpoint.consolidate import consolidate_adapter
    from hyperjob.checkpoint.errors import CheckpointError

    log = setup_logging("consolidate")
    if not paths.checkpoints.is_dir():
        raise StageError(f"no checkpoints in {paths.checkpoints}: run the train stage first")
    log.info("consolidating the newest complete checkpoint under %s into %s", paths.checkpoints, paths.adapter)
    try:
        result = consolidate_adapter(paths.checkpoints, paths.adapter, allow_drift=cfg.consolidate.allow_drift)
    except CheckpointError as e:
        raise StageError(str(e)) from None
    log.info(
        "read %s (TP %d, PP %d, %s): %d tensors, %.1f MB",
        result.source, result.tp_size, result.pp_size, "xser" if result.xser else "plain",
        result.tensors, result.total_bytes / 1e6,
    )  # fmt: skip
    log.info("replica drift: %s", result.drift.summary())
    for note in result.notes:
        log.info("note: %s", note)
    print(f"adapter: {paths.adapter}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage("consolidate", _consolidate, argv, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
