#!/bin/bash
# A one-node SLURM cluster on this machine, for testing launch/slurm/train.sbatch: installs munge
# and SLURM from Debian if missing, writes a private configuration under $TSLD_SLURM_DIR (nothing
# in /etc is changed), starts munged, slurmctld and slurmd, and waits until the node is idle.
# Needs root (the daemons run as root). Idempotent: a second run restarts the daemons.
#
#   tests/slurm/setup.sh             # then: . /tmp/tsld-slurm/env.sh; sinfo; sbatch ...
#   tests/slurm/stop.sh              # stops the three daemons again
#
# Environment: TSLD_SLURM_DIR (default /tmp/tsld-slurm), TSLD_SLURM_CPUS (the node's CPUs,
# default 2), TSLD_SLURM_PORT (slurmctld's port, default 6817; slurmd takes the next one),
# TSLD_SLURM_TASK_PLUGIN (default task/none; task/affinity binds tasks to their CPUs),
# TSLD_SLURM_NODE (the node's name, default localhost).
# Exit status: 0 up, 1 failed to start, 2 cannot run here (not root, no apt-get), 3 apt-get failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${TSLD_SLURM_DIR:-/tmp/tsld-slurm}
cpus=${TSLD_SLURM_CPUS:-2}
port=${TSLD_SLURM_PORT:-6817}
# The node's name: the job's node list, and so train.sbatch's MASTER_ADDR (localhost resolves
# everywhere; slurmd is told its name with -N).
node=${TSLD_SLURM_NODE:-localhost}

if (( EUID != 0 )); then
  echo "setup.sh: needs root (slurmd and munged run as root here)" >&2
  exit 2
fi

packages=(munge slurmctld slurmd slurm-client)
missing=()
for package in "${packages[@]}"; do
  [[ $(dpkg-query -W -f '${Status}' "$package" 2> /dev/null) == "install ok installed" ]] ||
    missing+=("$package")
done
if (( ${#missing[@]} == 0 )); then
  echo "setup.sh: ${packages[*]} already installed"
elif ! command -v apt-get > /dev/null; then
  echo "setup.sh: ${missing[*]} missing and no apt-get to install them" >&2
  exit 2
else
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=${TMPDIR:-/tmp}/tsld-slurm-apt.log
  # The packages' scripts would start the daemons with Debian's configuration: forbid it for the
  # install, as container images do (policy-rc.d exit 101), unless the image already has a policy.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
       } > "$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    echo "setup.sh: apt-get could not install ${missing[*]} (log: $apt_log)" >&2
    exit 3
  fi
fi

# Restart cleanly: daemons of an earlier run of this script (found by their pid files) first.
"$here/stop.sh" > /dev/null 2>&1 || true

mkdir -p "$dir"/{munge,state,spool,log,etc}
chmod 700 "$dir/munge"
# munged refuses keys and sockets in directories others can write to (/tmp, sticky, it allows).
if [[ ! -s $dir/munge/munge.key ]]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$dir/munge/munge.key"
munge_socket=$dir/munge/munge.socket
munged --force --key-file="$dir/munge/munge.key" --socket="$munge_socket" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
  --seed-file="$dir/munge/munged.seed"

cat > "$dir/etc/slurm.conf" << EOF
# Written by tests/slurm/setup.sh: one local node, no cgroups, no accounting.
ClusterName=tsld-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$munge_socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# linuxproc tracks a step's processes by parentage, as cgroups would on a cluster: setsid'd
# children (node.sh's launcher) stay in the step and get its signals.
ProctrackType=proctrack/linuxproc
TaskPlugin=${TSLD_SLURM_TASK_PLUGIN:-task/none}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Pending jobs (a requeued one whose begin time has come) are considered every 2 s, not 60/30 s.
SchedulerParameters=sched_interval=2,bf_interval=2
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
# sbatch --wait polls every 8 s when MinJobAge <= 17 (every 32 s otherwise); finished jobs stay
# visible to scontrol for at least this long.
MinJobAge=17
SlurmctldTimeout=30
SlurmdTimeout=60
# Jobs in partition urgent preempt jobs in partition test: SLURM signals them (SIGTERM, SIGKILL
# KillWait s later) and requeues them, as a cluster's preemption does.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$node MaxTime=INFINITE State=UP PriorityTier=2
EOF
# An empty plugin stack: otherwise /etc/slurm's would be read.
: > "$dir/etc/plugstack.conf"
echo "PlugStackConfig=$dir/etc/plugstack.conf" >> "$dir/etc/slurm.conf"

cat > "$dir/env.sh" << EOF
export SLURM_CONF=$dir/etc/slurm.conf
EOF
export SLURM_CONF=$dir/etc/slurm.conf

# -c: a clean start (no jobs or node state from an earlier run of this script).
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$node"

deadline=$((SECONDS + 60))
until [[ $(sinfo -h -n "$node" -o %T 2> /dev/null) == idle ]]; do
  if (( SECONDS > deadline )); then
    echo "setup.sh: node $node not idle within 60 s:" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$dir"/log/*.log >&2 || true
    exit 1
  fi
  sleep 0.5
done
echo "setup.sh: SLURM up (config $SLURM_CONF)"
sinfo -N -o '%N %P %T %c'
