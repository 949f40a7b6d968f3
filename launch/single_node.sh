#!/usr/bin/env bash
# One node, NPROC_PER_NODE ranks, through DeepSpeed's launcher:
#
#   launch/single_node.sh train CONFIG.yaml [--flag value ...] [--set key=value ...]
#   NPROC_PER_NODE=4 launch/single_node.sh train CONFIG.yaml
#   launch/single_node.sh eval --adapter runs/x/adapter --data test.json
#
# Runs `deepspeed --num_gpus NPROC_PER_NODE --master_port MASTER_PORT --module
# reflora_ds ARGS...` (`--include localhost:IDS` when CUDA_VISIBLE_DEVICES names
# the GPUs): every rank runs `python -m reflora_ds ARGS`. Without GPUs the
# ranks are CPU processes joined by gloo. Environment: launch/env.sh.
set -uo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"
usage_if_empty "$@"

# With CUDA_VISIBLE_DEVICES set (Slurm sets it to the job's GPUs), --num_gpus
# would make DeepSpeed drop it and use GPUs 0..N-1; name the visible ones instead.
select=(--num_gpus "$NPROC_PER_NODE")
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  select=(--include "localhost:$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | head -n "$NPROC_PER_NODE" | paste -sd,)")
fi
# shellcheck disable=SC2206
extra=(${LAUNCHER_ARGS:-})
run_launcher "$PYTHON" -m deepspeed.launcher.runner "${select[@]}" --master_port "$MASTER_PORT" "${extra[@]}" \
  --module reflora_ds "$@"
