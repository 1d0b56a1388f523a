#!/usr/bin/env bash
# The one stage library behind every egs/<corpus>/run*.sh (ESPnet-style stages, shared, not copied).
#
# What a driver (run.sh, run_study.sh, run_dp.sh of a corpus) does, in this order:
#   1. cd to its own folder and define
#        recipe=recipes/<corpus>/ASR/<model>   the ASR recipe, relative to the repository (launch_train runs its
#        hparams=hparams/<file>.yaml           train.py with this YAML; --train_args and the tokenizer read it too)
#        extra_options="..."                   (optional) the names of its own options, beyond the ones below
#                                              (with run_stages: also pretrain_epochs finetune_epochs);
#   2. source this file (then corpus.sh, and ../lib/dp_stages.sh for the DP stages), and give its own options
#      their defaults, each as `name=value  # meaning` (--help prints the value and the comment);
#   3. if its stages are not the method comparison's 0-6: `declare_stages LAST "HELP"`; if an empty --seeds
#      means "its own seeds": seeds_may_be_empty=true;
#   4. `parse_options "$@"`, then adjust its own defaults (`given NAME`: was --NAME on the command line?);
#   5. run its stages: `run_stage N "what" FUNCTION ARGS...` per stage, then `stages_done`
#      (run_stages below is the method comparison's list, run_dp_stages the DP one's).
#
# Options: globals parse_options sets from the command line (defaults below). The library's functions read
# these options, $recipe/$hparams, $python and $PRIVASR_ROOT, and take everything else as arguments; none reads a
# variable its caller set as a local.
#
# Functions (ARGS: more words passed on; DATA: a corpus folder holding train.csv, dev.csv, test.csv, tokenizer/):
#   parse_options ARGS...              set the options from the command line; refuse bad ones (one line, status 2)
#   given NAME                         true when --NAME was on the command line
#   declare_stages LAST HELP           the driver's stages are 0..LAST (--stop_stage's default); HELP for --help
#   run_stage N WHAT FUNCTION ARGS...  FUNCTION ARGS... when N is within --stage..--stop_stage, after the line
#                                      "<time> [<driver>] stage N: WHAT"
#   stages_done [NOTE]                 the closing "done (stages A..B)" line
#   run_stages CORPUS_ARGS CANARY_ARGS the method comparison, stages 0-6 (each a string of words for
#                                      corpus_prepare / privasr-canaries)
#   launch_recipe RECIPE HPARAMS OUTPUT_DIR ARGS...
#                                      RECIPE/train.py RECIPE/HPARAMS --output_folder OUTPUT_DIR ARGS..., under
#                                      torchrun when --nproc > 1, with --distributed_backend gloo when that needs it
#   launch_train OUTPUT_DIR ARGS...    launch_recipe of $recipe/$hparams on --data and its tokenizer, --train_args
#   in_parallel FUNCTION ARGS... < LINES
#                                      FUNCTION ARGS... <the words of a line> per line, --jobs at a time
#   stage_canaries CORPUS OUT ARGS...  canaries and holdout in OUT, inserted into CORPUS/train.csv
#   stage_tokenizer DATA               the tokenizer of DATA/train.csv in DATA/tokenizer
#   stage_train, stage_decode, stage_score   train / decode / score each of --methods x --seeds (stage_train first
#                                      pre-trains $exp/pretrain with --pretrain_epochs > 0, or installs the kept
#                                      pre-training of --pretrained)
#   use_pretrained                     with --pretrained: verify it (one line if altered) and take its epochs and
#                                      model settings; stage_tokenizer_or_kept DATA: stage 3 for either case
#   pretrain DIR EPOCHS ARGS...        a canary-free baseline in DIR (the shared start of fine-tunings)
#   start_from PRETRAINED DIR          DIR's training starts from PRETRAINED's checkpoint and carries its fingerprint
#   run_name METHOD, run_dir METHOD SEED     a run's name and folder (the name encodes the settings given)
#   error_line LOG                     the one-line error a failed command wrote
#   log WORDS..., die WORDS...         a timestamped line; "<driver>: error: WORDS" and status 2
# A corpus's corpus.sh defines the hooks of stages 0 and 1: corpus_prepare DATA ARGS... and corpus_manifests DATA.
# Every side effect sits inside a stage; each stage skips work already done.
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
# Options of run_stages only (the method comparison): a driver that runs it lists them in its extra_options, so
# that the other drivers refuse them as unknown instead of ignoring them.
pretrain_epochs=0                 # > 0: stage 4 first trains one canary-free baseline this many epochs ($exp/pretrain), and every method starts from it
finetune_epochs=1                 # with --pretrain_epochs > 0: the epochs each method then trains with the canaries
pretrained=""                     # a kept pre-training (privasr-pretrained keep): stages 3-4 install its tokenizer and model instead of making them, and every method fine-tunes it
known_options="stage stop_stage nj nproc jobs virtual_cores methods seeds clip_bound vocab_size tokenizer_type exp data train_args ${extra_options:-}"
given_options=""                  # the options on the command line (parse_options)
seeds_may_be_empty=false          # true: an empty --seeds is allowed (the driver has seeds of its own)
stages_help="0 corpus, 1 manifests, 2 canaries, 3 tokenizer, 4 train (--methods x --seeds), 5 decode, 6 score -> \$exp/RESULTS.md"
last_stage=6

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [$(basename "$0")] $*"; }
die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

