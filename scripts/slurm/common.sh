# Sourced by train.sbatch and sample_array.sbatch: what SLURM gave the job, and one srun step
# that forwards stop signals and requeues the job after its tasks ended (docs/cluster.md).

# Tasks per node: --ntasks-per-node, else the first count of SLURM_TASKS_PER_NODE ("2(x3)").
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
TASKS_PER_NODE=${TASKS_PER_NODE%%(*}
TASKS_PER_NODE=${TASKS_PER_NODE%%,*}
# GPUs: --gpus-per-node / --gres=gpu:N set SLURM_GPUS_ON_NODE; otherwise count CUDA_VISIBLE_DEVICES.
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [ "${GPUS}" = 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    GPUS=$(tr ',' '\n' <<<"${CUDA_VISIBLE_DEVICES}" | grep -c .)
fi
if [ "${GPUS}" -gt 0 ]; then ACCELERATOR=gpu; DEVICE=cuda; else ACCELERATOR=cpu; DEVICE=cpu; fi
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

# run_step COMMAND...: srun COMMAND; SIGUSR1/SIGTERM sent to this shell are forwarded to it.
# A task that stopped on such a signal leaves a note in $ILVR_REQUEUE_NOTE (rank 0, which runs
# on this node); then the job is requeued here, after every task has ended.
run_step() {
    export ILVR_REQUEUE_NOTE="${TMPDIR:-/tmp}/ilvr-requeue-${SLURM_JOB_ID}"
    rm -f "${ILVR_REQUEUE_NOTE}"
    srun --kill-on-bad-exit=1 "$@" &
    local step=$! status
    # forwarded as USR1 (same meaning to the tasks): on SIGTERM srun would abort the step
    trap 'kill -USR1 "${step}" 2>/dev/null' USR1 TERM
    wait "${step}"
    status=$?
    while kill -0 "${step}" 2>/dev/null; do  # a trapped signal interrupted wait
        wait "${step}"
        status=$?
    done
    trap - USR1 TERM
    if [ -s "${ILVR_REQUEUE_NOTE}" ]; then
        local note state
        note=$(cat "${ILVR_REQUEUE_NOTE}")
        rm -f "${ILVR_REQUEUE_NOTE}"
        state=$(scontrol show job -o "${SLURM_JOB_ID}" | grep -o 'JobState=[A-Z_]*')
        if [ "${state}" != JobState=RUNNING ]; then  # `scancel JOBID`: cancelled, not pre-empted
            echo "${note}; not requeued (${state})"
            exit 0
        fi
        echo "${note}; requeued"
        if ! scontrol requeue "${SLURM_JOB_ID}"; then
            echo "error: scontrol requeue ${SLURM_JOB_ID} failed; submit the same command again to resume" >&2
            exit 1
        fi
        exit 0
    fi
    exit "${status}"
}
