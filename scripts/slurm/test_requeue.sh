#!/usr/bin/env bash
# End-to-end check of checkpoint-and-requeue on a real (local) Slurm cluster:
#
#   scripts/slurm/test_requeue.sh CONFIG [RUN_DIR]
#
# starts scripts/slurm/local_cluster.sh, submits train.sbatch with 2 tasks and
# `--set run.dir=RUN_DIR` (default: a fresh temporary folder), waits for metrics.jsonl to grow,
# preempts the job with `scancel --batch --signal=USR1`, and checks that the job checkpointed,
# was requeued, restarted with SLURM_RESTART_COUNT=1, resumed from that checkpoint and finished
# with a final checkpoint. Every wait is bounded; on failure it prints the job, its output and
# the Slurm logs, and exits non-zero. The cluster is stopped at the end unless
# MPIML_KEEP_CLUSTER=1.
#
# Environment: MPIML_PYTHON (interpreter for the ranks) [python3], MPIML_PYTHONPATH (put first
# on the ranks' PYTHONPATH) [this repository], MPIML_TEST_MIN_STEPS (metrics lines to see
# before preempting) [3], MPIML_TEST_TIMEOUT (seconds for each wait) [180], MPIML_TEST_EPOCHS
# (train.epochs for the job: enough that the preemption lands mid-run; at 20 the digits MLP once
# finished all its steps between two polls, and the signal found nothing left to stop) [80].
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLUSTER=$HERE/local_cluster.sh

[[ $# -ge 1 && -f $1 ]] || { echo "usage: $0 CONFIG [RUN_DIR]  (CONFIG must exist)" >&2; exit 2; }
CONFIG=$(realpath "$1")
WORK=$(mktemp -d /tmp/mpiml-requeue.XXXXXX)
RUN_DIR=$(realpath -m "${2:-$WORK/run}")
MIN_STEPS=${MPIML_TEST_MIN_STEPS:-3}
TIMEOUT=${MPIML_TEST_TIMEOUT:-180}
EPOCHS=${MPIML_TEST_EPOCHS:-80}
export MPIML_PYTHON=${MPIML_PYTHON:-python3}
export PYTHONPATH=${MPIML_PYTHONPATH:-$REPO}${PYTHONPATH:+:$PYTHONPATH}
export CONFIG

JOB=
OUT=
say() { echo "test_requeue: $*"; }
words() { paste -sd' ' <<<"$1"; }  # one line from a list

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        say "FAILED (exit $rc); diagnostics follow"
        if [[ -n $JOB ]]; then
            scontrol show job "$JOB" 2>&1 || true
            scancel "$JOB" 2>/dev/null || true
        fi
        if [[ -n $OUT && -f $OUT ]]; then echo "----- job output $OUT"; cat "$OUT"; fi
        local state
        state=$(bash "$CLUSTER" env | sed 's/^export SLURM_CONF=//; s#/etc/slurm.conf$##')
        for log in "$state"/log/slurmctld.log "$state"/log/slurmd.log; do
            [[ -f $log ]] && { echo "----- tail $log"; tail -n 30 "$log"; }
        done
    fi
    if [[ ${MPIML_KEEP_CLUSTER:-0} != 1 ]]; then
        bash "$CLUSTER" stop || true
    fi
    exit $rc
}
trap cleanup EXIT

fail() { say "FAIL: $*" >&2; exit 1; }

# job_field NAME: one field of `scontrol show job` (JobState, Restarts, ExitCode, ...).
job_field() {
    scontrol show job "$JOB" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1
}

# wait_for WHAT CMD...: run CMD every second until it succeeds; fail after TIMEOUT seconds,
# or as soon as the job has ended and CMD still fails.
wait_for() {
    local what=$1 t0=$SECONDS state
    shift
    until "$@"; do
        state=$(job_field JobState)
        case $state in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)
                "$@" && break  # it may have happened just before the job ended
                fail "job $JOB is $state while waiting for: $what" ;;
        esac
        (( SECONDS - t0 < TIMEOUT )) || fail "no $what after ${TIMEOUT}s (job state: $state)"
        sleep 1
    done
    say "$what after $((SECONDS - t0)) s"
}

metrics_lines() { [[ -f $RUN_DIR/metrics.jsonl ]] && wc -l <"$RUN_DIR/metrics.jsonl" || echo 0; }
has_progress() { (( $(metrics_lines) >= MIN_STEPS )); }
out_has() { [[ -f $OUT ]] && grep -q -- "$1" "$OUT"; }
checkpointed() { out_has "ranks exited with 75"; }
restarted() { [[ $(job_field Restarts) == 1 ]]; }
completed() { [[ $(job_field JobState) == COMPLETED ]]; }
committed_checkpoints() {  # names of finished checkpoints (those with the COMMITTED marker)
    local marker
    for marker in "$RUN_DIR"/checkpoints/*/COMMITTED; do
        [[ -e $marker ]] && basename "$(dirname "$marker")"
    done
    return 0
}

t_start=$SECONDS
bash "$CLUSTER" start </dev/null
eval "$(bash "$CLUSTER" env)"

if [[ -d $RUN_DIR && -n $(ls -A "$RUN_DIR") ]]; then
    fail "$RUN_DIR is not empty: the test must start from no checkpoint (remove it first)"
fi
say "config $CONFIG, run dir $RUN_DIR, work dir $WORK, python $MPIML_PYTHON"
JOB=$(sbatch --parsable --ntasks=2 --cpus-per-task=1 --chdir="$WORK" \
      --output="$WORK/mpiml-%j.out" "$HERE/train.sbatch" --set "run.dir=$RUN_DIR" \
      --set "train.epochs=$EPOCHS")
OUT=$WORK/mpiml-$JOB.out
say "submitted job $JOB; output $OUT"

wait_for "$MIN_STEPS steps in metrics.jsonl" has_progress
say "preempting: scancel --batch --signal=USR1 $JOB"
scancel --batch --signal=USR1 "$JOB"
wait_for "exit 75 (checkpointed) in the output" checkpointed
before=$(committed_checkpoints)
[[ -n $before ]] || fail "the job exited 75 but $RUN_DIR/checkpoints has no committed checkpoint"
say "checkpoints after preemption: $(words "$before")"
wait_for "requeue (Restarts=1)" restarted
wait_for "job COMPLETED" completed

exit_code=$(job_field ExitCode)
[[ $exit_code == 0:0 ]] || fail "job ExitCode=$exit_code, expected 0:0"
out_has "SLURM_RESTART_COUNT=0" || fail "no first start (SLURM_RESTART_COUNT=0) in $OUT"
out_has "SLURM_RESTART_COUNT=1" || fail "no second start (SLURM_RESTART_COUNT=1) in $OUT"
out_has "resumed from" || fail "the second run did not print 'resumed from' in $OUT"
resumed=$(grep -m1 -o 'resumed from [^ ]*' "$OUT" | sed 's/^resumed from //')
grep -qx -- "$(basename "$resumed")" <<<"$before" \
    || fail "resumed from '$resumed', not from a checkpoint of the first run ($(words "$before"))"
final=$(comm -13 <(sort <<<"$before") <(committed_checkpoints | sort))
[[ -n $final ]] || fail "no checkpoint written after the restart in $RUN_DIR/checkpoints"
say "resumed from $resumed; new checkpoints: $(words "$final")"
say "PASSED in $((SECONDS - t_start)) s (output: $OUT)"
