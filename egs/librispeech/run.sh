#!/usr/bin/env bash
# LibriSpeech with the paper's setup (Conformer XL transducer, 128 cores x 4, PCC@2.5).
#   egs/librispeech/run.sh --librispeech_root /data/LibriSpeech --nproc 8 --virtual_cores 16 --train_args "--batch_size=64"
#   (8 processes x 16 virtual cores = 128 cores; batch_size per process = 16 x per-core batch 4)
# The tokenizer (unigram, 1,024 pieces) is the YAML's; --vocab_size N changes it and the model together.
# Stages live in ../lib/stages.sh and corpus.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/LibriSpeech/ASR/conformer
hparams=hparams/conformer_xl_transducer.yaml
extra_options="librispeech_root train_splits canary_args pretrain_epochs finetune_epochs"
source ../lib/stages.sh
source corpus.sh
librispeech_root=                                               # the LibriSpeech folder (not downloaded)
train_splits="train-clean-100 train-clean-360 train-other-500"  # the training splits (960 h)
canary_args="--per-count 20 --holdout 1000"                     # privasr-canaries options
parse_options "$@"

run_stages "" "$canary_args"