declare_stages() {  # declare_stages LAST HELP: the driver's stages are 0..LAST (--stop_stage's default); HELP for --help
  last_stage=$1; stop_stage=$1; stages_help=$2
}

usage() {  # every option with its default (the value before parsing) and the comment beside its first definition
  # (in the driver, then the library, then corpus.sh: a driver runs in its own folder)
  local name meaning sources=("$(basename "$0")" "$PRIVASR_ROOT"/egs/lib/*.sh corpus.sh)
  echo "usage: $0 [--OPTION VALUE ...]"
  echo "stages: $stages_help"
  echo "options:"
  for name in $known_options; do
    meaning=$(grep -hE "^[[:space:]]*(: \"\\\$\{)?$name=[^#]*#" "${sources[@]}" 2>/dev/null | head -n 1 | sed 's/^[^#]*# *//' \
      || true)  # an option without a comment has no meaning to print
    printf '  --%-22s %s\n' "$name" "(default: '${!name}') ${meaning}"
  done
}

parse_options() {  # parse_options ARGS...: --NAME VALUE or --NAME=VALUE for each known option, then the checks
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
  [ -n "${seeds// /}" ] || [ "$seeds_may_be_empty" = true ] || die "--seeds is empty; give one or more seeds, e.g. --seeds \"1 2 3\""
  for m in $seeds; do [[ "$m" =~ ^[0-9]+$ ]] || die "--seeds takes whole numbers, got '$m'"; done
  [ -z "$clip_bound" ] || [[ "$clip_bound" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
    || die "--clip_bound takes a positive number, got '$clip_bound'"
  [ -z "$virtual_cores" ] || require_count virtual_cores
  [[ "$pretrain_epochs" =~ ^[0-9]+$ ]] || die "--pretrain_epochs takes a whole number (0: no pre-training), got '$pretrain_epochs'"
  require_count finetune_epochs
  if [ "$pretrain_epochs" -gt 0 ] && [[ " $train_args" =~ [[:space:]]--number_of_epochs ]]; then
    die "--train_args sets --number_of_epochs, but with --pretrain_epochs $pretrain_epochs the runs train --pretrain_epochs + --finetune_epochs: give those instead"
  fi
  check_folder exp; check_folder data
  check_train_args
}

given() { [[ " $given_options " == *" $1 "* ]]; }  # given NAME: --NAME was on the command line

check_folder() {  # check_folder NAME: the option --NAME names a folder that exists or can be made, and is writable
  local dir=${!1} parent
  [ -n "$dir" ] || die "--$1 is empty"
  if [ -e "$dir" ]; then
    [ -d "$dir" ] || die "--$1 $dir is a file, not a folder"
    [ -w "$dir" ] || die "--$1 $dir is not writable"
  else
    parent=$(dirname "$dir"); while [ ! -e "$parent" ]; do parent=$(dirname "$parent"); done
    { [ -d "$parent" ] && [ -w "$parent" ]; } || die "--$1 $dir cannot be created ($parent is not a writable folder)"
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
  # shellcheck disable=SC2086,SC2154  # --train_args is a string of words; the driver defines recipe, hparams
  problem=$($python -m privasr.cli.hparams check-overrides "$PRIVASR_ROOT/$recipe/$hparams" $train_args 2>&1 >/dev/null) \
    || die "--train_args: ${problem#--train_args: error: }"
}

require_count() {  # require_count NAME: the option --NAME takes a whole number >= 1
  [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "--$1 takes a whole number >= 1, got '${!1}'"
}

require_bool() {  # require_bool NAME: the option --NAME takes true or false
  case "${!1}" in true|false) ;; *) die "--$1 takes true or false, got '${!1}'" ;; esac
}

run_stage() {  # run_stage N WHAT FUNCTION ARGS...: FUNCTION ARGS... if N is within --stage..--stop_stage
  local n=$1 what=$2; shift 2
  { [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; } || return 0
  log "stage $n: $what"
  "$@"
}

# shellcheck disable=SC2120  # a NOTE is optional
stages_done() {  # stages_done [NOTE]: the driver's last line
  log "done (stages $stage..$stop_stage)${1:+ $1}"
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

run_dir() { echo "$exp/$(run_name "$1")/seed$2"; }  # run_dir METHOD SEED

# glibc hands freed blocks above its mmap threshold back to the OS and page-faults them in again on the next step
# (a training step frees and re-allocates the same large tensors every time). Keeping them costs resident memory up
# to about one step's peak and made a `none` step 1.5x faster here (README, "Speed"); export other values to override.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}

# torchrun's workers share its rendezvous TCP store by default; after an elastic restart a worker can then read
# the previous attempt's gloo/NCCL addresses and fail to connect (pytorch/pytorch#135712). A store of their own avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

needs_gloo() {  # needs_gloo ARGS...: several processes without CUDA, and ARGS choose no backend (SpeechBrain's is nccl)
  local arg
  for arg in "$@"; do case "$arg" in --distributed_backend|--distributed_backend=*) return 1 ;; esac; done
  [ "$nproc" -gt 1 ] && ! $python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"
}

launch_recipe() {  # launch_recipe RECIPE HPARAMS OUTPUT_DIR ARGS...: a recipe's train.py, the one place it is started
  local dir=$PRIVASR_ROOT/$1 yaml=$2 out=$3; shift 3
  local launcher=("$python") backend=()
  [ "$nproc" -eq 1 ] || launcher+=(-m torch.distributed.run --standalone --nproc_per_node "$nproc")
  if needs_gloo "$@"; then backend=(--distributed_backend gloo); fi
  "${launcher[@]}" "$dir/train.py" "$dir/$yaml" --output_folder "$out" "$@" "${backend[@]}"
}

launch_train() {  # launch_train OUTPUT_DIR ARGS...: the driver's recipe on --data and its tokenizer, --train_args, ARGS
  local out=$1; shift
  local args=(--data_folder "$data" --tokenizer_dir "$data/tokenizer")
  [ -z "$tokenizer_type" ] || args+=(--tokenizer_type "$tokenizer_type")
  [ -z "$vocab_size" ] || args+=(--vocab_size "$vocab_size")
  # shellcheck disable=SC2206  # --train_args is a string of words
  args+=($train_args)
  launch_recipe "$recipe" "$hparams" "$out" "${args[@]}" "$@"
}

pretrain() {  # pretrain DIR EPOCHS ARGS...: a canary-free baseline, EPOCHS epochs on $data/train.csv, in DIR (log: DIR.log);
  # train.py finishes at once a finished pre-training, and refuses one made with other settings
  local dir=$1 epochs=$2 done_before=false; shift 2
  [ -f "$dir/.trained" ] && done_before=true
  mkdir -p "$dir"
  # (no canaries file: none is in its training set, and its record must not change when the canaries do)
  launch_train "$dir" --mode train --clipping none --virtual_cores 1 --train_csv "$data/train.csv" --canaries_csv "" \
    --number_of_epochs "$epochs" "$@" >> "$dir.log" 2>&1 || die "pre-training failed: $(error_line "$dir.log") (log: $dir.log)"
  if [ "$done_before" = true ]; then log "pre-training already done with these settings ($dir/fingerprint.json)"
  else touch "$dir/.trained"; log "pre-trained $dir: $(tail -n 1 "$dir/train_log.txt")"; fi
}

start_from() {  # start_from PRETRAINED DIR: DIR's training starts from PRETRAINED's checkpoint (its epoch counter
  # continues: a run trains to pre-training + its own epochs). Copied once, with PRETRAINED's fingerprint as
  # DIR/init_fingerprint.json, which becomes part of DIR's own (a run on another pre-training is refused); later
  # calls leave DIR's own checkpoints. Returns non-zero on failure (it runs under in_parallel).
  local from=$1 dir=$2
  [ -d "$dir/save" ] && return 0
  rm -rf "$dir/.save.partial"
  cp "$from/fingerprint.json" "$dir/init_fingerprint.json" && cp -r "$from/save" "$dir/.save.partial" \
    && mv "$dir/.save.partial" "$dir/save"
}

train_command() {  # train_command METHOD SEED ARGS... : one run of the method comparison
  local method=$1 seed=$2; shift 2
  local args=(--seed "$seed" --clipping "$(clipping_of "$method")")
  # From a pre-training: the epoch counter continues from it, and decoding takes the last checkpoint (the
  # best by dev WER could be the copied pre-training, which never saw a canary)
  [ "$pretrain_epochs" -eq 0 ] || args+=(--number_of_epochs "$((pretrain_epochs + finetune_epochs))"
                                         --decode_checkpoint last)
  if [ -n "$virtual_cores" ]; then args+=(--virtual_cores "$virtual_cores")
  # Plain data parallelism: with equal cores the mean of the per-core mean gradients is the batch mean,
  # so the baseline takes one backward per process instead of one per virtual core (same update, faster).
  elif [ "$method" = baseline ]; then args+=(--virtual_cores 1); fi
  [ -n "$clip_bound" ] && args+=(--clip_bound "$clip_bound")
  launch_train "$(run_dir "$method" "$seed")" "${args[@]}" "$@"
}

in_parallel() {  # in_parallel FUNCTION ARGS... < LINES : FUNCTION ARGS... <the words of a line> per line, $jobs at a time
  # FUNCTION runs on the left of `||` (set -e does not apply): it must check its own commands.
  local fn=$1 line running=0 failed=0 cpus threads; shift
  local fixed=("$@")  # the arguments every call gets before its line's words
  cpus=$(command nproc)
  threads=$(( cpus / (jobs * nproc) ))  # each of the $jobs runs has $nproc processes
  [ "$threads" -ge 1 ] || threads=1
  while read -r line; do
    # shellcheck disable=SC2086  # a line is the function's arguments
    if [ "$jobs" -gt 1 ]; then (export OMP_NUM_THREADS=$threads; "$fn" "${fixed[@]}" $line) & else "$fn" "${fixed[@]}" $line & fi
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then wait -n || failed=1; running=$((running - 1)); fi
  done
  while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
  return "$failed"
}

stage_canaries() {  # stage_canaries CORPUS OUT ARGS...: canaries and holdout in OUT, and CORPUS/train.csv with them
  local corpus=$1 out=$2; shift 2
  local train_out=$corpus/train_with_canaries.csv
  [ "$out" = "$corpus/canaries" ] || train_out=$out/train_with_canaries.csv  # a variant keeps its own
  # privasr-canaries skips work already done, and redoes it when the corpus or the settings changed
  privasr-canaries --train-in "$corpus/train.csv" --train-out "$train_out" --out "$out" --nj "$nj" "$@" 2>&1
}

tokenizer_from_hparams() {  # the recipe YAML's tokenizer (vocab_size, tokenizer_type), unless given as options
  $python -c "import sys; from privasr.cli.hparams import yaml_defaults; h = yaml_defaults(sys.argv[1]);
print('--vocab-size', sys.argv[2] or h['vocab_size'], '--model-type', sys.argv[3] or h['tokenizer_type'])" \
    "$PRIVASR_ROOT/$recipe/$hparams" "$vocab_size" "$tokenizer_type"
}

stage_tokenizer() {  # stage_tokenizer DATA: the tokenizer of DATA/train.csv in DATA/tokenizer
  # shellcheck disable=SC2046  # two options and their values
  $python -m privasr.tokenizer --manifest "$1/train.csv" --out "$1/tokenizer" $(tokenizer_from_hparams)
}

error_line() {  # error_line LOG: the one-line error a failed command of privasr wrote (or its log's last line)
  local line; line=$(grep -E "(^|[[:space:]])[^[:space:]]+: error: " "$1" | tail -n 1)
  echo "${line:-$(tail -n 1 "$1")}"
}

train_one() {  # train_one METHOD SEED: train.py resumes an unfinished run, finishes at once a finished one,
  # and refuses a folder trained with other settings (its fingerprint.json: see privasr.provenance)
  local method=$1 seed=$2 dir; dir=$(run_dir "$1" "$2")
  mkdir -p "$dir"
  if [ "$pretrain_epochs" -gt 0 ] && ! start_from "$exp/pretrain" "$dir"; then
    log "FAILED: training $method seed $seed: cannot copy the pre-trained checkpoint $exp/pretrain/save"; return 1
  fi
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

stage_train() {  # (after the shared pre-training, with --pretrain_epochs > 0, or the kept one, with --pretrained)
  if [ -n "$pretrained" ]; then
    $python -m privasr.cli.pretrained install "$pretrained" --run "$exp/pretrain" || die "installing the kept pre-training failed"
  elif [ "$pretrain_epochs" -gt 0 ]; then pretrain "$exp/pretrain" "$pretrain_epochs"; fi
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

use_pretrained() {  # with --pretrained: check it before any stage (one line if it is not what it says), take its
  # epochs as --pretrain_epochs and its model settings as --train_args defaults (a fine-tuning keeps its model)
  [ -n "$pretrained" ] || return 0
  ! given pretrain_epochs || die "--pretrained and --pretrain_epochs: a kept pre-training has its own epochs; give one of them"
  local opt; for opt in tokenizer_type vocab_size; do
    ! given "$opt" || die "--pretrained and --$opt: the tokenizer and model come from the kept pre-training; give one of them"
  done
  local description model_args
  description=$($python -m privasr.cli.pretrained verify "$pretrained" 2>&1) || die "--pretrained: ${description#*error: }"
  pretrain_epochs=$($python -m privasr.cli.pretrained epochs "$pretrained")
  model_args=$($python -m privasr.cli.pretrained model-args "$pretrained")
  train_args=$(with_defaults "$model_args" "$train_args")
  log "kept pre-training $description"
}

stage_tokenizer_or_kept() {  # stage_tokenizer_or_kept DATA: the tokenizer of DATA/train.csv, or the kept pre-training's
  if [ -z "$pretrained" ]; then stage_tokenizer "$1"
  else $python -m privasr.cli.pretrained install "$pretrained" --tokenizer "$1/tokenizer" || die "installing the kept tokenizer failed"; fi
}

run_stages() {  # run_stages CORPUS_ARGS CANARY_ARGS: the method comparison (run.sh of every corpus)
  use_pretrained
  # shellcheck disable=SC2086  # each a string of words
  run_stage 0 "corpus" corpus_prepare "$data" $1
  run_stage 1 "manifests" corpus_manifests "$data"
  # shellcheck disable=SC2086
  run_stage 2 "canaries" stage_canaries "$data" "$data/canaries" $2
  run_stage 3 "tokenizer${pretrained:+ (from the kept pre-training)}" stage_tokenizer_or_kept "$data"
  local from=""; [ "$pretrain_epochs" -eq 0 ] || from="pre-train $pretrain_epochs epochs without canaries, then "
  [ -z "$pretrained" ] || from="install the kept pre-training ($pretrain_epochs epochs), then fine-tune: "
  run_stage 4 "${from}train ($methods) x seeds ($seeds)" stage_train
  run_stage 5 "decode test, dev, canaries, holdout" stage_decode
  run_stage 6 "score -> $exp/RESULTS.md" stage_score
  # shellcheck disable=SC2119  # no NOTE
  stages_done
}
