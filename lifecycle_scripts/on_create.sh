#!/usr/bin/env bash
# HyperPod runs this once on every node it creates (LifeCycleConfig.OnCreate), from the directory it copied the
# lifecycle scripts into. It checks the inputs, then runs provision.py, which does the work; everything either
# prints goes to $LOG_DIR/provisioning.log as well as to HyperPod's CloudWatch stream, and any failure ends the
# script non-zero with one line saying what failed.
#
# Environment:
#   SAGEMAKER_RESOURCE_CONFIG_PATH  set by HyperPod (default /opt/ml/config/resource_config.json)
#   HYPERJOB_PROVISION_LOG_DIR      log directory (default /var/log/provision)
#   HYPERJOB_PROVISION_PYTHON       interpreter (default the image's /usr/bin/python3, not an activated env's)
# Arguments are passed to provision.py: `bash on_create.sh --dry-run` on a node prints what it would do.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_DIR="${HYPERJOB_PROVISION_LOG_DIR:-/var/log/provision}"
LOG_FILE="$LOG_DIR/provisioning.log"
RESOURCE_CONFIG="${SAGEMAKER_RESOURCE_CONFIG_PATH:-/opt/ml/config/resource_config.json}"

fail() {
  echo "on_create.sh: FAILED: $*" >&2
  exit 1
}
trap 'fail "line $LINENO: \`$BASH_COMMAND\` exited $?"' ERR

# The image's own python3 rather than whichever conda or venv python comes first on PATH.
pick_python() {
  if [[ -n "${HYPERJOB_PROVISION_PYTHON:-}" ]]; then
    echo "$HYPERJOB_PROVISION_PYTHON"
  elif [[ -x /usr/bin/python3 ]]; then
    echo /usr/bin/python3
  elif command -v python3; then
    :
  else
    return 1
  fi
}

main() {
  echo "on_create.sh: start $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  [[ -f "$RESOURCE_CONFIG" ]] ||
    fail "resource config $RESOURCE_CONFIG not found (HyperPod sets SAGEMAKER_RESOURCE_CONFIG_PATH)"
  [[ -f "$HERE/provision.py" ]] || fail "provision.py is missing beside on_create.sh in $HERE"
  local python
  python="$(pick_python)" || fail "no python3 on this node (set HYPERJOB_PROVISION_PYTHON)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 8))' ||
    fail "$python is not Python >= 3.8 (set HYPERJOB_PROVISION_PYTHON)"
  echo "on_create.sh: $python $HERE/provision.py --resource-config $RESOURCE_CONFIG $*"
  local rc=0
  "$python" -u "$HERE/provision.py" --resource-config "$RESOURCE_CONFIG" "$@" || rc=$?
  ((rc == 0)) || fail "provision.py exited $rc (its error is the line above; full log: $LOG_FILE)"
  echo "on_create.sh: done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

mkdir -p "$LOG_DIR" || fail "cannot create the log directory $LOG_DIR"
# Through tee, so HyperPod's own capture of this script's output sees the same lines as the log file.
# main's own failures have printed their line already: exit with its status, without a second message.
main "$@" 2>&1 | tee -a "$LOG_FILE" || exit "$?"
