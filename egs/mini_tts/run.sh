#!/usr/bin/env bash
# mini_tts: the embedded corpus, synthesized here with espeak-ng/flite, end to end.
#   egs/mini_tts/run.sh                          # all stages: the kept well-fit pre-training (pretrained/wellfit),
#                                                # fine-tuned by baseline, PCC, APCC and PEC with outlier canaries
#   egs/mini_tts/run.sh --quick true             # a few minutes: tiny corpus and model, its own 1-epoch pre-training (CI)
#   egs/mini_tts/run.sh --pretrained "" --methods "baseline pcc apcc"
#       # the job of the previous release: its own 6-epoch pre-training on 2,000 utterances, espeak-ng canaries
#   egs/mini_tts/run.sh --stage 4 --stop_stage 6 --methods "pcc" --clip_bound 0.5
#   egs/mini_tts/run.sh --pretrained "" --pretrain_epochs 0 --train_args "--number_of_epochs=4"
#       # each method trained from scratch with the canaries (the job of earlier releases)
# Stages live in ../lib/stages.sh (run_stages) and corpus.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/mini_tts/ASR/conformer
hparams=hparams/conformer_ctc.yaml
extra_options="quick corpus_args canary_args pretrain_epochs finetune_epochs pretrained"
source ../lib/stages.sh
source corpus.sh
quick=false       # true: the same job in about a minute (CI): tiny corpus, model and canaries, 1 epoch
corpus_args=""    # empty: 2,000 / 200 / 200 espeak-ng utterances, the kept pre-training's first (quick: 120 / 20 / 20; without --pretrained: espeak-ng and flite voices)
canary_args=""    # empty: flite slt 110 wpm x 4, 10 canaries per count 1/2/4/8, a 1,000 holdout (quick: 2 per count 1/4, holdout 20; without --pretrained: espeak-ng, counts 1-16)
pretrained=pretrained/wellfit  # the kept pre-training every method fine-tunes (quick, or empty: pre-train here, --pretrain_epochs)
pretrain_epochs=6 # without --pretrained: stage 4 pre-trains one canary-free baseline this long (quick: 1)
methods="baseline pcc apcc pec"
jobs=2            # two runs at a time, 1 thread each (2 cores)
parse_options "$@"
require_bool quick

if [ "$quick" = true ]; then  # quick's own folders, sizes and overrides, unless given on the command line
  given data || data=data_quick; given exp || exp=exp_quick
  : "${corpus_args:=$quick_corpus_args}" "${canary_args:=$quick_canary_args}"
  : "${virtual_cores:=4}"
  given pretrained || pretrained=""
  given pretrain_epochs || pretrain_epochs=1
  epochs="--number_of_epochs=1 "; [ "$pretrain_epochs" -eq 0 ] || epochs=""  # (from a pre-training: 1 + 1 epochs)
  train_args=$(with_defaults "$epochs--batch_size=8 --train_eval_size=20 --model_size=tiny" "$train_args")
fi
# The regime where clipping curbs memorization (README, "The regime"): a well-fit model (the kept pre-training: 8
# epochs on 10,000 espeak-ng utterances, characters at 20 ms frames) fine-tuned 1 epoch on 2,000 of its utterances
# with canaries from an engine it never heard (flite). Sized for 30 minutes on 2 CPU cores; the study
# (run_study.sh) is where the regimes are compared at length.
if [ "$quick" = false ] && [ -n "$pretrained" ]; then
  : "${corpus_args:=--num-train 2000 --num-dev 200 --num-test 200 --no-flite}"
  : "${canary_args:=--engine flite --voice slt --rate 110 --speed 4 --per-count 10 --counts 1 2 4 8 --holdout 1000 --frame-ms 20}"
fi
: "${corpus_args:=--num-train 2000 --num-dev 200 --num-test 200}" "${canary_args:=--per-count 10 --holdout 1000}"

run_stages "$corpus_args" "$canary_args"
