# shellcheck shell=bash source-path=SCRIPTDIR
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

# Exit codes of `python -m train fit` (train/signals.py) that this script acts on.
EXIT_USAGE=2         # bad config, data or weights: a restart would fail the same way
EXIT_NON_FINITE=3    # the loss or the weights became NaN or infinite: likewise
EXIT_DISK=74         # a file could not be written (a full disk, a quota, read-only): likewise
EXIT_INTERRUPTED=75  # stopped by SIGUSR1/SIGTERM (last.pt written if there was anything to keep): requeue
EXIT_PEER_LOST=76    # another rank left or hung during a collective: restart from last.pt

# The Python module each task runs: train. (The tests run tests.fit_with_hooks,
# which is train with fault hooks, through this variable.)
: "${PLANKTONIO_TRAIN_MODULE:=train}"

checkpoint_position() {
    # Where last.pt stands ("epoch E, step S"), from the last.json rank 0 writes
    # beside it at every checkpoint; nothing when no checkpoint was written yet.
    [ -f "$RUN_DIR/last.json" ] || return 0
    python -c 'import json, sys; print("epoch %(epoch)s, step %(step)s" % json.load(open(sys.argv[1])))' \
        "$RUN_DIR/last.json"
}

describe_failure() {
    # Who failed, where and how, from a step's output ($1) and srun's exit
    # status ($2), e.g. "rank 1 on node2 left during a training step (the
    # gradients' all-reduce) at epoch 2, step 1 (srun: Killed)". srun reports
    # each task that did not exit 0 ("srun: error: node2: task 1: Killed"); the
    # ranks that exited with EXIT_PEER_LOST only saw another go, so they are
    # named only when no other is. Where: as a surviving rank said it. Across
    # nodes NCCL's watchdog often sees a dead peer before the peer watch does
    # and aborts its rank (exit 134, SIGABRT) after saying the remote peer is
    # gone: such a rank, too, only saw another go.
    local remote=0
    if grep -q -E 'remote process exited|NCCL communicator was aborted|ncclRemoteError' "$1"; then remote=1; fi
    awk -v peer_lost="$EXIT_PEER_LOST" -v status="$2" -v remote="$remote" '
        BEGIN { FS = ": " }
        $1 == "srun" && $2 == "error" && $4 ~ /^tasks? [0-9,-]+$/ {
            ranks = $4; sub(/^task/, "rank", ranks)
            how = $5; for (i = 6; i <= NF; i++) how = how ": " $i
            aborted = how == "Exited with exit code 134" || how ~ /^Aborted/
            if (how == "Exited with exit code " peer_lost || (remote && aborted)) {
                lost = lost sep_lost ranks " on " $3; sep_lost = ", "
            }
            else { failed = failed sep ranks " on " $3; hows = hows sep how; sep = ", " }
        }
        where == "" && /^rank [0-9]+ on / && match($0, /(left|stopped answering) during .* at epoch [0-9]+, step [0-9]+/) {
            where = substr($0, RSTART, RLENGTH)
        }
        END {
            if (failed == "" && lost != "") { failed = lost; hows = "exit " peer_lost ", a peer lost" }
            if (failed == "") { failed = "the training step"; hows = "exit " status }
            print failed " " (where != "" ? where : "failed") " (srun: " hows ")"
        }' "$1"
}

run_training() {
    # srun so that Slurm's --signal reaches the Python processes; --resume
    # makes a requeued, resubmitted or restarted step continue from last.pt.
    #
    # A step that fails once last.pt exists (a rank killed: the OOM killer, a
    # GPU's ECC error; a rank hung past training.collective_timeout_s) is
    # started again within this allocation, as a new srun step, up to
    # PLANKTONIO_MAX_RESTARTS times: a lost rank costs the work since the last
    # checkpoint and a restart, not the job. It is not started again when there
    # is nothing to resume from, when the checkpoint did not move since the last
    # restart (the same failure again), or when the failure is the input's
    # (exit 2) or the run's divergence (exit 3): those would fail the same way.
    local status restarts=0 resumed_from="" position failure output
    case "$PLANKTONIO_MAX_RESTARTS" in
        "" | *[!0-9]*)
            echo "planktonio: PLANKTONIO_MAX_RESTARTS must be a whole number (0 for no restarts), not '$PLANKTONIO_MAX_RESTARTS'" >&2
            exit "$EXIT_USAGE" ;;
    esac
    output="$(mktemp "${TMPDIR:-/tmp}/planktonio-step.XXXXXX")"
    # The name is read when the trap runs, from a global (a local is gone by then), and never evaluated as
    # shell text: a TMPDIR with a quote or $(...) in it stays a name.
    PLANKTONIO_STEP_OUTPUT="$output"
    trap 'rm -f -- "$PLANKTONIO_STEP_OUTPUT"' EXIT
    while true; do
        # --kill-on-bad-exit=0: a rank that dies does not take the others with it
        # at once (srun would stop forwarding their output, and the line saying
        # which peer left and where would be lost); they see it at their next
        # collective and exit with EXIT_PEER_LOST. --wait: 30 s after the first
        # task ended, srun ends what is left (a hung rank; a rank that failed on
        # its own while the others wait in a collective).
        if srun --kill-on-bad-exit=0 --wait=30 python -m "$PLANKTONIO_TRAIN_MODULE" fit \
            --config "$PLANKTONIO_CONFIG" --data "$PLANKTONIO_DATA" --out "$RUN_DIR" --resume "$@" \
            2>&1 | tee "$output"; then
            return 0
        fi
        status=${PIPESTATUS[0]}
        case "$status" in
            "$EXIT_INTERRUPTED")
                if [ "${PLANKTONIO_REQUEUE:-1}" = 1 ]; then
                    echo "planktonio: stopped by a signal; requeueing job $SLURM_JOB_ID to resume"
                    scontrol requeue "$SLURM_JOB_ID"
                    exit 0
                fi
                echo "planktonio: stopped by a signal; resubmit with RUN=$(basename "$RUN_DIR") to resume"
                return "$status" ;;
            "$EXIT_USAGE" | "$EXIT_NON_FINITE" | "$EXIT_DISK")
                return "$status" ;;
        esac
        failure="$(describe_failure "$output" "$status")"
        position="$(checkpoint_position)"
        if [ -z "$position" ]; then
            echo "planktonio: not restarting: $failure before the first checkpoint: no last.pt to resume from" >&2
            return "$status"
        fi
        if [ "$position" = "$resumed_from" ]; then
            echo "planktonio: not restarting: $failure, again before getting past $position, where restart" \
                 "$restarts resumed: a failure that repeats" >&2
            return "$status"
        fi
        if [ "$restarts" -ge "$PLANKTONIO_MAX_RESTARTS" ]; then
            echo "planktonio: not restarting: $failure after $restarts restart(s) (PLANKTONIO_MAX_RESTARTS);" \
                 "last.pt is at $position: resubmit with RUN=$(basename "$RUN_DIR") to continue" >&2
            return "$status"
        fi
        restarts=$((restarts + 1))
        resumed_from=$position
        echo "planktonio: restart $restarts of $PLANKTONIO_MAX_RESTARTS: $failure; resuming from last.pt at $position"
        # A new rendezvous port: the failed step's may still be held (TIME_WAIT, a rank being killed).
        if [ -n "${MASTER_PORT:-}" ]; then
            MASTER_PORT=$((MASTER_PORT + 1))
        fi
    done
}
