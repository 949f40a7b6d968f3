# shellcheck shell=bash
# The environment of a launch: every variable the scripts in launch/ and
# slurm/ read, with its default. This file is the one place they are
# documented. It is sourced by the scripts; set any of these before calling
# them (or export them in your job script) to change the default.
#
# Where the code runs
#   REFLORA_DS_HOME   the repository (default: the folder above launch/; in
#                     the slurm/ scripts: the folder sbatch was run in). The
#                     scripts stay in the current directory: relative paths on
#                     the command line and in a run config are relative to it.
#   PYTHON            the interpreter that has reflora_ds and deepspeed
#                     (default: $REFLORA_DS_HOME/.venv/bin/python if it exists,
#                     else python3). In ssh/pdsh mode it must exist at the
#                     same path on every node.
#
# How many processes
#   NPROC_PER_NODE    ranks per node (default: the GPUs visible on this node;
#                     1 when there is none). On a machine without GPUs the same
#                     launchers start NPROC_PER_NODE CPU ranks: DeepSpeed's CPU
#                     accelerator with the gloo backend (oneCCL if installed).
#                     DeepSpeed's launcher numbers a node's GPUs 0..N-1 (it
#                     resets CUDA_VISIBLE_DEVICES); single_node.sh keeps the
#                     GPUs CUDA_VISIBLE_DEVICES names, but on several nodes use
#                     whole nodes (slurm/train.sbatch asks for --exclusive) or
#                     Slurm's device cgroup (ConstrainDevices=yes).
#   NNODES            nodes in the job (multi-node without a HOSTFILE, torchrun).
#   NODE_RANK         this node's index, 0 .. NNODES-1 (--no_ssh mode, torchrun).
#   HOSTFILE          DeepSpeed hostfile, one "HOSTNAME slots=N" line per node
#                     (see launch/hostfile.example). Without one, multi_node.sh
#                     writes a temporary one: from the Slurm node list inside a
#                     Slurm job, else NNODES lines of NPROC_PER_NODE slots.
#   LAUNCH_MODE       multi_node.sh: "ssh" (run once, on the first node; DeepSpeed
#                     reaches the others with pdsh over passwordless ssh) or
#                     "no_ssh" (run on every node with its NODE_RANK). Default:
#                     no_ssh when NODE_RANK is set, else ssh.
#
# Rendezvous
#   MASTER_ADDR       an address of node 0 that every node can reach
#                     (default 127.0.0.1, which only works on one node).
#   MASTER_PORT       a free TCP port on node 0 (default 29500; slurm/ derives
#                     one from the job id so that jobs sharing a node differ).
#
# Network for the collectives (set the one of your backend when nodes have
# several interfaces, or when the hostname resolves to a loopback address)
#   GLOO_SOCKET_IFNAME   interface gloo uses (CPU ranks), e.g. eth0
#   NCCL_SOCKET_IFNAME   interface NCCL uses for bootstrap/sockets, e.g. eth0
#   NCCL_IB_DISABLE      1 to keep NCCL off InfiniBand
#   NCCL_DEBUG           INFO to print NCCL's choice of transport
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  1 (default here): a failed collective
#                     ends the rank instead of hanging it
#
# Threads and caches
#   OMP_NUM_THREADS   threads per rank (default: this node's cores divided by
#                     NPROC_PER_NODE, at least 1)
#   REFLORA_DS_CACHE  tokenized data and converted models (default
#                     ~/.cache/reflora_ds). Node-local or shared both work:
#                     each node's first rank fills it, the others read it.
#   HF_HOME, HF_HUB_OFFLINE  as usual for Hugging Face; set HF_HUB_OFFLINE=1 on
#                     nodes without internet.
#   DS_ACCELERATOR    force DeepSpeed's accelerator ("cuda", "cpu", ...);
#                     by default it detects one.
#
# Launcher behaviour
#   LAUNCHER_ARGS     extra flags for the DeepSpeed launcher or torchrun, e.g.
#                     "--enable_each_rank_log logs" or "--bind_cores_to_rank"
#                     (the latter needs numactl)
#   FORWARD_ENV       ssh mode: variables copied to the other nodes (DeepSpeed
#                     itself forwards only NCCL*, PYTHON*, UCX*, MV2*); the
#                     default list covers the ones above
#   LAUNCH_DRY_RUN    1: print the launcher command instead of running it
#
# Stopping. SIGTERM to a launch script (or, under Slurm, to the job step) makes
# every rank save a checkpoint at the next optimizer step and exit; the script
# then exits with 143. Running the same command again resumes from that
# checkpoint. DeepSpeed's per-node launcher gives each rank 30 s after SIGTERM
# before it kills it; the trainer saves only the trainable (LoRA) state, which
# fits well within that.

REFLORA_DS_HOME=${REFLORA_DS_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REFLORA_DS_HOME/.venv/bin/python" ]; then
    PYTHON=$REFLORA_DS_HOME/.venv/bin/python
  else
    PYTHON=python3
  fi
fi

_visible_gpus() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(_visible_gpus)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE ))
  [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
FORWARD_ENV=${FORWARD_ENV:-"OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_DEBUG
  TORCH_NCCL_ASYNC_ERROR_HANDLING TOKENIZERS_PARALLELISM REFLORA_DS_CACHE HF_HOME HF_HUB_OFFLINE
  TRANSFORMERS_OFFLINE DS_ACCELERATOR PATH LD_LIBRARY_PATH"}
export REFLORA_DS_HOME PYTHON NPROC_PER_NODE MASTER_ADDR MASTER_PORT OMP_NUM_THREADS \
  TORCH_NCCL_ASYNC_ERROR_HANDLING TOKENIZERS_PARALLELISM
