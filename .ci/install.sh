#!/usr/bin/env bash
# Install hyperjob into ./.venv.
#   bash .ci/install.sh          what the pipeline needs: torch (CPU build) and the `train` extra
#   bash .ci/install.sh --dev    that, plus what the tests and linters need: the `aws` and `dev` extras
# HYPERJOB_INSTALL_DEV=1 is the same as --dev. Idempotent: a second run installs only what is missing, so --dev on a
# pipeline-only venv adds the test tools.
#
# Needs from the system: Python >= 3.10 ($PYTHON, default python3) with its venv module and ensurepip; on
# Debian/Ubuntu that is the apt package python3-venv (python3.N-venv for another python3.N), installed here when
# run as root and missing.
# torch is pinned first, in its own pip call: any other order lets pip choose a multi-GB CUDA build.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${HYPERJOB_TORCH_VERSION:-2.13.0}
DEV=${HYPERJOB_INSTALL_DEV:-0}

for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h | --help)
      sed -n '2,10p' "$here/install.sh" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "install.sh: unknown argument '$arg' (allowed: --dev, --help)" >&2
      exit 2
      ;;
  esac
done
if [[ "$DEV" != 0 && "$DEV" != 1 ]]; then
  echo "install.sh: HYPERJOB_INSTALL_DEV='$DEV' (allowed: 0, 1)" >&2
  exit 2
fi

# One line per step: its name, then how long it took (the torch step is minutes on a fresh machine). The step's
# stderr is held until the line is complete, so a failure reads "... failed (N s)" followed by its reason.
step() {
  local label=$1 start=$SECONDS err rc=0
  shift
  err=$(mktemp)
  printf '[install] %s ... ' "$label"
  "$@" 2>"$err" || rc=$?
  if [[ "$rc" == 0 ]]; then printf 'done'; else printf 'failed'; fi
  printf ' (%d s)\n' "$((SECONDS - start))"
  # pip's own warnings about index locations configured on some machines are noise here; errors still show.
  grep -v '^WARNING: Location' "$err" >&2 || true
  rm -f "$err"
  return "$rc"
}

check_python() {
  if ! command -v "$PYTHON" >/dev/null; then
    echo "install.sh: $PYTHON not found; install Python >= 3.10 (Debian/Ubuntu: apt-get install -y python3 python3-venv)" >&2
    exit 1
  fi
  "$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"install.sh: hyperjob needs Python >= 3.10, found {sys.version.split()[0]}")
PY
}

# The apt package that gives $PYTHON its venv module with ensurepip (Debian leaves both out of python3 itself).
venv_package() {
  local version default
  version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  default=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || true)
  if [[ "$version" == "$default" ]]; then echo python3-venv; else echo "python$version-venv"; fi
}

ensure_venv_module() {
  if "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    return
  fi
  local pkg
  pkg=$(venv_package)
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install.sh: $PYTHON has no venv module with ensurepip; install it (Debian/Ubuntu: apt-get install -y $pkg)" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet: update only when the first try cannot find the package.
  apt-get install -y -qq "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$pkg" >/dev/null; }
}

pip() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"
}

check_python
if [[ ! -x .venv/bin/python ]]; then
  step "venv module (apt package $(venv_package))" ensure_venv_module
  step "create .venv with $("$PYTHON" --version)" "$PYTHON" -m venv .venv
fi
extras=train
if [[ "$DEV" == 1 ]]; then extras=train,aws,dev; fi
step "torch==$TORCH_VERSION" pip "torch==$TORCH_VERSION"
step "hyperjob[$extras] (editable)" pip -e ".[$extras]"
tools="pipeline only; bash .ci/install.sh --dev adds the test tools"
if .venv/bin/python -c 'import pytest' 2>/dev/null; then tools="with the test tools"; fi
echo "[install] ready: $(.venv/bin/hyperjob --version) in .venv ($tools)"
