#!/usr/bin/env bash
# mini_tts: the embedded corpus, synthesized here with espeak-ng/flite, end to end.
#   egs/mini_tts/run.sh                          # all stages: pre-train, then baseline, PCC, APCC with canaries
#   egs/mini_tts/run.sh --quick true             # a few minutes: tiny corpus, 1 epoch (CI)
#   egs/mini_tts/run.sh --stage 4 --stop_stage 6 --methods "pcc" --clip_bound 0.5
#   egs/mini_tts/run.sh --pretrain_epochs 0 --train_args "--number_of_epochs=4"
#       # each method trained from scratch with the canaries (the job of earlier releases)
# Stages live in ../lib/stages.sh (run_stages) and corpus.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/mini_tts/ASR/conformer
hparams=hparams/conformer_ctc.yaml
extra_options="quick corpus_args canary_args pretrain_epochs finetune_epochs"
source ../lib/stages.sh
source corpus.sh
quick=false       # true: the same job in about a minute (CI): tiny corpus, model and canaries, 1 epoch
corpus_args=""    # empty: 2,000 / 200 / 200 utterances (quick: 120 / 20 / 20)
canary_args=""    # empty: 10 canaries per count 1/2/4/8/16, a 1,000 holdout (quick: 2 per count 1/4, holdout 20)
pretrain_epochs=6 # stage 4 pre-trains one canary-free baseline this long, then each method fine-tunes it (quick: 1)
parse_options "$@"
require_bool quick

if [ "$quick" = true ]; then  # quick's own folders, sizes and overrides, unless given on the command line
  given data || data=data_quick; given exp || exp=exp_quick
  : "${corpus_args:=$quick_corpus_args}" "${canary_args:=$quick_canary_args}"
  : "${virtual_cores:=4}"
  given pretrain_epochs || pretrain_epochs=1
  epochs="--number_of_epochs=1 "; [ "$pretrain_epochs" -eq 0 ] || epochs=""  # (from a pre-training: 1 + 1 epochs)
  train_args=$(with_defaults "$epochs--batch_size=8 --train_eval_size=20 --model_size=tiny" "$train_args")
fi
# Sized for 30 minutes on 2 CPU cores (a 6-epoch pre-training, then 3 methods x 1 epoch with the canaries, 125 and
# 144 steps an epoch); the study (run_study.sh) is where the regimes are compared at length.
: "${corpus_args:=--num-train 2000 --num-dev 200 --num-test 200}" "${canary_args:=--per-count 10 --holdout 1000}"

run_stages "$corpus_args" "$canary_args"
