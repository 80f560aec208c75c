#!/bin/bash
# Start a two-node Slurm cluster on this one machine, for hyperjob's multi-node tests, without systemd.
#
# Each node is a real slurmd in its own network namespace (reached with nsenter, not `ip netns exec`, which
# remounts /sys and hides the cgroup mounts slurmd needs) and its own UTS and mount namespace, where it has its own
# hostname and a private hosts file bind-mounted over /etc/hosts. The namespaces hang off a bridge in the root
# namespace:
#
#   root namespace  hjbr0 10.231.0.1   slurmctld (own UTS/mount namespace, hostname hj-ctl), munged, clients
#   hj-n1           10.231.0.11        slurmd (hostname hj-n1)
#   hj-n2           10.231.0.12        slurmd (hostname hj-n2)
#
# Only the bridge, the veth pairs and the namespaces this script creates carry traffic: slurmctld listens on the
# bridge address only (NoCtldInAddrAny) and nothing else on the network is contacted. Everything the cluster
# writes (config, hosts file, state, logs, pid files, the munge key and socket) lives under $BASE, next to (never
# inside) the single-node cluster of .ci/slurm/start.sh, which this script does not touch.
#
# Idempotent: the network is created only where missing, and only daemons that are not running (pid file plus
# command line) are started; re-running it after a node's slurmd died brings that node back. A controller it starts
# begins with an empty queue (job ids restart at 1). On success both nodes are idle and $BASE/env.sh holds
# `export SLURM_CONF=...`. Stop with .ci/slurm/stop-2node.sh.
#
# Environment:
#   HYPERJOB_SLURM2_BASE          state directory (default /tmp/hyperjob-slurm2)
#   HYPERJOB_SLURM2_CTLD_PORT     slurmctld port on the bridge address (default 6827)
#   HYPERJOB_SLURM2_SLURMD_PORT   slurmd port inside each node's namespace (default 6828)
#   HYPERJOB_SLURM2_MIN_JOB_AGE   seconds Slurm remembers a finished job (default 10, as start.sh)
set -euo pipefail

BASE=${HYPERJOB_SLURM2_BASE:-/tmp/hyperjob-slurm2}
CTLD_PORT=${HYPERJOB_SLURM2_CTLD_PORT:-6827}
SLURMD_PORT=${HYPERJOB_SLURM2_SLURMD_PORT:-6828}
MIN_JOB_AGE=${HYPERJOB_SLURM2_MIN_JOB_AGE:-10}
CONF=$BASE/etc/slurm.conf
HOSTS=$BASE/etc/hosts
BRIDGE=hjbr0
NET=10.231.0
CTLD_NAME=hj-ctl
CTLD_ADDR=$NET.1
NODES=(hj-n1 hj-n2)
# node name -> address (10.231.0.11, .12, ...)
declare -A ADDR=([hj-n1]=$NET.11 [hj-n2]=$NET.12)
PARTITION=two
WAIT_SECONDS=60

