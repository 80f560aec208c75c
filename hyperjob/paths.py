"""Where every artifact of a run lives: one place, so stages and CLI agree.

A run directory is `<workdir>/runs/<name>-<timestamp>/`. Downloaded base models
are shared between runs under `<workdir>/models/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hyperjob.config.models import HyperjobConfig


def model_slug(model_id: str, revision: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-")
    return slug if revision == "main" else f"{slug}@{re.sub(r'[^A-Za-z0-9._-]+', '-', revision)}"


def base_model_dir(cfg: HyperjobConfig) -> Path:
    """A local model is used in place; hub and built-in models go to the shared model cache."""
    model_id = cfg.model.id
    if Path(model_id).is_absolute():
        return Path(model_id)
    return cfg.workdir / "models" / model_slug(model_id, cfg.model.revision)


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def scripts(self) -> Path:
        return self.run_dir / "scripts"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def checkpoints(self) -> Path:
        """Trainer output: checkpoint-N directories (resume reads the newest)."""
        return self.run_dir / "checkpoints"

    @property
    def compile_output(self) -> Path:
        """neuron_parallel_compile writes throwaway outputs here, never into checkpoints/."""
        return self.run_dir / "compile"

    @property
    def stop_request(self) -> Path:
        """Created by the train script when Slurm warns of the time limit: train saves a checkpoint and stops."""
        return self.run_dir / "stop-requested"

    @property
    def stopped(self) -> Path:
        """Written by train (rank 0) when it stopped on request with a checkpoint saved: the script requeues."""
        return self.run_dir / "stopped-for-requeue"

    @property
    def adapter(self) -> Path:
        """Final standard PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
        return self.run_dir / "adapter"

    @property
    def merged(self) -> Path:
        return self.run_dir / "merged"

    @property
    def evaluation(self) -> Path:
        return self.run_dir / "eval"

    @staticmethod
    def log_name(index: int, stage: str, job: str) -> str:
        """`NN-<stage>-<job>.out`: job is a Slurm job id, `%j` in an sbatch pattern, or `*` in a glob."""
        return f"{index:02d}-{stage}-{job}.out"

    @property
    def outcomes(self) -> Path:
        """Each stage script's own record of how it ended (see hyperjob.schedule.outcome)."""
        return self.run_dir / "outcomes"

    def outcome(self, index: int, stage: str) -> Path:
        return self.outcomes / f"{index:02d}-{stage}.outcome"

    def log(self, index: int, stage: str, job: str) -> Path:
        return self.logs / self.log_name(index, stage, job)

    def script(self, index: int, stage: str) -> Path:
        return self.scripts / f"{index:02d}-{stage}.sbatch"


def compile_cache_dir(cfg: HyperjobConfig) -> Path:
    return cfg.workdir / "neuron_compile_cache" / model_slug(cfg.model.id, cfg.model.revision)


def datasets_cache_dir(cfg: HyperjobConfig) -> Path:
    """Hub datasets fetched by the download stage, on the shared FS so offline training nodes find them."""
    return cfg.workdir / "hf_cache" / "datasets"
