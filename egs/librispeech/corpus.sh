# shellcheck shell=bash disable=SC2154  # $python, --nj and the drivers' options come from ../lib/stages.sh and them
# LibriSpeech's corpus stages (0: check the corpus is there, 1: manifests), shared by run.sh and run_dp.sh.
# Neither corpus is downloaded. Sourced after ../lib/stages.sh (for $python, --nj, log and die); reads its
# drivers' options --librispeech_root and --train_splits, and, for run_dp.sh, --librilight_root and
# --librilight_subsets (the pre-training audio; empty root: none):
#   corpus_prepare DATA      check that the splits (and Libri-Light subsets) are there
#   corpus_manifests DATA    DATA/train.csv, dev.csv, test.csv (and DATA/librilight.csv), each written once

corpus_prepare() {  # corpus_prepare DATA (DATA unused: nothing is written)
  [ -n "$librispeech_root" ] || die "give --librispeech_root /path/to/LibriSpeech (the corpus is not downloaded by this recipe)"
  local split subset
  for split in $train_splits dev-clean test-clean; do
    [ -d "$librispeech_root/$split" ] || [ -d "$librispeech_root/LibriSpeech/$split" ] \
      || die "LibriSpeech split '$split' not found under $librispeech_root"
  done
  log "LibriSpeech found at $librispeech_root"
  [ -n "${librilight_root:-}" ] || return 0
  for subset in $librilight_subsets; do
    [ -d "$librilight_root/$subset" ] || die "Libri-Light subset '$subset' not found under $librilight_root"
  done
  log "Libri-Light found at $librilight_root ($librilight_subsets)"
}

corpus_manifests() {  # corpus_manifests DATA: each manifest is written once; re-running the stage checks and skips
  local dir=$1
  # shellcheck disable=SC2086  # --train_splits is a list of words
  $python -m privasr.data.librispeech --root "$librispeech_root" --splits $train_splits dev-clean test-clean \
    --out "$dir/librispeech" --nj "$nj" --recipe-dir "$dir" --train-splits $train_splits \
    || die "LibriSpeech preparation failed"
  log "manifests: $dir/train.csv ($train_splits), dev.csv (dev-clean), test.csv (test-clean)"
  [ -n "${librilight_root:-}" ] || return 0
  # shellcheck disable=SC2086
  $python -m privasr.data.librilight --root "$librilight_root" --subsets $librilight_subsets \
    --out "$dir/librilight.csv" --nj "$nj" || die "Libri-Light preparation failed"
  log "pre-training audio: $dir/librilight.csv (Libri-Light $librilight_subsets)"
}
