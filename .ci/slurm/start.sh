#!/bin/bash
# Start a single-node Slurm cluster (munged, slurmctld, slurmd) for hyperjob's tests, without systemd.
#
# Meant for CI runners and developer machines running as root (Debian/Ubuntu, tested with Debian 12's
# Slurm 22.05.8 and munge 0.5.15). Everything the cluster writes (config, state, logs, pid files, the
# munge key and socket) lives under $HYPERJOB_SLURM_BASE, so it never touches a system Slurm or munge.
#
# Idempotent: packages are installed only when missing, and only the daemons that are not already
# running (checked by pid file and command line) are started. On success $BASE/env.sh holds
# `export SLURM_CONF=...`; source it before calling sbatch/squeue. Stop with .ci/slurm/stop.sh.
#
# Environment:
#   HYPERJOB_SLURM_BASE        state directory (default /tmp/hyperjob-slurm)
#   HYPERJOB_SLURM_NODE        node name (default: short hostname)
#   HYPERJOB_SLURMCTLD_PORT    slurmctld port (default 6817)
#   HYPERJOB_SLURMD_PORT       slurmd port (default 6818)
#   HYPERJOB_SLURM_MIN_JOB_AGE seconds Slurm remembers a finished job (default 10, as on a busy cluster:
#                              hyperjob's status must stay true after Slurm has forgotten a job)
set -euo pipefail

BASE=${HYPERJOB_SLURM_BASE:-/tmp/hyperjob-slurm}
NODE=${HYPERJOB_SLURM_NODE:-$(hostname -s)}
CTLD_PORT=${HYPERJOB_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${HYPERJOB_SLURMD_PORT:-6818}
MIN_JOB_AGE=${HYPERJOB_SLURM_MIN_JOB_AGE:-10}
CONF=$BASE/etc/slurm.conf
WAIT_SECONDS=60

log() { echo "[hyperjob-slurm start $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as their submitting user)"

# --- 1. Packages -------------------------------------------------------------------------------
install_packages() {
  local policy=/usr/sbin/policy-rc.d added_policy=0
  export DEBIAN_FRONTEND=noninteractive
  # Package postinst scripts would start the system munge/slurm daemons (or fail trying without
  # systemd); a policy-rc.d that exits 101 forbids that. Remove it afterwards only if we added it.
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  local rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
    >"${TMPDIR:-/tmp}/hyperjob-slurm-apt.log" 2>&1 || rc=$?
  if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi
  if [ "$rc" != 0 ]; then
    tail -n 30 "${TMPDIR:-/tmp}/hyperjob-slurm-apt.log" >&2
    die "apt-get install failed (rc=$rc)"
  fi
}

missing=0
for cmd in munged slurmctld slurmd sbatch squeue sinfo scontrol scancel; do
  command -v "$cmd" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  log "installing slurmctld slurmd slurm-client munge"
  install_packages
fi

mkdir -p "$BASE/etc" "$BASE/run" "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/munge"
# munged refuses a socket directory that is world-writable or not searchable.
chmod 755 "$BASE" "$BASE/munge"

# shellcheck source=.ci/slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

start_ctld=1 start_slurmd=1
if is_ours "$BASE/run/slurmctld.pid" slurmctld; then start_ctld=0; fi
if is_ours "$BASE/run/slurmd.pid" slurmd; then start_slurmd=0; fi
if [ "$start_ctld" = 1 ] && port_taken 127.0.0.1 "$CTLD_PORT"; then
  die "port $CTLD_PORT is taken (another slurmctld?); set HYPERJOB_SLURMCTLD_PORT"
fi
if [ "$start_slurmd" = 1 ] && port_taken 127.0.0.1 "$SLURMD_PORT"; then
  die "port $SLURMD_PORT is taken (another slurmd?); set HYPERJOB_SLURMD_PORT"
fi

# --- 2. munge ----------------------------------------------------------------------------------
start_munged

# --- 3. slurm.conf and slurmctld ---------------------------------------------------------------
# hw_field NAME LINE: the value of NAME=value in a `slurmd -C` line.
hw_field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

# The config is rewritten only while slurmctld is down, so a running controller never sees it change.
write_conf() {
  # `slurmd -C` prints this machine's hardware as a NodeName line; keep its topology fields and
  # leave 5% of the memory to the OS so jobs asking for "all memory" still fit.
  local hw mem
  hw=$(slurmd -C | head -n 1)
  mem=$(($(hw_field RealMemory "$hw") * 95 / 100))
  cat >"$CONF" <<EOF
# Written by hyperjob .ci/slurm/start.sh: a throwaway single-node cluster for tests.
ClusterName=hyperjob
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (minimum 5 s).
AuthInfo=socket=$BASE/munge/munge.socket,cred_expire=10
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups: containers and CI runners rarely allow them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# No slurmdbd, so no sacct: finished jobs are read with scontrol (kept for MinJobAge seconds, purged
# within about 10 s more) and every finished job is also appended to the jobcomp text file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MinJobAge=$MIN_JOB_AGE
ReturnToService=2
# Schedule as soon as possible: tests wait on short dependency chains.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,sched_interval=2
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(hw_field CPUs "$hw") Boards=$(hw_field Boards "$hw") SocketsPerBoard=$(hw_field SocketsPerBoard "$hw") CoresPerSocket=$(hw_field CoresPerSocket "$hw") ThreadsPerCore=$(hw_field ThreadsPerCore "$hw") RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

if [ "$start_ctld" = 0 ]; then
  log "slurmctld already running"
else
  mkdir -p "$BASE/spool/$NODE"
  write_conf
  log "starting slurmctld"
  slurmctld -f "$CONF"
fi

# --- 4. slurmd ---------------------------------------------------------------------------------
if [ "$start_slurmd" = 0 ]; then
  log "slurmd already running"
else
  log "starting slurmd"
  slurmd -f "$CONF" -N "$NODE"
fi

# --- 5. Wait until the node accepts jobs -------------------------------------------------------
export SLURM_CONF=$CONF
state=""
deadline=$((SECONDS + WAIT_SECONDS))
while [ "$SECONDS" -lt "$deadline" ]; do
  state=$(sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null || true)
  case "$state" in
    idle | mixed | allocated | completing) break ;;
    # A node left drained by an earlier unclean stop comes back with RESUME.
    *drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle | mixed | allocated | completing) ;;
  *)
    log "node '$NODE' is '${state:-unreachable}' after ${WAIT_SECONDS}s; daemon logs:"
    for f in "$BASE"/log/munged.log "$BASE"/log/slurmctld.log "$BASE"/log/slurmd.log; do
      [ -f "$f" ] && { echo "==> $f <==" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
    ;;
esac

echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
# On GitHub Actions, later steps see SLURM_CONF too.
if [ -n "${GITHUB_ENV:-}" ]; then echo "SLURM_CONF=$CONF" >>"$GITHUB_ENV"; fi
log "node $NODE is $state; run: source $BASE/env.sh"
