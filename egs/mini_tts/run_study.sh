#!/usr/bin/env bash
# The mitigation study on mini_tts: pre-train without canaries, then fine-tune with them under every
# configuration of conf/study.yaml (baseline, PEC, PCC/APCC at per-core batch 2/4/8, bounds from norm
# quantiles), decode, and write exp_study/RESULTS.md. Resumable: re-run the same command.
#   egs/mini_tts/run_study.sh --jobs 2            # two fine-tunings at a time (1 thread each)
#   egs/mini_tts/run_study.sh --stage 6 --configs "baseline pcc_B2_p10" --seeds "1"
#   egs/mini_tts/run_study.sh --quick true        # minutes: tiny corpus and model, conf/study_quick.yaml
#   egs/mini_tts/run_study.sh --variant rare --canary_args "--per-count 2 --holdout 4000" --stage 2
#       # other canaries on the same corpus and pre-training -> exp_study/rare/RESULTS.md
#   egs/mini_tts/run_study.sh --variant rare10k --variant_corpus_args "--num-train 10000 --num-dev 200 --num-test 200" \
#       --canary_args "--per-count 2 --holdout 4000" --configs "baseline_ft1 pcc_B2_p10_ft1"
#       # canary rarity: a larger fine-tuning corpus (data_study_rare10k) and fewer canaries, same pre-training
# Stages: 0 corpus, 1 manifests, 2 canaries (holdout 4,000), 3 tokenizer, 4 pre-train,
#         5 norm quantiles and canary gradient ratios r, 6 fine-tune grid, 7 decode, 8 score.
cd "$(dirname "$0")"
recipe=recipes/mini_tts/ASR/conformer
hparams=hparams/conformer_ctc.yaml
extra_options="study configs corpus_args canary_args quick variant variant_corpus_args"
source ../lib/stages.sh   # the library's defaults first, then this driver's
source corpus.sh
declare_stages 8 "0 corpus, 1 manifests, 2 canaries, 3 tokenizer, 4 pre-train, 5 norm quantiles and r, 6 fine-tune grid, 7 decode, 8 score"
seeds_may_be_empty=true             # an empty --seeds: the seeds of $study
study=conf/study.yaml               # the grid: configurations, seeds, epochs
data=data_study
exp=exp_study
configs=""        # empty: every configuration of $study
corpus_args=""    # empty: the variant's (full or quick) corpus size
canary_args=""    # empty: 10 canaries per count and a 4,000 holdout (quick: 2 per count, counts 1 4, holdout 20)
quick=false       # true: minutes (tiny corpus and model, conf/study_quick.yaml)
seeds=""          # empty: the seeds of $study
variant=""        # a canary variant (--canary_args) of the same corpus and pre-training; results in $exp/$variant
variant_corpus_args=""  # a variant's own fine-tuning corpus in ${data}_$variant (mini_tts options, same seed:
                        # its first utterances and its dev/test are $data's, so the pre-training saw a subset)
invocation="egs/mini_tts/run_study.sh$(printf ' %q' "$@")"
parse_options "$@"
require_bool quick
if [ "$quick" = true ]; then
  given study || study=conf/study_quick.yaml; given data || data=data_study_quick; given exp || exp=exp_study_quick
  : "${corpus_args:=$quick_corpus_args}" "${canary_args:=$quick_canary_args}"
  train_args=$(with_defaults "--train_eval_size=20 --model_size=tiny" "$train_args")
fi
: "${corpus_args:=--num-train 3000 --num-dev 200 --num-test 200}" "${canary_args:=--per-count 10 --holdout 4000}"
methods=baseline  # the stage library's method list is not used here
# The folders of this invocation, passed to the stages below as arguments (the pre-training, norm quantiles
# and r always use $data and $exp/pretrain):
#   CANARIES  the canaries, holdout and training manifest with them ($data/canaries, a variant's own)
#   RUNS      the fine-tuned runs and RESULTS.md ($exp, a variant's $exp/$variant)
#   FINETUNE  the corpus the canaries are inserted into ($data, or a variant's own ${data}_$variant)
canaries=$data/canaries; runs=$exp; finetune_data=$data
[ -z "$variant_corpus_args" ] || [ -n "$variant" ] || die "--variant_corpus_args needs --variant NAME"
if [ -n "$variant" ]; then
  [[ "$variant" =~ ^[A-Za-z0-9_-]+$ ]] || die "--variant takes a name of letters, digits, - and _, got '$variant'"
  canaries=$data/canaries_$variant; runs=$exp/$variant
  [ -z "$variant_corpus_args" ] || finetune_data=${data%/}_$variant
