#!/usr/bin/env bash
# Repeat a REAL multi-process run of the quick recipe -- torchrun train, then torchrun decode
# (egs/mini_tts/run.sh --quick true --nproc 2, stages 4-5) -- and count the runs that fail.
# A multi-process run must end cleanly every time: exit status 0 from training and from decoding,
# and no abort at teardown ("terminate called ...", SIGABRT) in their logs.
#   tools/stress_ddp.sh                     # 20 runs (about 2 minutes each on 2 busy CPU cores)
#   tools/stress_ddp.sh --runs 5 --work /tmp/stress_ddp --nproc 2 --method pcc
# The corpus, canaries and tokenizer (stages 0-3) are made once in WORK/data and reused; each run
# trains into a fresh WORK/exp_N, removed when it passed (kept, with its logs, when it failed).
# Prints one line per run, then "stress_ddp: P of N runs passed, F failed; wall ..."; exit status 1
# when any run failed, 2 (one line) on a bad option.
set -u -o pipefail
prog=stress_ddp.sh
root=$(cd "$(dirname "$0")/.." && pwd)
runs=20; work=${TMPDIR:-/tmp}/stress_ddp; nproc=2; method=pcc

die() { echo "$prog: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --runs|--work|--nproc|--method) [ $# -ge 2 ] || die "$1 needs a value"; printf -v "${1#--}" %s "$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1'; known: --runs N, --work DIR, --nproc N, --method NAME" ;;
  esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs takes a whole number >= 1, got '$runs'"
[[ "$nproc" =~ ^[1-9][0-9]*$ && "$nproc" -ge 2 ]] || die "--nproc takes a whole number >= 2, got '$nproc'"
case "$method" in baseline|global|pcc|apcc|pec) ;; *) die "unknown --method '$method'; known: baseline global pcc apcc pec" ;; esac
mkdir -p "$work" 2>/dev/null && [ -w "$work" ] || die "--work $work is not a writable folder"

run_sh=("$root/egs/mini_tts/run.sh" --quick true --data "$work/data")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! "${run_sh[@]}" --exp "$work/exp_data" --stop_stage 3 > "$work/data.log" 2>&1; then
  echo "$prog: error: preparing the quick corpus failed (log: $work/data.log)" >&2; exit 1
fi

aborted() {  # aborted DIR: the logs of a run show an abort at teardown
  grep -lE "terminate called|SIGABRT|Signals\.SIGABRT|core dumped|exitcode *: *-6" "$1"/*/seed*/*.log 2>/dev/null | head -n 1
}

passed=0; failed=0; start=$SECONDS
for i in $(seq 1 "$runs"); do
  exp="$work/exp_$i"; rm -rf "$exp"; t0=$SECONDS
  "${run_sh[@]}" --exp "$exp" --nproc "$nproc" --methods "$method" --seeds 1 --stage 4 --stop_stage 5 \
    > "$work/run_$i.log" 2>&1
  status=$?; bad=$(aborted "$exp")
  if [ "$status" -eq 0 ] && [ -z "$bad" ] && [ -s "$exp"/*/seed1/hyps/holdout.csv ]; then
    passed=$((passed + 1)); echo "run $i/$runs: ok ($((SECONDS - t0)) s)"; rm -rf "$exp" "$work/run_$i.log"
  else
    failed=$((failed + 1))
    echo "run $i/$runs: FAILED (status $status${bad:+, abort in $bad}; $((SECONDS - t0)) s; log: $work/run_$i.log)"
  fi
done
wall=$((SECONDS - start))
echo "$prog: $passed of $runs runs passed, $failed failed; wall ${wall} s ($((wall / runs)) s a run, $nproc processes)"
[ "$failed" -eq 0 ]
