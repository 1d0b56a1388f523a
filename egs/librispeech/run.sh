#!/usr/bin/env bash
# LibriSpeech with the paper's setup (Conformer XL transducer, 128 cores x 4, PCC@2.5).
#   egs/librispeech/run.sh --librispeech_root /data/LibriSpeech --nproc 8 --virtual_cores 16 --train_args "--batch_size=64"
#   (8 processes x 16 virtual cores = 128 cores; batch_size per process = 16 x per-core batch 4)
# Stages live in ../lib/stages.sh; only this corpus's settings are here.
cd "$(dirname "$0")"
recipe=recipes/LibriSpeech/ASR/conformer
hparams=hparams/conformer_xl_transducer.yaml
librispeech_root=
train_splits="train-clean-100 train-clean-360 train-other-500"
methods="baseline pcc apcc"
vocab_size=1024
canary_args="--per-count 20 --holdout 1000"
extra_options="librispeech_root train_splits vocab_size canary_args"
source ../lib/stages.sh
parse_options "$@"
tokenizer_args="--vocab-size $vocab_size --model-type unigram"
train_args="--vocab_size=$vocab_size $train_args"

corpus_prepare() {  # LibriSpeech is not downloaded here: check it is where we are told
  [ -n "$librispeech_root" ] || die "give --librispeech_root /path/to/LibriSpeech (the corpus is not downloaded by this recipe)"
  local split
  for split in $train_splits dev-clean test-clean; do
    [ -d "$librispeech_root/$split" ] || [ -d "$librispeech_root/LibriSpeech/$split" ] \
      || die "LibriSpeech split '$split' not found under $librispeech_root"
  done
  log "LibriSpeech found at $librispeech_root"
}

corpus_manifests() {
  # shellcheck disable=SC2086
  $python -m privasr.data.librispeech --root "$librispeech_root" --splits $train_splits dev-clean test-clean \
    --out "$data/librispeech" --nj "$nj" || die "LibriSpeech preparation failed"
  $python - "$data" $train_splits <<'PY'
import sys
from privasr.data.manifest import read_manifest, write_manifest
data, splits = sys.argv[1], sys.argv[2:]
write_manifest(f"{data}/train.csv", [u for s in splits for u in read_manifest(f"{data}/librispeech/{s}.csv")])
for name, split in (("dev", "dev-clean"), ("test", "test-clean")):
    write_manifest(f"{data}/{name}.csv", read_manifest(f"{data}/librispeech/{split}.csv"))
PY
  log "manifests: $data/train.csv ($train_splits), dev.csv (dev-clean), test.csv (test-clean)"
}

run_stages
