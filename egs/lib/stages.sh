#!/usr/bin/env bash
# The one stage library behind every egs/<corpus>/run.sh (ESPnet-style stages, shared, not copied).
#
# A corpus's run.sh sets recipe/hparams, defines corpus_prepare (stage 0) and
# corpus_manifests (stage 1), sources this file, calls `parse_options "$@"`, then `run_stages`.
# Every side effect sits inside a stage guard; each stage skips work already done.
set -euo pipefail

PRIVASR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="$PRIVASR_ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1
python=python3
[ -x "$PRIVASR_ROOT/.venv/bin/python" ] && python="$PRIVASR_ROOT/.venv/bin/python"

# Options every corpus knows (a corpus may add its own to extra_options before sourcing).
stage=0                           # first stage to run
stop_stage=6                      # last stage to run
nj=2                              # parallel jobs for synthesis / preparation
nproc=1                           # DDP processes per training run (torchrun)
jobs=1                            # training runs at a time (each gets $(nproc)/jobs CPU threads)
virtual_cores=                    # cores each process emulates (empty: the YAML's value)
methods="baseline pcc apcc"       # any of: baseline global pcc apcc pec
seeds="1"                         # training seeds (each method x seed is one run)
clip_bound=                       # b for pcc / pec, max norm for global (empty: the YAML's value)
vocab_size=                       # tokenizer and model output size; empty: the recipe YAML's
tokenizer_type=                   # char | unigram | bpe; empty: the recipe YAML's
exp=exp                           # runs and RESULTS.md go here
data=data                         # corpus, canaries and tokenizer go here
train_args=""                     # extra overrides for train.py, e.g. "--number_of_epochs=2"
known_options="stage stop_stage nj nproc jobs virtual_cores methods seeds clip_bound vocab_size tokenizer_type exp data train_args ${extra_options:-}"

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [$(basename "$0")] $*"; }
die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

stages_help=${stages_help:-"0 corpus, 1 manifests, 2 canaries, 3 tokenizer, 4 train (--methods x --seeds), 5 decode, 6 score -> \$exp/RESULTS.md"}
last_stage=${last_stage:-6}

usage() {  # every option with its default (the value before parsing) and the comment beside its definition
  local name meaning sources=("$0" "${BASH_SOURCE[@]}")
  echo "usage: $0 [--OPTION VALUE ...]"
  echo "stages: $stages_help"
  echo "options:"
  for name in $known_options; do
    meaning=$(grep -hE "^[[:space:]]*(: \"\\\$\{)?$name=[^#]*#" "${sources[@]}" 2>/dev/null | head -n 1 | sed 's/^[^#]*# *//')
    printf '  --%-22s %s\n' "$name" "(default: '${!name}') ${meaning}"
  done
}

