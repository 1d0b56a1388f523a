#!/usr/bin/env bash
# mini_tts: the embedded corpus, synthesized here with espeak-ng/flite, end to end.
#   egs/mini_tts/run.sh                          # all stages: baseline, PCC, APCC
#   egs/mini_tts/run.sh --quick true             # a few minutes: tiny corpus, 1 epoch (CI)
#   egs/mini_tts/run.sh --stage 4 --stop_stage 6 --methods "pcc" --clip_bound 0.5
# Stages live in ../lib/stages.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/mini_tts/ASR/conformer
hparams=hparams/conformer_ctc.yaml
quick=false
extra_options="quick"
source ../lib/stages.sh
parse_options "$@"
require_bool quick

corpus_args="--num-train 3000 --num-dev 200 --num-test 200"
canary_args="--per-count 20 --holdout 1000"
if [ "$quick" = true ]; then
  data=${data/#data/data_quick}; exp=${exp/#exp/exp_quick}
  corpus_args="--num-train 120 --num-dev 20 --num-test 20"
  canary_args="--per-count 2 --counts 1 4 --holdout 20"
  : "${virtual_cores:=4}"
  train_args="--number_of_epochs=1 --batch_size=8 --train_eval_size=20 --model_size=tiny $train_args"
fi

source corpus.sh
run_stages
