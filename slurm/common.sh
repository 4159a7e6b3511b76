# Sourced by every job script: the environment, the run folder, DDP variables,
# and the checkpoint-and-requeue protocol. Submit jobs with slurm/submit.

set -euo pipefail
: "${PLANKTONIO_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
export PLANKTONIO_ROOT
# shellcheck source=site.env
source "${PLANKTONIO_SITE:-$PLANKTONIO_ROOT/slurm/site.env}"
cd "$PLANKTONIO_ROOT"

if [ -n "$PLANKTONIO_MODULES" ]; then
    # shellcheck disable=SC2086
    module load $PLANKTONIO_MODULES
fi
if [ ! -x "$PLANKTONIO_VENV/bin/python" ]; then
    echo "planktonio: no Python environment at $PLANKTONIO_VENV (run 'make venv' on a login node)" >&2
    exit 2
fi
# shellcheck disable=SC1091
source "$PLANKTONIO_VENV/bin/activate"
export PYTHONUNBUFFERED=1
# One thread pool per process, sized to the CPUs Slurm gave each task.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# The run folder: runs/<job id>, stable across requeues (the job id stays).
# RUN=<name> at submission picks another name, e.g. to resume a run by hand.
RUN_DIR="$PLANKTONIO_RUNS/${RUN:-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}"
mkdir -p "$RUN_DIR"
echo "planktonio: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}, run $RUN_DIR"

# What the job runs on, at the top of its log (and in $RUN_DIR/doctor-<job id>.json):
# versions, CUDA builds, GPUs, CPUs, NCCL, on the job's first node. A stack that
# cannot work here (a GPU torch has no kernels for, torch and DALI built for
# different CUDA versions) stops the job now, with the reason, not at the first
# kernel launch. A job given GPUs also stops when torch sees none, unless
# PLANKTONIO_REQUIRE_GPU=0 (site.env).
doctor_args=(--json "$RUN_DIR/doctor-$SLURM_JOB_ID.json")
if [ -n "${SLURM_JOB_GPUS:-${SLURM_GPUS_ON_NODE:-}}" ] && [ "${PLANKTONIO_REQUIRE_GPU:-1}" = 1 ]; then
    doctor_args+=(--require-gpu)
fi
if ! python -m planktonio doctor "${doctor_args[@]}"; then
    echo "planktonio: job $SLURM_JOB_ID stopped: this environment cannot run here (the doctor's verdict above)" >&2
    exit 1
fi

ddp_environment() {
    # torch.distributed's env:// rendezvous on the job's first node; each srun
    # task reads its rank from SLURM_PROCID (train/distributed.py).
    local first
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    # The node's address as Slurm knows it (NodeAddr), which need not be its name.
    MASTER_ADDR="$(scontrol show node "$first" --oneliner | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
    MASTER_ADDR="${MASTER_ADDR:-$first}"
    MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
    export MASTER_ADDR MASTER_PORT
}

EXIT_INTERRUPTED=75  # train/signals.py: stopped by SIGUSR1/SIGTERM, last.pt written

run_training() {
    # srun so that Slurm's --signal reaches the Python processes; --resume
    # makes a requeued (or resubmitted) job continue from last.pt.
    local status=0
    srun --kill-on-bad-exit=1 python -m train fit --config "$PLANKTONIO_CONFIG" --data "$PLANKTONIO_DATA" \
        --out "$RUN_DIR" --resume "$@" || status=$?
    if [ "$status" -eq "$EXIT_INTERRUPTED" ]; then
        if [ "${PLANKTONIO_REQUEUE:-1}" = 1 ]; then
            echo "planktonio: checkpoint written; requeueing job $SLURM_JOB_ID to resume"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "planktonio: checkpoint written; resubmit with RUN=$(basename "$RUN_DIR") to resume"
    fi
    return "$status"
}
