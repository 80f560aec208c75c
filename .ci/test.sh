#!/usr/bin/env bash
# The test command of the README: install, start the project's own single-node Slurm, run every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install.sh

# A real Slurm for the tests marked `slurm` (needs root; they skip without it).
started_slurm=0
if [[ "$(id -u)" == 0 ]]; then
  bash .ci/slurm/start.sh
  started_slurm=1
  # shellcheck disable=SC1091
  source "${HYPERJOB_SLURM_BASE:-/tmp/hyperjob-slurm}/env.sh"
fi
stop_slurm() {
  if [[ "$started_slurm" == 1 && "${HYPERJOB_SLURM_KEEP:-0}" != 1 ]]; then
    bash .ci/slurm/stop.sh || true
  fi
}
trap stop_slurm EXIT

export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check hyperjob tests bench
.venv/bin/ruff format --check hyperjob tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
