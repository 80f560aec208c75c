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

# is_ours PID NAME: PID is alive (not a zombie) and is NAME started with our BASE.
is_ours() {
  local state cmdline
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"$2"*"$BASE"* ]]
}

# 1. Cancel every job of this cluster while the controller is still up, and wait briefly for them to go.
ctld_pid=$(cat "$BASE/run/slurmctld.pid" 2>/dev/null || true)
if is_ours "$ctld_pid" slurmctld; then
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
for entry in slurmd:run/slurmd.pid slurmctld:run/slurmctld.pid munged:munge/munged.pid; do
  name=${entry%%:*}
  pidfile=$BASE/${entry#*:}
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -z "$pid" ]; then
    log "$name: no pid file, nothing to stop"
    continue
  fi
  if ! is_ours "$pid" "$name"; then
    log "$name: pid $pid is not our $name (already stopped); removing stale pid file"
    rm -f "$pidfile"
    continue
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    is_ours "$pid" "$name" || break
    sleep 0.1
  done
  if is_ours "$pid" "$name"; then
    log "$name did not exit after 10s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done

# The cluster is gone, so SLURM_CONF from env.sh would only point clients at a dead controller.
rm -f "$BASE/env.sh"

if [ "${HYPERJOB_SLURM_WIPE:-0}" = 1 ]; then
  log "wiping state, spool and logs under $BASE"
  rm -rf "${BASE:?}/state" "${BASE:?}/spool" "${BASE:?}/log"
fi
