"""Merge stage: fold the trained LoRA adapter into the base model for plain `from_pretrained` serving."""

from __future__ import annotations

from hyperjob.config.models import HyperjobConfig
from hyperjob.longctx.rope import config_overrides
from hyperjob.model_facts import model_facts
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages.common import StageError, require_model_dir, run_stage, setup_logging


def _merge(paths: RunPaths, cfg: HyperjobConfig) -> int:
    from hyperjob.checkpoint.errors import MergeError
    from hyperjob.checkpoint.merge import merge_adapter
    from hyperjob.checkpoint.merge_pipeline import MergeStats

    log = setup_logging("merge")
    base = base_model_dir(cfg)
    require_model_dir(base, "base model", "run the download stage first")
    if not (paths.adapter / "adapter_config.json").is_file():
        raise StageError(f"no adapter in {paths.adapter}: run the train stage first")
    m = cfg.merge
    shards = f"shards up to {m.max_shard_size}" if m.max_shard_size else "the base's shards"
    log.info("merging %s into %s (%s, memory budget %s)", paths.adapter, base, shards, m.max_memory)
    overrides = config_overrides(cfg, model_facts(cfg))
    if overrides:
        log.info("merged config.json gets the training overrides %s", overrides)
    stats = MergeStats()
    try:
        out = merge_adapter(
            paths.adapter, base, paths.merged, max_shard_size=m.max_shard_size, max_memory=m.max_memory,
            workers=m.workers, progress=True, config_overrides=overrides, stats=stats,
        )  # fmt: skip
    except MergeError as e:
        raise StageError(str(e)) from None
    log.info("merged %s", stats.summary())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"merged model: {out} ({len(files)} safetensors shard{'s' if len(files) != 1 else ''})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage("merge", _merge, argv, __doc__ or "")


if __name__ == "__main__":
    raise SystemExit(main())