parse_options() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --help|-h) usage; exit 0 ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --*)
        local name=${1#--}; name=${name//-/_}
        [[ " $known_options " == *" $name "* ]] || die "unknown option --${1#--}; known options: --${known_options// / --}"
        [ $# -ge 2 ] || die "option $1 needs a value"
        printf -v "$name" '%s' "$2"; given_options+=" $name"; shift 2 ;;
      *) die "unexpected argument '$1'; options look like --stage 3" ;;
    esac
  done
  require_count jobs; require_count nproc; require_count nj
  [[ "$stage" =~ ^[0-9]+$ ]] || die "--stage takes a whole number 0..$last_stage, got '$stage'"
  [[ "$stop_stage" =~ ^[0-9]+$ ]] || die "--stop_stage takes a whole number 0..$last_stage, got '$stop_stage'"
  [ "$stage" -le "$stop_stage" ] || die "--stage $stage is after --stop_stage $stop_stage: no stage to run"
  [ "$stage" -le "$last_stage" ] || die "--stage $stage: the last stage is $last_stage ($stages_help)"
  [ -n "${methods// /}" ] || die "--methods is empty; give one or more of: baseline global pcc apcc pec"
  local m; for m in $methods; do clipping_of "$m" > /dev/null; done
  [ -n "${seeds// /}" ] || [ "${seeds_may_be_empty:-false}" = true ] || die "--seeds is empty; give one or more seeds, e.g. --seeds \"1 2 3\""
  for m in $seeds; do [[ "$m" =~ ^[0-9]+$ ]] || die "--seeds takes whole numbers, got '$m'"; done
  [ -z "$clip_bound" ] || [[ "$clip_bound" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
    || die "--clip_bound takes a positive number, got '$clip_bound'"
  [ -z "$virtual_cores" ] || require_count virtual_cores
  check_folder exp; check_folder data
  check_train_args
}

given() { [[ " ${given_options:-} " == *" $1 "* ]]; }  # given NAME: --NAME was on the command line

check_folder() {  # check_folder NAME: the option --NAME names a folder that exists or can be made, and is writable
  local dir=${!1} parent
  [ -n "$dir" ] || die "--$1 is empty"
  if [ -e "$dir" ]; then
    [ -d "$dir" ] || die "--$1 $dir is a file, not a folder"
    [ -w "$dir" ] || die "--$1 $dir is not writable"
  else
    parent=$(dirname "$dir"); while [ ! -e "$parent" ]; do parent=$(dirname "$parent"); done
    [ -d "$parent" ] && [ -w "$parent" ] || die "--$1 $dir cannot be created ($parent is not a writable folder)"
  fi
}

with_defaults() {  # with_defaults "DEFAULT OVERRIDES" "USER OVERRIDES": the defaults whose key the user did not give, then the user's
  local out="" word key user=" $2 "
  for word in $1; do
    key=${word%%=*}
    [[ "$user" == *" $key "* || "$user" == *" $key="* ]] || out+="$word "
  done
  echo "$out$2"
}

check_train_args() {  # refuse unknown or mistyped --train_args keys before any stage runs (minutes of synthesis)
  [ -n "${train_args// /}" ] || return 0
  local problem
  # shellcheck disable=SC2086
  problem=$($python -m privasr.faults check-overrides "$PRIVASR_ROOT/$recipe/$hparams" $train_args 2>&1 >/dev/null) \
    || die "--train_args: ${problem#--train_args: error: }"
}

require_count() {  # require_count NAME: the option --NAME takes a whole number >= 1
  [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "--$1 takes a whole number >= 1, got '${!1}'"
}

require_bool() {  # require_bool NAME: the option --NAME takes true or false
  case "${!1}" in true|false) ;; *) die "--$1 takes true or false, got '${!1}'" ;; esac
}

# stage N DESCRIPTION: true when N is within [stage, stop_stage]; prints a timestamped line.
in_stage() {
  local n=$1; shift
  if [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; then
    log "stage $n: $*"
    return 0
  fi
  return 1
}

clipping_of() {  # run-name -> the recipe's --clipping value
  case "$1" in
    baseline) echo none ;;
    global|pcc|apcc|pec) echo "$1" ;;
    *) die "unknown method '$1' in --methods; known: baseline global pcc apcc pec" ;;
  esac
}

run_name() {  # run_name METHOD: the method and the settings given on the command line that change its runs
  local name=$1
  case "$1" in pcc|pec|global) ! given clip_bound || name+="_b$clip_bound" ;; esac
  ! given virtual_cores || name+="_k$virtual_cores"
  [ "$nproc" -eq 1 ] || name+="_p$nproc"
  echo "$name"
}

run_dir() { echo "$exp/$(run_name "$1")/seed$2"; }

# glibc hands freed blocks above its mmap threshold back to the OS and page-faults them in again on the next step
# (a training step frees and re-allocates the same large tensors every time). Keeping them costs resident memory up
# to about one step's peak and made a `none` step 1.5x faster here (README, "Speed"); export other values to override.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}

