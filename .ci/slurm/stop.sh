#!/bin/bash
# Stop the single-node Slurm cluster started by .ci/slurm/start.sh.
#
# Only daemons recorded in $BASE's pid files whose command line names $BASE are stopped, so a system
# Slurm or munge on the same machine is never touched. The cluster's jobs are cancelled first, so no
# job keeps running after its slurmd is gone.
#
# Environment:
#   HYPERJOB_SLURM_BASE   state directory (default /tmp/hyperjob-slurm)
#   HYPERJOB_SLURM_WIPE   1: also delete saved state, spool and logs, so the next start is fresh
set -euo pipefail

BASE=${HYPERJOB_SLURM_BASE:-/tmp/hyperjob-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf

log() { echo "[hyperjob-slurm stop $(date +%T)] $*" >&2; }

# shellcheck source=.ci/slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# 1. Cancel every job of this cluster while the controller is still up, and wait briefly for them to go.
ctld_pid=$(cat "$BASE/run/slurmctld.pid" 2>/dev/null || true)
if pid_is_ours "$ctld_pid" slurmctld; then
  mapfile -t jobs < <(squeue --noheader --format=%A 2>/dev/null || true)
  if [ "${#jobs[@]}" -gt 0 ]; then
    log "cancelling ${#jobs[@]} job(s): ${jobs[*]}"
    scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(squeue --noheader --states=PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED --format=%A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. Stop the daemons: slurmd first (it reports to slurmctld), munged last (both use it).
stop_daemon slurmd "$BASE/run/slurmd.pid"
stop_daemon slurmctld "$BASE/run/slurmctld.pid"
stop_daemon munged "$BASE/munge/munged.pid"

# The cluster is gone, so SLURM_CONF from env.sh would only point clients at a dead controller.
rm -f "$BASE/env.sh"

if [ "${HYPERJOB_SLURM_WIPE:-0}" = 1 ]; then
  log "wiping state, spool and logs under $BASE"
  rm -rf "${BASE:?}/state" "${BASE:?}/spool" "${BASE:?}/log"
fi
