#!/usr/bin/env bash
# The test command of the README: install, start the project's own single-node Slurm, run every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Golden files are compared, never rewritten, here: an update run would compare them with themselves.
if [[ -n "${HYPERJOB_UPDATE_GOLDEN:-}" ]]; then
  echo "error: HYPERJOB_UPDATE_GOLDEN is set; unset it (update golden files by hand, then review the diff)" >&2
  exit 1
fi
# The tests must leave the tree as they found it (on CI's fresh clone: exactly the commit).
tree_state() { bash .ci/tree-state.sh; }
before="$(tree_state)"

bash .ci/install.sh --dev  # the pipeline plus the test tools (the README quickstart installs only the pipeline)
# The second venv with optimum-neuron[training]==0.4.5 for tests/test_neuron_upstream.py (cached between runs).
bash .ci/install-neuron-venv.sh >/dev/null

# A real Slurm for the tests marked `slurm` (needs root; they skip without it).
started_slurm=0
if [[ "$(id -u)" == 0 ]]; then
  bash .ci/slurm/start.sh
  started_slurm=1
  # shellcheck disable=SC1091
  source "${HYPERJOB_SLURM_BASE:-/tmp/hyperjob-slurm}/env.sh"
  # As root everything a test needs is here (Slurm, torch, peft): a skipped test is a failure.
  export HYPERJOB_FORBID_SKIPS=1
fi
# Property tests draw the same examples on every CI run: a failure there is reproducible.
export HYPOTHESIS_PROFILE=ci
stop_slurm() {
  if [[ "$started_slurm" == 1 && "${HYPERJOB_SLURM_KEEP:-0}" != 1 ]]; then
    bash .ci/slurm/stop.sh || true
  fi
}
trap stop_slurm EXIT

export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check hyperjob tests bench lifecycle_scripts
.venv/bin/ruff format --check hyperjob tests bench lifecycle_scripts
.venv/bin/mypy
# The lifecycle scripts run on the cluster's stock python3 (3.8+, standard library only): checked strictly, apart.
(cd lifecycle_scripts && ../.venv/bin/mypy --strict ./*.py)
.venv/bin/python -m pytest "$@"

if [[ "$(tree_state)" != "$before" ]]; then
  echo "error: the tests changed the work tree (a golden file rewritten, or an output left in the repo):" >&2
  git status --short --untracked-files=all >&2
  git --no-pager diff --stat >&2
  exit 1
fi
