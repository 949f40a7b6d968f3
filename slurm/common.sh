# shellcheck shell=bash
# Shared by the batch scripts in slurm/ (sourced after they cd into the
# repository; Slurm runs a copy of the batch script, so it cannot find this
# file next to itself).

log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_NAME:-job} $SLURM_JOB_ID] $*"; }

# master_addr: the address of the job's first node, which hosts rank 0.
# The first node is `scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1`;
# its address is Slurm's NodeAddr for it, which is the hostname itself on most
# clusters (and an IP where node names do not resolve).
master_addr() {
  local head addr
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  addr=$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)
  echo "${addr:-$head}"
}

job_state() {
  scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n1
}

# run_step_requeueable SRUN_ARGS...: run one job step that checkpoints on SIGTERM.
#
# A SIGTERM to this batch shell (#SBATCH --signal=B:TERM@N before the time
# limit, or `scancel --batch --signal=TERM JOBID`) is forwarded to every
# process of the job's steps with `scancel --signal=TERM`; the trainer then
# saves a checkpoint at the next optimizer step and exits with 143. When the
# step ends that way (or the step itself was sent SIGTERM, e.g. `scancel
# --signal=TERM JOBID`), and the job is still running (not cancelled), the job
# is requeued: it starts again from the top, and the trainer resumes from the
# newest complete checkpoint in its output_dir. Returns the step's exit status
# otherwise.
run_step_requeueable() {
  local rc term=0 srun_pid
  trap 'term=1; log "SIGTERM: asking the ranks to checkpoint and stop"; scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || log "(the job is already ending)"' TERM
  srun "$@" &
  srun_pid=$!
  while :; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  trap - TERM
  if [ "$term" = 1 ] || [ "$rc" -eq 143 ]; then
    local state
    state=$(job_state)
    if [ "$state" = RUNNING ] && [ "${REFLORA_NO_REQUEUE:-0}" != 1 ]; then
      log "stopped at a checkpoint (step exit $rc); requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
      scontrol requeue "$SLURM_JOB_ID" && exit 0
      log "requeue failed: resubmit this job to resume from the checkpoint"
    else
      log "stopped at a checkpoint (step exit $rc); job state $state, not requeueing"
    fi
    return 143
  fi
  return "$rc"
}