fi

study_py() { $python -m privasr.study "$@"; }

pretrained_overrides() {  # pretrained_overrides ARGS...: NUL-separated, the train.py overrides after `--` that
  # point a measuring tool (privasr-norm-quantiles, privasr-canary-gradients) at the pre-trained model on $data:
  # its folder and corpus, ARGS, then --train_args and the tokenizer options given
  # shellcheck disable=SC2086  # --train_args is a string of words
  printf '%s\0' --output_folder "$exp/pretrain" --data_folder "$data" --tokenizer_dir "$data/tokenizer" \
    --train_csv "$data/train.csv" "$@" $train_args \
    ${vocab_size:+--vocab_size "$vocab_size"} ${tokenizer_type:+--tokenizer_type "$tokenizer_type"}
}

launch_on_canaries() {  # launch_on_canaries CANARIES DIR ARGS...: launch_train DIR ARGS..., trained and decoded
  # with the canaries in CANARIES (a variant's own: its manifests given; $data/canaries: the YAML's defaults)
  local canaries=$1 dir=$2; shift 2
  local on=()
  [ "$canaries" = "$data/canaries" ] || on=(--train_csv "$canaries/train_with_canaries.csv"
                                          --canaries_csv "$canaries/canaries.csv" --holdout_csv "$canaries/holdout.csv")
  launch_train "$dir" "$@" "${on[@]}"
}

stage_corpus() {  # stage_corpus FINETUNE: the corpus, and a variant's own fine-tuning corpus FINETUNE
  local finetune_data=$1
  # shellcheck disable=SC2086  # strings of words
  corpus_prepare "$data" $corpus_args
  # shellcheck disable=SC2086
  [ "$finetune_data" = "$data" ] || corpus_prepare "$finetune_data" $variant_corpus_args
}

stage_manifests() {  # stage_manifests FINETUNE
  local finetune_data=$1
  corpus_manifests "$data"
  [ "$finetune_data" = "$data" ] || corpus_manifests "$finetune_data"
}

stage_pretrain() { pretrain "$exp/pretrain" "$(study_py get "$study" pretrain_epochs)"; }

stage_quantiles() {
  mkdir -p "$exp/quantiles"
  local per_core reduction batches overrides
  batches=$(study_py get "$study" quantile_batches)
  study_py quantiles-needed "$study" | while read -r per_core reduction; do
    local out="$exp/quantiles/B${per_core}_${reduction}.json"
    [ -f "$out" ] && { log "norm quantiles B=$per_core ($reduction) already measured"; continue; }
    mapfile -d '' -t overrides < <(pretrained_overrides --loss_reduction "$reduction")
    privasr-norm-quantiles "$PRIVASR_ROOT/$recipe/$hparams" --per-core "$per_core" --batches "$batches" --json "$out" -- \
      "${overrides[@]}" < /dev/null 2>> "$exp/quantiles.log" \
      | sed 's/^/    /' || die "measuring norm quantiles failed; see $exp/quantiles.log"
  done
}

stage_canary_gradients() {  # stage_canary_gradients CANARIES RUNS: r, a canary's per-example gradient norm over a
  # normal one's, on the pre-trained model, for the canaries in CANARIES -> RUNS/canary_gradients.json
  local canaries=$1 runs=$2 overrides
  local out="$runs/canary_gradients.json"
  mkdir -p "$runs"
  if study_py r-current "$out" --canaries "$canaries/canaries.csv" --pretrain "$exp/pretrain/save"; then
    log "canary gradient ratios r already measured ($out)"; return
  fi
  mapfile -d '' -t overrides < <(pretrained_overrides)
  # shellcheck disable=SC2046  # the per-core values
  privasr-canary-gradients "$PRIVASR_ROOT/$recipe/$hparams" --canaries "$canaries/canaries.csv" \
    --normal-csv "$data/train.csv" --normal "$(study_py get "$study" r_normal)" \
    --per-core $(study_py per-core-values "$study") --json "$out" -- "${overrides[@]}" < /dev/null \
    2>> "$exp/canary_gradients.log" | sed 's/^/    /' || die "measuring canary gradient ratios failed; see $exp/canary_gradients.log"
}

