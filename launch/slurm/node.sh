#!/bin/bash
# One node of a multi-node run: DeepSpeed's launcher for this node's ranks (no ssh: every node
# starts its own), with the stop signals passed on to the ranks. train.sbatch runs it once per
# node through srun; any other scheduler can too, given the same environment:
#
#   SLURM_NODEID         this node's index in TSLD_NODES (its node rank)
#   TSLD_NODES           every node's name, space-separated, in node-rank order
#   MASTER_ADDR/PORT     node 0's address and a free port on it
#   SLURM_GPUS_ON_NODE   ranks on each node (one per GPU); TSLD_PROCS_PER_NODE overrides it
#                        (CPU ranks, tests)
#   PYTHON               the interpreter with tsld-ds installed (default: python)
#
# Arguments: launch/train.py's options.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
read -r -a nodes <<< "$TSLD_NODES"
node_rank=$SLURM_NODEID
procs=${TSLD_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z $procs ]]; then
  echo "node.sh: no GPUs on ${nodes[$node_rank]}: submit with --gpus-per-node=N" \
       "(or set TSLD_PROCS_PER_NODE for CPU ranks)" >&2
  exit 2
fi

# DeepSpeed's launcher sets each rank's CUDA_VISIBLE_DEVICES from the hostfile's slot numbers,
# 0..N-1 unless --include names others: pass on the GPUs SLURM granted (say 4-7 of a shared node).
hostfile=$(mktemp)
trap 'rm -f "$hostfile"' EXIT
include=()
slots_here=$procs
if [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  slots_here=$(( $(tr , '\n' <<< "$CUDA_VISIBLE_DEVICES" | sort -n | tail -n 1) + 1 ))
  spec=()
  for node in "${nodes[@]}"; do
    if [[ $node == "${nodes[$node_rank]}" ]]; then spec+=("$node:$CUDA_VISIBLE_DEVICES")
    else spec+=("$node"); fi
  done
  include=(--include "$(IFS=@; echo "${spec[*]}")")
fi
for node in "${nodes[@]}"; do
  if [[ $node == "${nodes[$node_rank]}" ]]; then echo "$node slots=$slots_here"
  else echo "$node slots=$procs"; fi
done > "$hostfile"

# The launcher runs in a process group of its own with SIGUSR1 ignored (inherited across exec;
# the ranks install their own handler): one kill of the group then reaches every rank of this
# node, and the launcher, which would die of SIGUSR1, survives it.
( trap '' USR1
  exec setsid "${PYTHON:-python}" -m deepspeed.launcher.runner --hostfile "$hostfile" \
    "${include[@]}" --no_ssh --node_rank "$node_rank" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" "$repo/launch/train.py" "$@" ) &
launcher=$!

# SLURM's notice before the time limit (USR1) and preemption or scancel (TERM) both reach the
# ranks as USR1: finish the step, save a checkpoint, exit 75. (Passed on as TERM, DeepSpeed's
# launcher would kill the ranks 30 s later, checkpoint written or not.)
trap 'kill -USR1 -- "-$launcher" 2> /dev/null || true' USR1 TERM
# A trapped signal interrupts `wait`; wait again until the launcher has exited, then take its status.
while kill -0 "$launcher" 2> /dev/null; do wait "$launcher" || true; done
status=0
wait "$launcher" || status=$?
# launch/train.py exits 75 when it stopped on a signal with a checkpoint (tsld_ds/errors.py). To
# srun that is a failing task, and --kill-on-bad-exit would kill the other nodes' tasks while they
# finish the same clean exit; a stopped run is a task that succeeded: train.sbatch tells it from a
# completed one by OUTPUT_DIR/summary.json.
if (( status == 75 )); then status=0; fi
exit "$status"
