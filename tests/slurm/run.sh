#!/bin/bash
# launch/slurm/train.sbatch under a real (one-node, local) SLURM: tests/slurm/setup.sh starts it,
# then jobs train the tiny LLaMA of tests/conftest.py on 2 CPU ranks (TSLD_PROCS_PER_NODE=2),
# submitted from the repository root as a user would:
#
#   plain      `sbatch --wait`: exit 0; the output file names the job, node and master; the run
#              is complete (summary.json, a checkpoint of the last step, every step's loss logged)
#              and was not requeued.
#   usr1       `scancel --signal=USR1` once step 3 is logged (what --signal=USR1@120 sends before
#              the time limit): the ranks checkpoint and exit 75 (node.sh: success), train.sbatch requeues the job,
#              the restart resumes with --resume latest and completes.
#   preempt    a job in a higher-priority partition preempts the run once step 3 is logged: SLURM
#              sends SIGTERM (SIGKILL KillWait=30 s later) and requeues the job itself; the ranks
#              checkpoint in time, the restart resumes with --resume latest and completes.
#   timelimit  (not run by default) a long run whose time limit is cut, once step 3 is logged, to
#              end in 1-2 min: SLURM's own SIGUSR1 (the script's #SBATCH --signal=USR1@120) stops
#              it with a checkpoint, train.sbatch requeues it, the restart resumes; then `scancel`
#              (SIGTERM) stops the restart, with a checkpoint of its last step.
#
# For usr1 and preempt, `sbatch --wait` returns 0 only once the restart has completed, SLURM
# counts Restarts=1, each step's loss is logged once and equals that of an uninterrupted run of
# the same options: TSLD_SLURM_REFERENCE's, else plain's when it ran first. Then the daemons are
# stopped. Needs root; installs munge and SLURM from Debian if missing.
#
#   tests/slurm/run.sh [plain|usr1|preempt|timelimit]...     # default: plain usr1 preempt
#
# Environment: PYTHON (default: the checkout's .venv, else python3); TSLD_SLURM_WORK (a directory
# for the runs and job outputs; default: a new one under /tmp, kept); TSLD_SLURM_FIXTURES (a
# directory with tiny-llama/, corpus/ and ds.json as tests/slurm/make_fixtures.py writes them;
# default: made in the work directory); TSLD_SLURM_STEPS (default 60: steps take 0.1-0.3 s, and a
# stop signalled after step 3 must arrive before the last); TSLD_SLURM_REFERENCE (the output
# directory of an uninterrupted run of the jobs' options, to compare losses with; tests/conftest.py's
# gt_reference_args makes one); TSLD_SLURM_KEEP=1 (leave the daemons
# running); setup.sh's TSLD_SLURM_DIR, TSLD_SLURM_CPUS, TSLD_SLURM_PORT, TSLD_SLURM_NODE. The jobs
# get this environment (sbatch --export=ALL), TORCH_EXTENSIONS_DIR included.
# Exit status: 0 all passed, 1 a check failed, 2 cannot run here, 3 apt-get failed (setup.sh's).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
export TSLD_SLURM_DIR=${TSLD_SLURM_DIR:-/tmp/tsld-slurm}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
steps=${TSLD_SLURM_STEPS:-60}
cases=("$@")
(( ${#cases[@]} )) || cases=(plain usr1 preempt)
for case in "${cases[@]}"; do
  [[ $case =~ ^(plain|usr1|preempt|timelimit)$ ]] ||
    { echo "run.sh: unknown case $case" >&2; exit 2; }
done
work=${TSLD_SLURM_WORK:-$(mktemp -d /tmp/tsld-slurm-test.XXXXXX)}
mkdir -p "$work"

t0=$SECONDS
say() { printf '[run.sh %4ds] %s\n' $((SECONDS - t0)) "$*"; }
fail() {
  say "FAIL: $*"
  for out in "$work"/*.out; do [[ -f $out ]] && { echo "--- $out (tail)"; tail -n 40 "$out"; }; done
  exit 1
}
background=()
cleanup() {
  for pid in "${background[@]}"; do kill "$pid" 2> /dev/null || true; done
  if [[ ${TSLD_SLURM_KEEP:-0} != 1 ]]; then "$here/stop.sh" || true; fi
}
trap cleanup EXIT

"$here/setup.sh"
# shellcheck disable=SC1091
. "$TSLD_SLURM_DIR/env.sh"
node=$(sinfo -h -o %N | head -n 1)
say "SLURM up: node $node"

fixtures=${TSLD_SLURM_FIXTURES:-$work/fixtures}
if [[ ! -f $fixtures/ds.json ]]; then
  (cd "$repo" && "$PYTHON" "$here/make_fixtures.py" "$fixtures")
  say "tiny model, corpus and DeepSpeed config in $fixtures"
fi

# `sbatch --wait` of a run of $steps steps (the train options may change that), as a user would
# submit it from the repository root; prints the job id at once.
submit() {  # NAME OUTPUT_DIR [sbatch options] [-- train options]
  local name=$1 out=$2 sbatch_opts=()
  shift 2
  while (( $# )) && [[ $1 != -- ]]; do sbatch_opts+=("$1"); shift; done
  (( $# )) && shift
  local env=TSLD_PROCS_PER_NODE=2,OMP_NUM_THREADS=1,TOKENIZERS_PARALLELISM=false
  env+=,HF_HUB_OFFLINE=1,HF_DATASETS_OFFLINE=1
  cd "$repo"
  # --time: a bound on a run that hangs (the script asks for SIGUSR1 2 min before it).
  sbatch --parsable --wait --job-name="$name" --output="$work/%x-%j.out" --cpus-per-task=2 \
    --time=20 --export="ALL,$env" "${sbatch_opts[@]}" launch/slurm/train.sbatch \
    --model "$fixtures/tiny-llama" --dataset "$fixtures/corpus" --ds_config "$fixtures/ds.json" \
    --block_size 32 --lr 3e-3 --log_every 1 --eval_every 0 --eval_max_blocks 4 --seed 7 \
    --kd gt --no_export --max_steps "$steps" --output_dir "$out" "$@"
}

# Starts `submit NAME OUTPUT_DIR ...` in the background; sets $job and $sbatch_pid.
start() {
  local name=$1
  submit "$@" > "$work/$name.sbatch" &
  sbatch_pid=$!
  background+=("$sbatch_pid")
  until [[ -s $work/$name.sbatch ]]; do sleep 0.2; done
  job=$(head -n 1 "$work/$name.sbatch")
}

# Waits for the background `sbatch --wait`; sets $status, keeps scontrol's record of the job
# (purged MinJobAge=17 s after its end).
wait_for_sbatch() {
  status=0
  wait "$sbatch_pid" || status=$?
  scontrol show job "$job" > "$work/job-$job.scontrol" 2>&1 || true
}

job_field() {  # JOB FIELD: FIELD's value in scontrol's record of the job
  tr ' ' '\n' < "$work/job-$1.scontrol" | sed -n "s/^$2=//p" | head -n 1
}

logged_steps() {  # OUTPUT_DIR: how many steps' losses are logged so far (fast: polled)
  grep -c '"loss"' "$1/metrics.jsonl" 2> /dev/null || true
}

step_list() {  # OUTPUT_DIR: the steps whose losses are logged, in order, space-separated
  "$PYTHON" -c 'import json, sys
print(*(json.loads(l)["step"] for l in open(sys.argv[1] + "/metrics.jsonl") if "\"loss\"" in l))' \
    "$1"
}

stops() {  # LOG SIGNALS TOTAL: the steps after which the ranks stopped on one of SIGNALS (a|b)
  sed -E -n "s/^stopped on SIG($2) after step ([0-9]+) of $3;.*/\2/p" "$1"
}

between() {  # X LOW HIGH: X is one number in [LOW, HIGH]
  [[ $1 =~ ^[0-9]+$ ]] && (( $1 >= $2 && $1 <= $3 ))
}

latest_step() {  # OUTPUT_DIR: the step of checkpoints/latest, if that checkpoint exists
  local tag
  tag=$(cat "$1/checkpoints/latest" 2> /dev/null) && [[ -d $1/checkpoints/$tag ]] &&
    echo $((10#${tag##*_}))
}

wait_for_steps() {  # NAME OUTPUT_DIR N TIMEOUT: until the run has logged N steps
  local deadline=$((SECONDS + $4))
  until (( $(logged_steps "$2") + 0 >= $3 )); do
    (( SECONDS < deadline )) || fail "$1: job $job logged no step $3 in $4 s"
    kill -0 "$sbatch_pid" 2> /dev/null || fail "$1: job $job ended before step $3"
    sleep 0.1
  done
}

same_losses() {  # RUN_DIR RUN_DIR: every step's loss equal, bit for bit (ds.json resumes exactly)
  "$PYTHON" - "$1" "$2" << 'EOF'
import json, sys
runs = [{r["step"]: r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in r}
        for d in sys.argv[1:]]
a, b = runs
bad = {s: (a.get(s), b.get(s)) for s in a.keys() | b.keys()
       if s not in a or s not in b or a[s] != b[s]}
assert not bad, bad
EOF
}

check_complete() {  # NAME OUTPUT_DIR RESTARTS: the job ran to the end
  local name=$1 out=$2 restarts=$3 summary_steps
  (( status == 0 )) || fail "$name: sbatch --wait exited $status"
  [[ $(job_field "$job" JobState) == COMPLETED && $(job_field "$job" ExitCode) == 0:0 ]] ||
    fail "$name: job $job $(job_field "$job" JobState), exit code $(job_field "$job" ExitCode)"
  [[ $(job_field "$job" Restarts) == "$restarts" ]] ||
    fail "$name: job $job Restarts=$(job_field "$job" Restarts), not $restarts"
  grep -q "^train.sbatch: job $job (restart 0) on $node, master $node:" "$work/$name-$job.out" ||
    fail "$name: no start line in $work/$name-$job.out"
  summary_steps=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["steps"])' \
                    "$out/summary.json") || fail "$name: no readable $out/summary.json"
  (( summary_steps == steps )) || fail "$name: summary.json says $summary_steps steps"
  [[ $(latest_step "$out") == "$steps" ]] || fail "$name: latest is not the step $steps checkpoint"
  [[ $(step_list "$out") == "$(seq -s ' ' 1 "$steps")" ]] ||
    fail "$name: logged steps are not 1..$steps once each: $(step_list "$out")"
  local reference=${TSLD_SLURM_REFERENCE:-}
  if [[ -z $reference && $name != plain && -f $work/plain/summary.json ]]; then
    reference=$work/plain
  fi
  if [[ -n $reference ]]; then
    same_losses "$reference" "$out" || fail "$name: losses differ from the uninterrupted run's"
  fi
}

for case in "${cases[@]}"; do
  started=$SECONDS
  out=$work/$case
  rm -rf "$out" "$work/$case".sbatch "$work/$case"-*.out  # an earlier run's (train.sbatch resumes)
  case $case in
  plain)
    say "plain: sbatch --wait, $steps steps"
    start plain "$out"
    wait_for_sbatch
    log=$work/plain-$job.out
    ! grep -q "requeueing" "$log" || fail "plain: requeued a complete run"
    check_complete plain "$out" 0
    ;;
  usr1)
    say "usr1: sbatch --wait, $steps steps; scancel --signal=USR1 after step 3"
    start usr1 "$out"
    wait_for_steps usr1 "$out" 3 600
    scancel --signal=USR1 "$job"
    say "usr1: job $job: scancel --signal=USR1 after step $(logged_steps "$out")"
    wait_for_sbatch
    log=$work/usr1-$job.out
    stopped=$(stops "$log" USR1 "$steps")
    between "$stopped" 3 $((steps - 1)) ||
      fail "usr1: not one 'stopped on SIGUSR1 after step N', 3 <= N < $steps: '$stopped'"
    grep -q "requeueing job $job" "$log" || fail "usr1: train.sbatch did not requeue"
    grep -q "^train.sbatch: job $job (restart 1)" "$log" || fail "usr1: no restart in $log"
    check_complete usr1 "$out" 1
    say "usr1: stopped after step $stopped, requeued by train.sbatch, resumed, completed"
    ;;
  preempt)
    say "preempt: sbatch --wait, $steps steps; a job in partition urgent preempts it after step 3"
    start preempt "$out"
    wait_for_steps preempt "$out" 3 600
    rm -f "$work"/urgent-*.out
    urgent=$(cd "$work" && sbatch --parsable --partition=urgent --job-name=urgent \
               --output="$work/%x-%j.out" --cpus-per-task=2 --wrap 'echo "urgent job ran"')
    say "preempt: job $job: urgent job $urgent submitted after step $(logged_steps "$out")"
    wait_for_sbatch
    log=$work/preempt-$job.out
    # SIGTERM from SLURM, or SIGUSR1 from node.sh, which passes SIGTERM on as SIGUSR1.
    stopped=$(stops "$log" 'TERM|USR1' "$steps")
    between "$stopped" 3 $((steps - 1)) ||
      fail "preempt: not one 'stopped on SIGTERM/USR1 after step N', 3 <= N < $steps: '$stopped'"
    grep -q "CANCELLED AT .* DUE TO PREEMPTION" "$log" || fail "preempt: not preempted"
    grep -q "^train.sbatch: job $job (restart 1)" "$log" || fail "preempt: no restart in $log"
    ! grep -q "requeueing job" "$log" || fail "preempt: train.sbatch requeued a preempted job"
    grep -q "urgent job ran" "$work/urgent-$urgent.out" || fail "preempt: the urgent job never ran"
    check_complete preempt "$out" 1
    say "preempt: stopped after step $stopped, requeued by SLURM, resumed, completed"
    ;;
  timelimit)
    # SLURM's own notice: once step 3 is logged, the time limit is cut to end in 60-120 s, so the
    # script's --signal=USR1@120 is due at once; slurmctld sends SIGUSR1 within its 30 s check.
    say "timelimit: sbatch --wait, 200000 steps; time limit cut to 1-2 min after step 3"
    start timelimit "$out" -- --max_steps 200000
    log=$work/timelimit-$job.out
    wait_for_steps timelimit "$out" 3 600
    begun=$(date -d "$(scontrol show job "$job" | tr ' ' '\n' | sed -n 's/^StartTime=//p')" +%s)
    limit=$(( ($(date +%s) - begun) / 60 + 2 ))
    scontrol update JobId="$job" TimeLimit="$limit"
    say "timelimit: job $job: TimeLimit=$limit after step $(logged_steps "$out"), ends in" \
        "$((begun + 60 * limit - $(date +%s))) s"
    deadline=$((SECONDS + 300))
    until grep -q "^train.sbatch: job $job (restart 1)" "$log" 2> /dev/null; do
      (( SECONDS < deadline )) || fail "timelimit: job $job not restarted in 300 s"
      kill -0 "$sbatch_pid" 2> /dev/null || fail "timelimit: job $job ended"
      sleep 0.5
    done
    scontrol update JobId="$job" TimeLimit=20  # the restart: no notice during its set-up
    stopped=$(stops "$log" USR1 200000)
    between "$stopped" 3 200000 ||
      fail "timelimit: not one 'stopped on SIGUSR1 after step N' before the restart: '$stopped'"
    grep -q "requeueing job $job" "$log" || fail "timelimit: train.sbatch did not requeue"
    ! grep -q "DUE TO TIME LIMIT" "$log" || fail "timelimit: the run reached its time limit"
    say "timelimit: job $job stopped on SIGUSR1 after step $stopped, requeued, restarted"
    # Then scancel (SIGTERM to every process of the job) once the restart has trained on.
    wait_for_steps timelimit "$out" $((stopped + 3)) 300
    scancel "$job"
    wait_for_sbatch
    say "timelimit: job $job cancelled after step $(logged_steps "$out")"
    [[ $(job_field "$job" JobState) == CANCELLED && $(job_field "$job" Restarts) == 1 ]] ||
      fail "timelimit: job $job $(job_field "$job" JobState), Restarts=$(job_field "$job" Restarts)"
    last=$(stops "$log" 'TERM|USR1' 200000 | tail -n 1)
    (( last >= stopped + 3 )) || fail "timelimit: no stop with a checkpoint on scancel"
    [[ $(latest_step "$out") == "$last" ]] || fail "timelimit: latest is not step $last's"
    [[ $(step_list "$out") == "$(seq -s ' ' 1 "$last")" ]] ||
      fail "timelimit: logged steps are not 1..$last once each"
    say "timelimit: cancelled after step $last, checkpoint of step $last saved"
    ;;
  esac
  say "$case: OK, job $job (its last start ran $(job_field "$job" RunTime));" \
      "$((SECONDS - started)) s"
done
say "all OK in $((SECONDS - t0)) s; outputs in $work"
