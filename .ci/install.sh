#!/usr/bin/env bash
# Install hyperjob with everything the pipeline and the tests need into ./.venv.
# torch is pinned first, in its own pip call: any other order lets pip choose a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${HYPERJOB_TORCH_VERSION:-2.13.0}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"hyperjob needs Python >= 3.10, found {sys.version.split()[0]}")
PY
if [[ ! -x .venv/bin/python ]]; then
  echo "[install] creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
# pip's own warnings about index locations configured on some machines are noise here; errors still show.
pip() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
echo "[install] torch==$TORCH_VERSION"
pip "torch==$TORCH_VERSION"
echo "[install] hyperjob[train,aws,dev] (editable)"
pip -e ".[train,aws,dev]"
echo "[install] done: $(.venv/bin/hyperjob --version)"
