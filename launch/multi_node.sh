#!/usr/bin/env bash
# Several nodes through DeepSpeed's launcher, in one of its two modes:
#
# ssh mode: run once, on the first node; DeepSpeed starts the other nodes with
# pdsh over passwordless ssh (same paths on every node, shared storage):
#
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=10.0.0.1 launch/multi_node.sh train CONFIG.yaml
#
# no_ssh mode: run on every node, each with its own NODE_RANK (what a cluster
# scheduler does; slurm/train.sbatch uses it):
#
#   node 0:  HOSTFILE=hosts MASTER_ADDR=10.0.0.1 NODE_RANK=0 launch/multi_node.sh --no-ssh train CONFIG.yaml
#   node 1:  HOSTFILE=hosts MASTER_ADDR=10.0.0.1 NODE_RANK=1 launch/multi_node.sh --no-ssh train CONFIG.yaml
#
# Instead of HOSTFILE, NNODES (with NPROC_PER_NODE) makes a hostfile; inside a
# Slurm job it is made from the job's nodes. MASTER_ADDR must be an address of
# node 0 that all nodes reach. Every rank runs `python -m reflora_ds ARGS`.
# Environment: launch/env.sh.
set -uo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

mode=${LAUNCH_MODE:-}
case "${1:-}" in
  --no-ssh | --no_ssh) mode=no_ssh; shift ;;
  --ssh) mode=ssh; shift ;;
esac
if [ -z "$mode" ]; then
  mode=$([ -n "${NODE_RANK:-}" ] && echo no_ssh || echo ssh)
fi
usage_if_empty "$@"

hostfile=${HOSTFILE:-}
if [ -z "$hostfile" ]; then
  hostfile=$(mktemp "${TMPDIR:-/tmp}/reflora-hostfile.XXXXXX")
  trap 'rm -f "$hostfile"' EXIT
  make_hostfile "$hostfile"
fi
[ -f "$hostfile" ] || die "hostfile not found: $hostfile"
nodes=$(hostfile_nodes "$hostfile")

launcher=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$MASTER_ADDR"
          --master_port "$MASTER_PORT")
case "$mode" in
  no_ssh)
    [ -n "${NODE_RANK:-}" ] || die "--no-ssh needs NODE_RANK (0 .. $((nodes - 1)))"
    if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$nodes" ]; then
      die "NODE_RANK $NODE_RANK is outside 0 .. $((nodes - 1)) ($hostfile lists $nodes nodes)"
    fi
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
    ;;
  ssh)
    [ "$MASTER_ADDR" != 127.0.0.1 ] || [ "$nodes" -eq 1 ] ||
      die "ssh mode on $nodes nodes needs MASTER_ADDR (an address of the first node in $hostfile)"
    # DeepSpeed copies only a few variables to the other nodes; the rest go
    # through its environment file (DS_ENV_FILE).
    envfile=$(mktemp "${TMPDIR:-/tmp}/reflora-dsenv.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -f '$envfile' $([ -n "${HOSTFILE:-}" ] || echo "'$hostfile'")" EXIT
    for var in $FORWARD_ENV; do
      [ -n "${!var:-}" ] && echo "$var=${!var}" >> "$envfile"
    done
    export DS_ENV_FILE=$envfile
    launcher+=(--launcher pdsh)
    ;;
  *) die "LAUNCH_MODE must be ssh or no_ssh, not $mode" ;;
esac

# shellcheck disable=SC2206
extra=(${LAUNCHER_ARGS:-})
run_launcher "${launcher[@]}" "${extra[@]}" --module reflora_ds "$@"
