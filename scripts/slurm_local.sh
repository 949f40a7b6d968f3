#!/usr/bin/env bash
# A throw-away Slurm cluster on this one machine, for tests and for trying the
# batch scripts in slurm/ without a real cluster.
#
#   scripts/slurm_local.sh start DIR [NODES]   configure and start; prints the SLURM_CONF to export
#   scripts/slurm_local.sh stop DIR            stop everything started by `start DIR`
#
# `start` writes DIR/slurm.conf and starts, all as root and all inside DIR:
# a private munged (own key and socket, so a system munge is never touched),
# slurmctld, and NODES slurmd daemons (default 2), each run as `slurmd -N NAME`
# with its own port, spool, pid and log file. The nodes share this host's
# CPUs (each node advertises all of them), so two "nodes" run side by side.
# Client commands need `export SLURM_CONF=DIR/slurm.conf`.
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages
# (scripts/install_slurm.sh). No accounting database: job states come from
# `scontrol show job`, which keeps finished jobs for MinJobAge seconds.
set -euo pipefail

usage() { sed -n '2,19p' "$0" >&2; exit 2; }

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "slurm_local.sh: timed out waiting for $what" >&2
      return 1
    fi
    sleep 0.5
  done
}

start() {
  local dir=$1 nodes=${2:-2}
  for cmd in slurmctld slurmd sbatch scontrol munged munge; do
    command -v "$cmd" >/dev/null || { echo "slurm_local.sh: $cmd not found (run scripts/install_slurm.sh)" >&2; exit 3; }
  done
  [ "$(id -u)" -eq 0 ] || { echo "slurm_local.sh: must run as root" >&2; exit 3; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if pid_alive "$dir/slurmctld.pid"; then
    echo "slurm_local.sh: a cluster already runs in $dir" >&2
    exit 1
  fi
  mkdir -p "$dir/munge" "$dir/state" "$dir/log"
  chmod 700 "$dir/munge"

  # munge: a private daemon with a private key
  if [ ! -f "$dir/munge/munge.key" ]; then
    head -c 1024 /dev/urandom > "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
  fi
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  wait_for 10 munged bash -c "munge -S '$dir/munge/munge.socket' -n | unmunge -S '$dir/munge/munge.socket'"

  local host ctld_port cpus mem names=() node_lines="" i
  host=$(hostname -s)
  ctld_port=$(free_port)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  for i in $(seq 1 "$nodes"); do
    names+=("node$i")
    mkdir -p "$dir/spool/node$i"
    node_lines+="NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
  done
  local nodelist
  nodelist=$(IFS=,; echo "${names[*]}")

  cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: a ${nodes}-node cluster on one host.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
$node_lines
PartitionName=local Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" -i
  wait_for 30 slurmctld scontrol ping
  for name in "${names[@]}"; do
    slurmd -f "$SLURM_CONF" -N "$name"
  done
  wait_for 60 "${nodes} idle nodes" bash -c \
    "[ \"\$(sinfo -h -N -t idle -o '%N' | sort -u | wc -l)\" -ge $nodes ]"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfiles() {  # stop_pidfiles FILE...: TERM to all, KILL to those alive after 10 s
  local file pids=() pid i
  for file in "$@"; do
    [ -f "$file" ] && pids+=("$(cat "$file")")
  done
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for i in $(seq 1 40); do
    local alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && break
    sleep 0.25
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$@"
}

stop() {
  local dir=$1 file
  [ -d "$dir" ] || exit 0
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF=$dir/slurm.conf
  # Jobs first, so that no slurmstepd outlives its slurmd.
  if [ -f "$SLURM_CONF" ] && pid_alive "$dir/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel --full --signal=KILL $jobs >/dev/null 2>&1 || true
      # shellcheck disable=SC2086
      scancel $jobs >/dev/null 2>&1 || true
    fi
  fi
  stop_pidfiles "$dir"/slurmd.*.pid
  # A step daemon whose slurmd is gone would linger: end those of this cluster.
  local pid
  for pid in $(pgrep -x slurmstepd || true); do
    if tr '\0' ' ' < "/proc/$pid/environ" 2>/dev/null | grep -q "SLURM_CONF=$SLURM_CONF"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  stop_pidfiles "$dir/slurmctld.pid"
  if pid_alive "$dir/munge/munged.pid"; then
    munged --stop --socket="$dir/munge/munge.socket" >/dev/null 2>&1 || stop_pidfiles "$dir/munge/munged.pid"
  fi
}

case "${1:-}" in
  start) [ $# -ge 2 ] || usage; start "$2" "${3:-2}" ;;
  stop) [ $# -eq 2 ] || usage; stop "$2" ;;
  *) usage ;;
esac
