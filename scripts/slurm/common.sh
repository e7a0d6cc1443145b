# Sourced by train.sbatch and sample_array.sbatch: what SLURM gave the job, and one srun step
# that forwards stop signals and requeues the job after its tasks ended (docs/cluster.md).

# Tasks per node: the first count of SLURM_TASKS_PER_NODE ("2(x3)": what srun starts here; with
# --ntasks, --ntasks-per-node is only a maximum), else --ntasks-per-node.
TASKS_PER_NODE=${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
TASKS_PER_NODE=${TASKS_PER_NODE%%(*}
TASKS_PER_NODE=${TASKS_PER_NODE%%,*}
# GPUs: what SLURM allocated (--gpus-per-node / --gres=gpu:N set SLURM_GPUS_ON_NODE, older
# setups only SLURM_JOB_GPUS). CUDA_VISIBLE_DEVICES is not counted: a value exported on the
# login node travels into the job (--export=ALL) without any GPU behind it.
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [ "${GPUS}" = 0 ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then
    GPUS=$(tr ',' '\n' <<<"${SLURM_JOB_GPUS}" | grep -c .)
fi
if [ "${GPUS}" -gt 0 ]; then ACCELERATOR=gpu; DEVICE=cuda; else ACCELERATOR=cpu; DEVICE=cpu; fi
if [ "${GPUS}" = 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != -1 ]; then
    echo "warning: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} but SLURM gave the job no GPUs: running on" \
        "the CPU (ask with --gpus-per-node, or pass --trainer.accelerator gpu / --device cuda)" >&2
fi
if [ "${GPUS}" -gt 0 ] && [ "${GPUS}" -ne "${TASKS_PER_NODE}" ]; then
    echo "warning: ${GPUS} GPUs but ${TASKS_PER_NODE} tasks per node: one task uses one GPU;" \
        "submit with --ntasks-per-node=${GPUS}" >&2
fi
# Threads and loader processes per task, from --cpus-per-task (srun of SLURM 22.05 does not
# inherit it by itself: SRUN_CPUS_PER_TASK).
CPUS=${SLURM_CPUS_PER_TASK:-1}
export SRUN_CPUS_PER_TASK=${CPUS} OMP_NUM_THREADS=${CPUS} MKL_NUM_THREADS=${CPUS}
WORKERS=$((CPUS > 1 ? CPUS - 1 : 0))
# Rendezvous of the tasks (Lightning reads the same variables; sample.py's ranks need them).
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" 2>/dev/null | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))

# The job runs `python train.py` / `python sample.py` in its working directory: the repository
# root, from which it was submitted (`sbatch --chdir` elsewhere would find neither).
if [ ! -f train.py ] || [ ! -f sample.py ]; then
    echo "error: sbatch --chdir ${PWD}: run the job from the repository root (train.py is not in ${PWD})" >&2
    exit 2
fi

# config_first USAGE ARGS...: the job's first argument is its config file, not an option (the
# command would read the option as the file's name).
config_first() {
    local usage=$1
    shift
    if [ $# -eq 0 ] || [[ "$1" == -* ]]; then
        echo "error: ${1:+the config file comes first, got $1; }usage: ${usage}" >&2
        return 1
    fi
}

# From here on a stop signal to this shell is kept for run_step (the default would end the job).
STOP_SIGNAL="" STOP_PENDING=""
trap 'STOP_SIGNAL=${STOP_SIGNAL:-USR1}; STOP_PENDING=1' USR1
trap 'STOP_SIGNAL=${STOP_SIGNAL:-TERM}; STOP_PENDING=1' TERM

# This job for scontrol: an array task is JOBID_TASK (the bare id of the array's last task
# names the whole array).
JOB_REF=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB_REF=${JOB_REF:-${SLURM_JOB_ID:-0}}

# run_step COMMAND...: srun COMMAND; SIGUSR1/SIGTERM sent to this shell are forwarded to it as
# SIGUSR1 (on SIGTERM srun would abort the step), once the tasks can take it: each task
# touches $ILVR_STOP_READY.<node>.<local rank> when its handler is in place (renamed ....done once
# finishing), and a signal that comes earlier (a task still imports) waits for every task of
# this node instead of killing one; tasks on other nodes are not seen (their own /tmp). A task
# that stopped on the signal leaves a note in $ILVR_REQUEUE_NOTE (rank 0, on this node); the
# job is then requeued here, after every task has ended. A task of this node that fails on a
# user's mistake notes "STATUS LINE" in $ILVR_STEP_ERRORS.<rank> (rank > 0 only there): see
# step_errors. The step's SLURM_JOB_NAME is never bash/interactive, names with which Lightning
# would not see the srun tasks as ranks (each would start a DDP group of its own).
run_step() {
    export ILVR_REQUEUE_NOTE="${TMPDIR:-/tmp}/ilvr-requeue-${SLURM_JOB_ID}"
    export ILVR_STOP_READY="${TMPDIR:-/tmp}/ilvr-ready-${SLURM_JOB_ID}"
    export ILVR_STEP_ERRORS="${TMPDIR:-/tmp}/ilvr-errors-${SLURM_JOB_ID}"
    rm -f "${ILVR_REQUEUE_NOTE}" "${ILVR_STOP_READY}".* "${ILVR_STEP_ERRORS}".*  # an earlier run's (requeue: the same job id)
    local name=${SLURM_JOB_NAME:-step}
    [[ "${name}" =~ ^(bash|interactive)$ ]] && name=ilvr-${name}
    srun --kill-on-bad-exit=1 --job-name="${name}" "$@" &
    local step=$! status=0
    while :; do
        if [ -n "${STOP_PENDING}" ] && all_ready; then
            kill -USR1 "${step}" 2>/dev/null
            STOP_PENDING=""
        elif [ "${STOP_PENDING}" = 1 ] && compgen -G "${ILVR_STOP_READY}.*.done" >/dev/null; then
            echo "got SIG${STOP_SIGNAL} while ${1} ${2:-} finishes; not passed on (it ends by itself)"
            STOP_PENDING=2
        elif [ "${STOP_PENDING}" = 1 ]; then
            echo "got SIG${STOP_SIGNAL} while ${1} ${2:-} starts; passing it on once it can save"
            STOP_PENDING=2
        fi
        if [ -n "${STOP_PENDING}" ]; then
            sleep 1
            kill -0 "${step}" 2>/dev/null && continue
        fi
        wait "${step}"
        status=$?
        kill -0 "${step}" 2>/dev/null || break  # else a trapped signal interrupted wait
    done
    if [ "${status}" -gt 128 ]; then  # the step may have ended just after a signal cut wait short
        wait "${step}" 2>/dev/null
        local again=$?
        [ "${again}" -ne 127 ] && status=${again}
    fi
    trap - USR1 TERM
    rm -f "${ILVR_STOP_READY}".*
    requeue_after "$(step_errors "${status}")" "${STOP_SIGNAL}"
}

# step_errors STATUS: the lowest status the tasks noted in $ILVR_STEP_ERRORS.* (a task that
# --kill-on-bad-exit stopped is not the cause: its 143 would hide the mistake's 2), else
# STATUS; prints the lines of ranks > 0 that rank 0 did not print (the same mistake, once).
step_errors() {
    if [ "$1" -eq 0 ] || ! compgen -G "${ILVR_STEP_ERRORS}.*" >/dev/null; then
        echo "$1"
        return
    fi
    cut -d' ' -f2- "${ILVR_STEP_ERRORS}".* | sort -u \
        | grep -vxF -f <(cut -d' ' -f2- "${ILVR_STEP_ERRORS}.0" 2>/dev/null) >&2
    cut -d' ' -f1 "${ILVR_STEP_ERRORS}".* | sort -n | head -n 1
    rm -f "${ILVR_STEP_ERRORS}".*
}

# all_ready: every task of the step on this node (SLURM_LOCALID 0 .. TASKS_PER_NODE-1) has
# touched its ready file.
all_ready() {
    local rank
    for ((rank = 0; rank < TASKS_PER_NODE; rank++)); do
        [ -e "${ILVR_STOP_READY}.${SLURMD_NODENAME:-node}.${rank}" ] || return 1
    done
}

# requeue_after STATUS SIGNAL: requeue the job if its task left a note, else exit STATUS. A job
# that SLURM itself requeued (scontrol requeue, pre-emption: its Restarts count went up) is said to be.
requeue_after() {
    local note info state restarts requeued=""
    info=$(scontrol show job -o "${JOB_REF}" 2>/dev/null)
    state=$(grep -o 'JobState=[A-Z_]*' <<<"${info}")
    restarts=$(grep -o 'Restarts=[0-9]*' <<<"${info}")
    [ "${restarts#Restarts=}" -gt "${SLURM_RESTART_COUNT:-0}" ] 2>/dev/null && requeued=1
    if [ ! -s "${ILVR_REQUEUE_NOTE}" ]; then
        if [ -n "$2" ] && [ "$1" -ne 0 ] && [ -n "${requeued}" ]; then
            echo "exit status $1 after SIG$2, nothing saved; requeued by SLURM: it resumes from the last checkpoint"
        elif [ -n "$2" ] && [ "$1" -ne 0 ]; then
            echo "exit status $1 after SIG$2, nothing saved; not requeued: submit the same command again to resume"
        fi
        exit "$1"
    fi
    note=$(cat "${ILVR_REQUEUE_NOTE}")
    rm -f "${ILVR_REQUEUE_NOTE}"
    if [ -n "${requeued}" ]; then
        echo "${note}; requeued by SLURM (scontrol requeue or pre-emption)"
        exit 0
    fi
    if [ "${state}" != JobState=RUNNING ]; then  # `scancel JOBID`: cancelled, not pre-empted
        echo "${note}; not requeued (${state})"
        exit 0
    fi
    trap '' TERM  # the requeue ends this job: its SIGTERM must not cut the next line
    if ! scontrol requeue "${JOB_REF}" 2>&1; then  # e.g. submitted with --no-requeue
        echo "${note}; error: scontrol requeue ${JOB_REF} failed (see above); submit the same command again to resume"
        exit 1
    fi
    echo "${note}; requeued"
    exit 0
}
