#!/bin/bash
# Stop the two-node Slurm cluster of .ci/slurm/start-2node.sh and remove its network.
#
# Only daemons recorded in $BASE's pid files whose command line names $BASE are stopped, so the single-node test
# cluster, a system Slurm or munge on the same machine are never touched. The cluster's jobs are cancelled first;
# processes still left inside a node's network namespace afterwards (job steps orphaned by a killed slurmd) are
# ended before the namespace is deleted. Then the namespaces (their veth pairs go with them) and the bridge are
# deleted. Idempotent: whatever is already gone is skipped.
#
# Environment:
#   HYPERJOB_SLURM2_BASE   state directory (default /tmp/hyperjob-slurm2)
#   HYPERJOB_SLURM2_WIPE   1: also delete saved state, spool and logs, so the next start is fresh
set -euo pipefail

BASE=${HYPERJOB_SLURM2_BASE:-/tmp/hyperjob-slurm2}
export SLURM_CONF=$BASE/etc/slurm.conf
BRIDGE=hjbr0
NODES=(hj-n1 hj-n2)

log() { echo "[hyperjob-slurm2 stop $(date +%T)] $*" >&2; }

[ "$(id -u)" = 0 ] || { log "ERROR: must run as root"; exit 1; }

# shellcheck source=.ci/slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# 1. Cancel every job of this cluster while the controller is up, and give them a moment to end.
if pid_is_ours "$(cat "$BASE/run/slurmctld.pid" 2>/dev/null || true)" slurmctld; then
  mapfile -t jobs < <(squeue --noheader --format=%A 2>/dev/null || true)
  if [ "${#jobs[@]}" -gt 0 ]; then
    log "cancelling ${#jobs[@]} job(s): ${jobs[*]}"
    scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(squeue --noheader --states=PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED --format=%A 2>/dev/null)" ] &&
        break
      sleep 0.2
    done
  fi
fi

# 2. Daemons: the slurmds first (they report to slurmctld), munged last (all of them use it).
for node in "${NODES[@]}"; do
  stop_daemon slurmd "$BASE/run/slurmd-$node.pid" "$node"
done
stop_daemon slurmctld "$BASE/run/slurmctld.pid"
stop_daemon munged "$BASE/munge/munged.pid"

# 3. Leftover processes in a node's network namespace (a step whose slurmd was killed keeps running), then the
# namespace itself. `ip netns pids` lists the processes whose /proc/PID/ns/net is that namespace.
ns_pids() { ip netns pids "$1" 2>/dev/null || true; }
for node in "${NODES[@]}"; do
  [ -e "/run/netns/$node" ] || continue
  mapfile -t left < <(ns_pids "$node")
  if [ "${#left[@]}" -gt 0 ]; then
    log "$node: ending ${#left[@]} leftover process(es): ${left[*]}"
    kill -TERM "${left[@]}" 2>/dev/null || true
    for _ in $(seq 1 50); do
      mapfile -t left < <(ns_pids "$node")
      [ "${#left[@]}" = 0 ] && break
      sleep 0.1
    done
    [ "${#left[@]}" = 0 ] || kill -KILL "${left[@]}" 2>/dev/null || true
  fi
  log "deleting network namespace $node"
  ip netns del "$node" 2>/dev/null || true
done
for node in "${NODES[@]}"; do
  ip link del "hjv-$node" 2>/dev/null || true  # normally gone with its namespace
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  log "deleting bridge $BRIDGE"
  ip link del "$BRIDGE"
fi

# The controller is gone: SLURM_CONF from env.sh would only point clients at nothing.
rm -f "$BASE/env.sh"

if [ "${HYPERJOB_SLURM2_WIPE:-0}" = 1 ]; then
  log "wiping state, spool and logs under $BASE"
  rm -rf "${BASE:?}/state" "${BASE:?}/spool" "${BASE:?}/log"
fi
