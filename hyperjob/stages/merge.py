"""Merge stage: fold the trained LoRA adapter into the base model for plain `from_pretrained` serving."""

from __future__ import annotations

from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages.common import StageError, require_model_dir, run_stage, setup_logging


def _merge(paths: RunPaths, cfg: HyperjobConfig) -> int:
    from hyperjob.checkpoint.merge import MergeError, merge_adapter

    log = setup_logging("merge")
    base = base_model_dir(cfg)
    require_model_dir(base, "base model", "run the download stage first")
    if not (paths.adapter / "adapter_config.json").is_file():
        raise StageError(f"no adapter in {paths.adapter}: run the train stage first")
    log.info("merging %s into %s (shards up to %s)", paths.adapter, base, cfg.merge.max_shard_size)
    try:
        out = merge_adapter(paths.adapter, base, paths.merged, max_shard_size=cfg.merge.max_shard_size)
    except MergeError as e:
        raise StageError(str(e)) from None
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"merged model: {out} ({len(shards)} safetensors shard{'s' if len(shards) != 1 else ''})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage("merge", _merge, argv, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