# torchrun's workers share its rendezvous TCP store by default; after an elastic restart a worker can then read
# the previous attempt's gloo/NCCL addresses and fail to connect (pytorch/pytorch#135712). A store of their own avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

backend_args() {  # several processes without CUDA need SpeechBrain's gloo backend (its default is nccl)
  if [ "$nproc" -gt 1 ] && ! $python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "--distributed_backend gloo"
  fi
}

python_launcher() {  # the command that starts a training script: python, or torchrun when --nproc > 1
  launcher=("$python")
  [ "$nproc" -gt 1 ] && launcher=("$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc")
  return 0
}

launch_train() {  # launch_train OUTPUT_DIR OVERRIDES... : the recipe's train.py on this corpus's data
  local out=$1 launcher; shift
  python_launcher
  # shellcheck disable=SC2206
  local extra=($train_args $(backend_args))
  [ -n "$vocab_size" ] && extra=(--vocab_size "$vocab_size" "${extra[@]}")
  [ -n "$tokenizer_type" ] && extra=(--tokenizer_type "$tokenizer_type" "${extra[@]}")
  "${launcher[@]}" "$PRIVASR_ROOT/$recipe/train.py" "$PRIVASR_ROOT/$recipe/$hparams" --output_folder "$out" \
    --data_folder "$data" --tokenizer_dir "$data/tokenizer" "${extra[@]}" "$@"
}

train_command() {  # train_command METHOD SEED EXTRA... : one run of the method comparison
  local method=$1 seed=$2; shift 2
  local args=(--seed "$seed" --clipping "$(clipping_of "$method")")
  if [ -n "$virtual_cores" ]; then args+=(--virtual_cores "$virtual_cores")
  # Plain data parallelism: with equal cores the mean of the per-core mean gradients is the batch mean,
  # so the baseline takes one backward per process instead of one per virtual core (same update, faster).
  elif [ "$method" = baseline ]; then args+=(--virtual_cores 1); fi
  [ -n "$clip_bound" ] && args+=(--clip_bound "$clip_bound")
  launch_train "$(run_dir "$method" "$seed")" "${args[@]}" "$@"
}

in_parallel() {  # in_parallel FUNCTION < LINES : FUNCTION <the words of a line> per line, $jobs at a time
  # FUNCTION runs on the left of `||` (set -e does not apply): it must check its own commands.
  local fn=$1 line running=0 failed=0 cpus threads
  cpus=$(command nproc)
  threads=$(( cpus / (jobs * nproc) ))  # each of the $jobs runs has $nproc processes
  [ "$threads" -ge 1 ] || threads=1
  while read -r line; do
    # shellcheck disable=SC2086
    if [ "$jobs" -gt 1 ]; then (export OMP_NUM_THREADS=$threads; "$fn" $line) & else "$fn" $line & fi
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then wait -n || failed=1; running=$((running - 1)); fi
  done
  while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
  return "$failed"
}

stage_canaries() {  # stage_canaries [DIR]: canaries, holdout and the training manifest with them
  local dir=${1:-$data/canaries} train_out=$data/train_with_canaries.csv
  [ "$dir" = "$data/canaries" ] || train_out=$dir/train_with_canaries.csv  # a variant keeps its own
  # privasr-canaries skips work already done, and redoes it when the corpus or the settings changed
  # shellcheck disable=SC2086
  privasr-canaries --train-in "$data/train.csv" --train-out "$train_out" --out "$dir" --nj "$nj" $canary_args 2>&1
}

tokenizer_from_hparams() {  # the recipe YAML's tokenizer (vocab_size, tokenizer_type), unless given as options
  $python -c "import sys; from privasr.faults import yaml_defaults; h = yaml_defaults(sys.argv[1]);
print('--vocab-size', sys.argv[2] or h['vocab_size'], '--model-type', sys.argv[3] or h['tokenizer_type'])" \
    "$PRIVASR_ROOT/$recipe/$hparams" "$vocab_size" "$tokenizer_type"
}

