#!/usr/bin/env bash
# DP pre-training on mini_tts: BEST-RQ on the (unlabeled) audio with DP-SGD -- public warm-start,
# LayerFreeze, per-layer clipping -- then CTC fine-tuning on the labeled train set from the DP
# encoder (and, with --baseline true, from scratch); exp/dp/RESULTS.md puts the WER next to the
# encoder's (epsilon, delta).
#   egs/mini_tts/run_dp.sh                           # < 20 minutes on 2 idle CPU cores
#   egs/mini_tts/run_dp.sh --baseline true           # + the same fine-tuning from scratch (~7 min more)
#   egs/mini_tts/run_dp.sh --quick true              # about a minute: tiny corpus and model (CI)
#   egs/mini_tts/run_dp.sh --stage 3 --pretrain_args "--noise_multiplier 1.5 --target_epsilon 4"
# Stages: 0 corpus, 1 manifests, 2 tokenizer, 3 DP pre-training, 4 fine-tuning from the DP encoder,
#         5 fine-tuning from scratch (with --baseline true), 6 results.
# Stages live in ../lib/stages.sh and ../lib/dp_stages.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/mini_tts/ASR/conformer
hparams=hparams/finetune_ctc.yaml
extra_options="quick corpus_args model_size ssl_hparams pretrain_args baseline"
source ../lib/stages.sh
source ../lib/dp_stages.sh
source corpus.sh
data=data_dp
exp=exp/dp
quick=false          # true: about a minute (CI): a 60-utterance corpus, the tiny encoder, one epoch each
corpus_args=""       # empty: 1,000 / 100 / 100 utterances (quick: 60 / 10 / 10)
model_size=""        # encoder size for pre-training and fine-tuning; empty: mini (quick: tiny)
ssl_hparams=""       # the pre-training YAML; empty: hparams/bestrq_dp.yaml (quick: hparams/bestrq_dp_quick.yaml)
baseline=""          # true: also fine-tune from scratch (stage 5); empty: false
parse_options "$@"
require_bool quick
if [ "$quick" = true ]; then  # CI: a 60-utterance corpus, the tiny encoder, one epoch each
  given data || data=data_dp_quick; given exp || exp=exp_quick/dp
  : "${corpus_args:=--num-train 60 --num-dev 10 --num-test 10}" "${model_size:=tiny}" \
    "${ssl_hparams:=hparams/bestrq_dp_quick.yaml}" "${baseline:=false}"
  train_args=$(with_defaults "--number_of_epochs=1 --batch_size=8 --train_eval_size=10" "$train_args")  # fine-tuning overrides
else
  : "${corpus_args:=--num-train 1000 --num-dev 100 --num-test 100}" "${model_size:=mini}" \
    "${ssl_hparams:=hparams/bestrq_dp.yaml}" "${baseline:=false}"
  train_args=$(with_defaults "--number_of_epochs=4 --batch_size=8 --train_eval_size=100" "$train_args")
fi

run_dp_stages "$corpus_args"
