#!/bin/bash
# Stops the daemons tests/slurm/setup.sh started (by their pid files under $TSLD_SLURM_DIR, never
# by name), waiting up to 30 s for each to exit; jobs still on that cluster are cancelled first.
set -uo pipefail

dir=${TSLD_SLURM_DIR:-/tmp/tsld-slurm}
stopped=0
alive() {  # PID_FILE NAME: the pid in PID_FILE, if that process is NAME
  local pid
  [[ -s $1 ]] && pid=$(< "$1") && [[ $pid =~ ^[0-9]+$ ]] &&
    [[ $(cat "/proc/$pid/comm" 2> /dev/null) == "$2" ]] && echo "$pid"
}

# Jobs still running on this private cluster first: their steps would outlive slurmd.
export SLURM_CONF=$dir/etc/slurm.conf
jobs=()
if [[ -n $(alive "$dir/slurmctld.pid" slurmctld) ]]; then
  mapfile -t jobs < <(squeue -h -o %i 2> /dev/null)
fi
if (( ${#jobs[@]} )); then
  echo "stop.sh: cancelling jobs ${jobs[*]}"
  scancel "${jobs[@]}"
  for _ in $(seq 60); do
    [[ -z $(squeue -h -o %i 2> /dev/null) ]] && break
    sleep 1
  done
fi
for pid_file in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
  name=$(basename "$pid_file" .pid)
  # Only the daemon that wrote this file: a reused pid that is something else stays untouched.
  if pid=$(alive "$pid_file" "$name"); then
    kill -TERM "$pid" 2> /dev/null
    for _ in $(seq 300); do
      kill -0 "$pid" 2> /dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2> /dev/null; then
      echo "stop.sh: $name ($pid) did not exit on TERM; killing it" >&2
      kill -KILL "$pid" 2> /dev/null
    fi
    stopped=$((stopped + 1))
  fi
  rm -f "$pid_file"
done
echo "stop.sh: stopped $stopped daemon(s) under $dir"
