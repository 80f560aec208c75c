# shellcheck shell=bash
# Shared by the single-node and two-node test clusters' start/stop scripts (sourced; they set BASE and log first).

# pid_is_ours PID NAME [ARG]: PID is alive (not a zombie) and is NAME started with our BASE (and ARG, e.g. the node
# name of a slurmd). Checking the command line guards against a stale pid file whose pid was reused.
pid_is_ours() {
  local state cmdline
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"$2"*"$BASE"*"${3:-}"* ]]
}

# is_ours PIDFILE NAME [ARG]: the pid recorded in PIDFILE is ours (see pid_is_ours).
is_ours() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  pid_is_ours "$pid" "$2" "${3:-}"
}

# port_taken ADDR PORT: something already listens there (bash's /dev/tcp, no extra tools).
port_taken() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# start_munged: a munged of our own (key, socket, pid and log under BASE), unless it already runs.
start_munged() {
  local key=$BASE/munge/munge.key
  if [ ! -s "$key" ]; then
    mungekey --create --keyfile="$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1024 count=1 2>/dev/null
    chmod 600 "$key"
  fi
  if is_ours "$BASE/munge/munged.pid" munged; then
    log "munged already running"
    return 0
  fi
  rm -f "$BASE/munge/munge.socket" "$BASE/munge/munge.socket.lock"
  log "starting munged"
  munged --key-file="$key" --socket="$BASE/munge/munge.socket" --pid-file="$BASE/munge/munged.pid" \
    --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed"
}

# stop_daemon NAME PIDFILE [ARG]: TERM, up to 10 s, then KILL; a stale pid file is just removed.
stop_daemon() {
  local name=$1 pidfile=$2 pid
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -z "$pid" ]; then
    log "$name${3:+ $3}: no pid file, nothing to stop"
    return 0
  fi
  if ! pid_is_ours "$pid" "$name" "${3:-}"; then
    log "$name${3:+ $3}: pid $pid is not ours (already stopped); removing stale pid file"
    rm -f "$pidfile"
    return 0
  fi
  log "stopping $name${3:+ $3} (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    pid_is_ours "$pid" "$name" "${3:-}" || break
    sleep 0.1
  done
  if pid_is_ours "$pid" "$name" "${3:-}"; then
    log "$name${3:+ $3} did not exit after 10s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