log() { echo "[hyperjob-slurm2 start $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, bridge, and slurmd running jobs as their user)"

# --- 1. Tools ------------------------------------------------------------------------------------
# The Debian packages, installed without letting their postinst start the system daemons (policy-rc.d 101).
install_slurm() {
  local policy=/usr/sbin/policy-rc.d ours=0 rc=0 aptlog=${TMPDIR:-/tmp}/hyperjob-slurm2-apt.log
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
  fi
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
    >"$aptlog" 2>&1 || rc=$?
  [ "$ours" = 0 ] || rm -f "$policy"
  if [ "$rc" != 0 ]; then
    tail -n 30 "$aptlog" >&2
    die "apt-get install failed (rc=$rc)"
  fi
}
need_install=0
for tool in munged slurmctld slurmd sbatch squeue sinfo scontrol scancel; do
  command -v "$tool" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  log "installing slurmctld slurmd slurm-client munge"
  install_slurm
fi
for tool in ip nsenter unshare mount hostname; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (iproute2 / util-linux)"
done

mkdir -p "$BASE/etc" "$BASE/run" "$BASE/state" "$BASE/log" "$BASE/munge"
for node in "${NODES[@]}"; do mkdir -p "$BASE/spool/$node"; done
# munged needs a socket directory that everybody may search and nobody else may write.
chmod 755 "$BASE" "$BASE/munge"

# shellcheck source=.ci/slurm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- 2. Network: bridge, one namespace and veth pair per node ----------------------------------------
# has_addr NETNS DEV ADDR: DEV (in NETNS, or in the root namespace when NETNS is empty) already holds ADDR.
# Not `ip ... | grep -q`: under pipefail, grep quitting early can fail the pipeline with ip's SIGPIPE.
has_addr() {
  local addrs
  addrs=$(ip ${1:+-n "$1"} -o addr show dev "$2" 2>/dev/null) || return 1
  [[ "$addrs" == *" $3/"* ]]
}

if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  log "creating bridge $BRIDGE"
  ip link add "$BRIDGE" type bridge
fi
has_addr "" "$BRIDGE" "$CTLD_ADDR" || ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

for node in "${NODES[@]}"; do
  host_end=hjv-$node   # on the bridge, in the root namespace
  node_end=hje-$node   # inside the node's namespace
  if [ ! -e "/run/netns/$node" ]; then
    log "creating network namespace $node"
    ip netns add "$node"
  fi
  if ! ip link show "$host_end" >/dev/null 2>&1; then
    # A half-made pair from an interrupted run: its node end may sit in the namespace already.
    ip -n "$node" link del "$node_end" 2>/dev/null || true
    ip link add "$host_end" type veth peer name "$node_end"
    ip link set "$node_end" netns "$node"
  fi
  ip link set "$host_end" master "$BRIDGE" up
  has_addr "$node" "$node_end" "${ADDR[$node]}" || ip -n "$node" addr add "${ADDR[$node]}/24" dev "$node_end"
  ip -n "$node" link set "$node_end" up
  ip -n "$node" link set lo up
done

# The names every daemon resolves: bind-mounted over /etc/hosts inside their own mount namespaces only.
{
  echo "# Written by hyperjob .ci/slurm/start-2node.sh; seen as /etc/hosts by this cluster's daemons only."
  echo "127.0.0.1 localhost"
  echo "$CTLD_ADDR $CTLD_NAME"
  for node in "${NODES[@]}"; do echo "${ADDR[$node]} $node"; done
} >"$HOSTS.tmp"
mv -f "$HOSTS.tmp" "$HOSTS"
chmod 644 "$HOSTS"

# --- 3. What to start --------------------------------------------------------------------------------
start_ctld=1
if is_ours "$BASE/run/slurmctld.pid" slurmctld; then start_ctld=0; fi
if [ "$start_ctld" = 1 ] && port_taken "$CTLD_ADDR" "$CTLD_PORT"; then
  die "$CTLD_ADDR:$CTLD_PORT is taken (a slurmctld not recorded in $BASE/run?); set HYPERJOB_SLURM2_CTLD_PORT"
fi

# --- 4. munge ------------------------------------------------------------------------------------------
start_munged

# --- 5. slurm.conf and slurmctld ------------------------------------------------------------------------
# Rewritten only while slurmctld is down, so a running controller never sees its config change.
write_conf() {
  local node
  cat >"$CONF" <<EOF
# Written by hyperjob .ci/slurm/start-2node.sh: a throwaway two-node cluster in network namespaces, for tests.
ClusterName=hyperjob2
SlurmctldHost=$CTLD_NAME($CTLD_ADDR)
# Listen on the bridge address only, not on every address of the root namespace.
CommunicationParameters=NoCtldInAddrAny
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also bounds how long a job requeued after a node failure waits before it may start again.
AuthInfo=socket=$BASE/munge/munge.socket,cred_expire=10
StateSaveLocation=$BASE/state
# %n is the node name: each slurmd has its own spool, pid file and log.
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
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
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
MinJobAge=$MIN_JOB_AGE
# A node that stops answering is DOWN after ~SlurmdTimeout; it comes back by itself when its slurmd registers.
SlurmdTimeout=10
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,sched_interval=2
KillWait=5
EOF
  # Two CPUs per node: a one-task-per-node job (as hyperjob's train stage asks) fits, and so do two jobs.
  for node in "${NODES[@]}"; do
    echo "NodeName=$node NodeAddr=${ADDR[$node]} CPUs=2 RealMemory=2000 State=UNKNOWN" >>"$CONF"
  done
  local list
  list=$(IFS=,; echo "${NODES[*]}")
  echo "PartitionName=$PARTITION Nodes=$list Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

if [ "$start_ctld" = 0 ]; then
  log "slurmctld already running"
else
  write_conf
  log "starting slurmctld ($CTLD_NAME, $CTLD_ADDR:$CTLD_PORT)"
  # Own hostname and hosts file; slurmctld daemonizes and stays in these namespaces. -c: a new controller starts
  # with no jobs, so those of an earlier session that died (pending, or stuck completing on a killed node) never
  # come back to life in this one.
  # shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
  unshare --uts --mount --propagation private bash -c \
    'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmctld -c -f "$3"' \
    slurmctld-wrapper "$CTLD_NAME" "$HOSTS" "$CONF"
fi

# --- 6. One slurmd per node, inside its namespaces ------------------------------------------------------
for node in "${NODES[@]}"; do
  if is_ours "$BASE/run/slurmd-$node.pid" slurmd "$node"; then
    log "slurmd $node already running"
    continue
  fi
  log "starting slurmd $node (${ADDR[$node]}:$SLURMD_PORT)"
  # shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
  nsenter --net="/run/netns/$node" unshare --uts --mount --propagation private bash -c \
    'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
    slurmd-wrapper "$node" "$HOSTS" "$CONF"
done

# --- 7. Wait until both nodes accept jobs ---------------------------------------------------------------
export SLURM_CONF=$CONF
nodes_csv=$(IFS=,; echo "${NODES[*]}")
ready() {
  local states
  states=$(sinfo --noheader --Node --nodes="$nodes_csv" --format="%N %T" 2>/dev/null) || return 1
  local up=0 node state
  while read -r node state; do
    case "$state" in
      idle | mixed | allocated | completing) up=$((up + 1)) ;;
      # A node left drained by an earlier unclean stop comes back with RESUME.
      *drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
  done <<<"$states"
  [ "$up" = "${#NODES[@]}" ]
}
deadline=$((SECONDS + WAIT_SECONDS))
until ready; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "nodes not all up after ${WAIT_SECONDS}s:"
    sinfo --Node --format="%N %T %E" >&2 2>/dev/null || true
    for f in "$BASE"/log/munged.log "$BASE"/log/slurmctld.log "$BASE"/log/slurmd-*.log; do
      [ -f "$f" ] && { echo "==> $f <==" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
  fi
  sleep 0.2
done

echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
log "nodes $nodes_csv are up (partition $PARTITION); run: source $BASE/env.sh"
