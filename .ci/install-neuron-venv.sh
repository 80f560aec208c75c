#!/usr/bin/env bash
# A second venv with the Python side of the Trainium training stack (optimum-neuron[training]==0.4.5 with its own
# pins: transformers 4.57, peft 0.17, trl 0.24), for the tests that drive the real upstream classes through import
# stubs (tests/neuron_upstream/). Never the [neuronx] extra: torch-neuronx and neuronx-cc come only from the Neuron
# pip index. hyperjob's own light dependencies go in too; the tests put the source tree on PYTHONPATH.
# Cached under ~/.cache by the hash of what it installs: a second run on one machine reuses it.
# Prints the venv's path on its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${HYPERJOB_TORCH_VERSION:-2.13.0}
REQUIREMENTS=("optimum-neuron[training]==0.4.5" "pydantic>=2.6" "jinja2>=3.1" "pyyaml>=6.0" "rich>=13.0")
key=$(printf '%s\n' "$TORCH_VERSION" "${REQUIREMENTS[@]}" | sha256sum | cut -c1-12)
venv=${HYPERJOB_NEURON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hyperjob/venv-optimum-neuron-0.4.5-$key}

if [[ -x "$venv/bin/python" && -f "$venv/.complete" ]]; then
  echo "[neuron-venv] cached: $venv" >&2
  echo "$venv"
  exit 0
fi
"$PYTHON" - <<'PY'
import sys
if not (3, 10) <= sys.version_info[:2] < (3, 12):
    sys.exit(f"optimum-neuron 0.4.5 needs Python 3.10 or 3.11, found {sys.version.split()[0]} (set PYTHON=python3.11)")
PY
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
echo "[neuron-venv] creating $venv" >&2
"$PYTHON" -m venv "$venv"
pip() {
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
# torch first and alone: otherwise pip picks a multi-GB CUDA build.
pip "torch==$TORCH_VERSION" >&2
pip "${REQUIREMENTS[@]}" >&2
"$venv/bin/python" -m pip check >&2
touch "$venv/.complete"
echo "[neuron-venv] done" >&2
echo "$venv"
