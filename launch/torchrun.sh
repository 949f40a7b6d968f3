#!/usr/bin/env bash
# The same runs through torchrun instead of DeepSpeed's launcher (the trainer
# reads the same RANK/WORLD_SIZE/MASTER_* variables). Run on every node:
#
#   one node:   NPROC_PER_NODE=4 launch/torchrun.sh train CONFIG.yaml
#   node K:     NNODES=2 NODE_RANK=K MASTER_ADDR=10.0.0.1 launch/torchrun.sh train CONFIG.yaml
#
# Runs `torchrun --nnodes NNODES --node_rank NODE_RANK --nproc_per_node
# NPROC_PER_NODE --master_addr MASTER_ADDR --master_port MASTER_PORT -m
# reflora_ds ARGS`. Environment: launch/env.sh.
set -uo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
usage_if_empty "$@"

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
[ "$nnodes" -eq 1 ] || [ "$MASTER_ADDR" != 127.0.0.1 ] ||
  die "$nnodes nodes need MASTER_ADDR (an address of node 0 that every node reaches)"

# shellcheck disable=SC2086
run_launcher "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" \
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${LAUNCHER_ARGS:-} -m reflora_ds "$@"