stage_tokenizer() {
  # shellcheck disable=SC2046
  $python -m privasr.tokenizer --manifest "$data/train.csv" --out "$data/tokenizer" $(tokenizer_from_hparams)
}

error_line() {  # error_line LOG: the one-line error a failed command of privasr wrote (or its log's last line)
  local line; line=$(grep -E "(^|[[:space:]])[^[:space:]]+: error: " "$1" | tail -n 1)
  echo "${line:-$(tail -n 1 "$1")}"
}

train_one() {  # train_one METHOD SEED: train.py resumes an unfinished run, finishes at once a finished one,
  # and refuses a folder trained with other settings (its fingerprint.json: see privasr.provenance)
  local method=$1 seed=$2 dir; dir=$(run_dir "$1" "$2")
  mkdir -p "$dir"
  [ -f "$dir/.trained" ] || log "training $method seed $seed -> $dir (log: $dir/train.log; progress: tensorboard --logdir $dir/tensorboard)"
  train_command "$method" "$seed" --mode train >> "$dir/train.log" 2>&1 \
    || { log "FAILED: training $method seed $seed: $(error_line "$dir/train.log") (log: $dir/train.log)"; return 1; }
  if [ -f "$dir/.trained" ]; then log "$method seed $seed already trained with these settings ($dir/fingerprint.json)"
  else log "trained $method seed $seed: $(tail -n 1 "$dir/train_log.txt")"; touch "$dir/.trained"; fi
}

method_seed_pairs() {
  local method seed
  for seed in $seeds; do for method in $methods; do echo "$method $seed"; done; done
}

stage_train() {
  in_parallel train_one < <(method_seed_pairs) || die "some training runs failed (see the FAILED lines)"
}

decode_one() {  # decode_one METHOD SEED: train.py decodes unless hyps/provenance.json says this checkpoint already was
  local method=$1 seed=$2 dir; dir=$(run_dir "$1" "$2")
  [ -d "$dir" ] || { log "FAILED: decoding $method seed $seed: no run in $dir (stage 4 trains it)"; return 1; }
  train_command "$method" "$seed" --mode decode >> "$dir/decode.log" 2>&1 \
    || { log "FAILED: decoding $method seed $seed: $(error_line "$dir/decode.log") (log: $dir/decode.log)"; return 1; }
  if tail -n 1 "$dir/decode.log" | grep -q "already decoded"; then
    log "$method seed $seed already decoded from this checkpoint ($dir/hyps/provenance.json)"
  fi
}

stage_decode() {
  in_parallel decode_one < <(method_seed_pairs) || die "some decoding runs failed (see the FAILED lines)"
}

stage_score() {  # privasr.results refuses transcripts it cannot trace to the run's checkpoint and these canaries
  local m names=""; for m in $methods; do names+="$(run_name "$m") "; done
  $python -m privasr.results --exp "$exp" --canaries "$data/canaries/canaries.csv" \
    --holdout "$data/canaries/holdout.csv" --methods "$names" --seeds "$seeds" \
    || die "scoring failed (see the line above)"
  log "results: $exp/RESULTS.md"
}

run_stages() {
  if in_stage 0 "corpus"; then corpus_prepare; fi
  if in_stage 1 "manifests"; then corpus_manifests; fi
  if in_stage 2 "canaries"; then stage_canaries; fi
  if in_stage 3 "tokenizer"; then stage_tokenizer; fi
  if in_stage 4 "train ($methods) x seeds ($seeds)"; then stage_train; fi
  if in_stage 5 "decode test, dev, canaries, holdout"; then stage_decode; fi
  if in_stage 6 "score -> $exp/RESULTS.md"; then stage_score; fi
  log "done (stages $stage..$stop_stage)"
}