planned_runs() {  # "name seed overrides..." of the selected configurations and seeds
  study_py plan "$study" --quantiles "$exp/quantiles" | while read -r name seed rest; do
    { [ -z "$configs" ] || [[ " $configs " == *" $name "* ]]; } || continue
    { [ -z "$seeds" ] || [[ " $seeds " == *" $seed "* ]]; } || continue
    echo "$name $seed $rest"
  done
}

finetune_one() {  # finetune_one CANARIES RUNS NAME SEED OVERRIDES...: RUNS/NAME/seedSEED on the canaries in CANARIES
  local canaries=$1 runs=$2 name=$3 seed=$4; shift 4
  local dir="$runs/$name/seed$seed"
  mkdir -p "$dir"
  # number_of_epochs = pretrain + finetune epochs (the plan's); train.py refuses a folder fine-tuned with other
  # settings or canaries (a variant re-run with new options). (this runs under in_parallel, where set -e does not
  # apply: every step checks itself)
  start_from "$exp/pretrain" "$dir" \
    || { log "FAILED: $name seed $seed: cannot copy the pre-trained checkpoint $exp/pretrain/save"; return 1; }
  launch_on_canaries "$canaries" "$dir" --mode train --seed "$seed" "$@" >> "$dir/train.log" 2>&1 \
    || { log "FAILED: $name seed $seed: $(error_line "$dir/train.log") (log: $dir/train.log)"; return 1; }
  touch "$dir/.trained"
  log "fine-tuned $name seed $seed"
}

stage_finetune() {  # stage_finetune CANARIES RUNS COMMAND: the planned runs in RUNS; COMMAND into RUNS/commands.txt
  local canaries=$1 runs=$2 command=$3
  [ -f "$exp/pretrain/.trained" ] || die "no pre-trained model in $exp/pretrain: run stage 4 first"
  # RESULTS.md lists the commands that trained its runs
  mkdir -p "$runs"
  grep -qxF -- "$command" "$runs/commands.txt" 2>/dev/null || echo "$command" >> "$runs/commands.txt"
  in_parallel finetune_one "$canaries" "$runs" < <(planned_runs) || die "some fine-tuning runs failed (see the FAILED lines)"
}

decode_config() {  # decode_config CANARIES RUNS NAME SEED OVERRIDES...
  local canaries=$1 runs=$2 name=$3 seed=$4; shift 4
  local dir="$runs/$name/seed$seed"
  # train.py decodes unless hyps/provenance.json says this checkpoint and these manifests already were
  launch_on_canaries "$canaries" "$dir" --mode decode --decode_checkpoint last --seed "$seed" "$@" \
    >> "$dir/decode.log" 2>&1 \
    || { log "FAILED: decoding $name seed $seed: $(error_line "$dir/decode.log") (log: $dir/decode.log)"; return 1; }
}

stage_decode_grid() {  # stage_decode_grid CANARIES RUNS
  in_parallel decode_config "$1" "$2" < <(planned_runs) || die "some decoding runs failed (see the FAILED lines)"
}

stage_measure() { stage_quantiles; stage_canary_gradients "$1" "$2"; }  # stage_measure CANARIES RUNS

stage_score_study() {  # stage_score_study CANARIES RUNS: RUNS/RESULTS.md
  local canaries=$1 runs=$2
  study_py score "$study" --exp "$runs" --commands "$runs/commands.txt" --canaries "$canaries/canaries.csv" \
    --holdout "$canaries/holdout.csv" --quantiles "$exp/quantiles" --pretrain "$exp/pretrain/save"
}

run_stage 0 "corpus" stage_corpus "$finetune_data"
run_stage 1 "manifests" stage_manifests "$finetune_data"
# shellcheck disable=SC2086  # a string of words
run_stage 2 "canaries ($canary_args) in $finetune_data/train.csv -> $canaries" \
  stage_canaries "$finetune_data" "$canaries" $canary_args
run_stage 3 "tokenizer" stage_tokenizer "$data"
run_stage 4 "pre-train without canaries" stage_pretrain
run_stage 5 "per-core norm quantiles and canary gradient ratios r of the pre-trained model" \
  stage_measure "$canaries" "$runs"
run_stage 6 "fine-tune the grid with canaries ($jobs at a time) -> $runs" stage_finetune "$canaries" "$runs" "$invocation"
run_stage 7 "decode" stage_decode_grid "$canaries" "$runs"
run_stage 8 "score -> $runs/RESULTS.md" stage_score_study "$canaries" "$runs"
# shellcheck disable=SC2119  # no NOTE
stages_done
