#!/usr/bin/env bash
# DP pre-training of a Conformer XL encoder on Libri-Light (BEST-RQ + DP-SGD: public warm-start on 1%,
# LayerFreeze, per-layer dim clipping, until (10, 1e-9)-DP), then CTC fine-tuning on LibriSpeech 960 h
# from that encoder (and, with --baseline true, from scratch); exp/dp/RESULTS.md puts WER next to epsilon.
#   egs/librispeech/run_dp.sh --librispeech_root /data/LibriSpeech --librilight_root /data/librilight_cut \
#       --nproc 8 --nj 16
# Libri-Light is read as <root>/<subset>/<speaker>/<book>/*.flac; cut it with libri-light's cut_by_vad.py
# first (segments <= 30 s). The settings are those of the paper, in the two YAML files below.
# Stages: 0 corpora present, 1 manifests, 2 tokenizer, 3 DP pre-training, 4 fine-tuning from the DP
#         encoder, 5 fine-tuning from scratch (with --baseline true), 6 results.
# Stages live in ../lib/stages.sh and ../lib/dp_stages.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/LibriSpeech/ASR/conformer
hparams=hparams/finetune_ctc_xl.yaml
extra_options="librispeech_root librilight_root librilight_subsets train_splits model_size pretrain_args baseline"
source ../lib/stages.sh
source ../lib/dp_stages.sh
source corpus.sh
ssl_recipe=recipes/LibriSpeech/SSL/bestrq
ssl_hparams=hparams/bestrq_dp_xl.yaml
model_size=XL                                                   # encoder size (pre-training and fine-tuning)
data=data_dp
exp=exp/dp
librispeech_root=                                               # the LibriSpeech folder (not downloaded)
librilight_root=                                                # the cut Libri-Light folder (not downloaded)
librilight_subsets="small medium large"                         # Libri-Light subsets to pre-train on
train_splits="train-clean-100 train-clean-360 train-other-500"  # LibriSpeech splits to fine-tune on (960 h)
baseline=false                                                  # true: also fine-tune from scratch (stage 5)
parse_options "$@"
[ -n "$librilight_root" ] || die "give --librilight_root /path/to/librilight (the pre-training audio; not downloaded)"

run_dp_stages ""
