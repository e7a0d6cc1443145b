#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (CI and local testing of scripts/slurm).
#
#   sudo .ci/slurm_up.sh          # as root: installs slurm-wlm + munge if missing, starts
#                                 # munged, slurmctld and slurmd, waits for the node to be idle
#
# One CPU partition "cpu" (the default) with this machine as its only node (CPUs = nproc),
# no GPUs, no cgroups (proctrack/linuxproc, task/none), requeue allowed. The cluster's state
# lives in $SLURM_CI_DIR (default /tmp/slurm-ci); running the script again restarts nothing
# that is already up. cred_expire=10 makes a requeued job eligible again after ~11 s (SLURM's
# default 120 s holds it ~121 s; see docs/cluster.md).
set -euo pipefail
STATE=${SLURM_CI_DIR:-/tmp/slurm-ci}
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "slurm_up: cluster already up"; exit 0
fi
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half of the RAM
mkdir -p "$STATE"/{ctld,d,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
MinJobAge=600
KillWait=10
ReturnToService=2
MpiDefault=none
NodeName=${HOST} CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=cpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "slurm_up: node ${HOST} idle (${CPUS} CPUs, ${MEM_MB} MB) in partition cpu"; exit 0
    fi
    sleep 1
done
echo "slurm_up: the node did not become idle; logs in ${STATE}/log" >&2
sinfo >&2 || true; tail -20 "${STATE}/log/slurmctld.log" "${STATE}/log/slurmd.log" >&2 || true
exit 1
