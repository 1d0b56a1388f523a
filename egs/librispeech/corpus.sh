# LibriSpeech's corpus stages (0: check the corpus is there, 1: manifests), shared by run.sh
# and run_dp.sh. Neither corpus is downloaded. Expects $python, $data, $nj, $librispeech_root,
# $train_splits, optionally $librilight_root/$librilight_subsets (pre-training audio), and the
# log/die helpers of ../lib/stages.sh.

corpus_prepare() {
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

corpus_manifests() {  # each manifest is written once; re-running the stage checks and skips
  # shellcheck disable=SC2086
  $python -m privasr.data.librispeech --root "$librispeech_root" --splits $train_splits dev-clean test-clean \
    --out "$data/librispeech" --nj "$nj" --recipe-dir "$data" --train-splits $train_splits \
    || die "LibriSpeech preparation failed"
  log "manifests: $data/train.csv ($train_splits), dev.csv (dev-clean), test.csv (test-clean)"
  [ -n "${librilight_root:-}" ] || return 0
  # shellcheck disable=SC2086
  $python -m privasr.data.librilight --root "$librilight_root" --subsets $librilight_subsets \
    --out "$data/librilight.csv" --nj "$nj" || die "Libri-Light preparation failed"
  log "pre-training audio: $data/librilight.csv (Libri-Light $librilight_subsets)"
}
