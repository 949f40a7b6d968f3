# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

usage_if_empty() {  # usage_if_empty "$@": the scripts need at least a reflora-ds command
  if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" >&2
    exit 2
  fi
}

# run_launcher CMD...: run a launcher so that SIGTERM leads to a checkpoint.
#
# The launcher starts with SIGTERM ignored: DeepSpeed's runner has no handler
# of its own in the local and --no_ssh modes and would otherwise die at once,
# orphaning its ranks (under Slurm the step would then end and kill them
# mid-save). On SIGTERM this script passes the signal to the launcher and to
# its children (DeepSpeed's per-node launcher, which forwards it to the ranks;
# or pdsh; or torchrun's workers), then waits until every rank has saved and
# exited. Returns the launcher's exit status, or 143 after a SIGTERM.
run_launcher() {
  if [ "${LAUNCH_DRY_RUN:-0}" = 1 ]; then
    local arg words=()
    for arg in "$@"; do
      if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$arg"); else words+=("$(printf '%q' "$arg")"); fi
    done
    echo "${words[*]}"
    return 0
  fi
  local child rc term=0
  ( trap '' TERM; exec "$@" ) &
  child=$!
  # shellcheck disable=SC2064
  trap "term=1; kill -TERM $child 2>/dev/null; pkill -TERM -P $child 2>/dev/null || true" TERM
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - TERM
  if [ "$term" = 1 ] && [ "$rc" -ne 0 ]; then
    return 143
  fi
  return "$rc"
}

# make_hostfile FILE: a DeepSpeed hostfile for this job, NPROC_PER_NODE slots a node.
# Inside a Slurm job the hosts are the job's nodes, in Slurm's order (the same
# order as SLURM_NODEID); elsewhere NNODES placeholder names (in --no_ssh mode
# the names only label the nodes: each node picks its line by NODE_RANK).
make_hostfile() {
  local file=$1 host i
  : > "$file"
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
    for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
      echo "$host slots=$NPROC_PER_NODE" >> "$file"
    done
  else
    [ -n "${NNODES:-}" ] || die "set HOSTFILE, or NNODES for a generated hostfile"
    for i in $(seq 0 $((NNODES - 1))); do
      echo "node$i slots=$NPROC_PER_NODE" >> "$file"
    done
  fi
}

# hostfile_nodes FILE: the number of hosts a hostfile lists.
hostfile_nodes() { grep -cE '^[[:space:]]*[^#[:space:]]' "$1"; }
