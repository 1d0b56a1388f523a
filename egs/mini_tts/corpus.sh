# mini_tts's corpus stages (0: synthesize, 1: check manifests), shared by run.sh and run_study.sh.
# Expects $python, $data, $nj, $corpus_args and the log/die helpers of ../lib/stages.sh.

# The CI-sized corpus and canaries both drivers use with --quick true
quick_corpus_args="--num-train 120 --num-dev 20 --num-test 20"
quick_canary_args="--per-count 2 --counts 1 4 --holdout 20"

corpus_prepare() {
  # shellcheck disable=SC2086
  $python -m privasr.data.mini_tts --out "$data" --nj "$nj" $corpus_args
}

corpus_manifests() {  # mini_tts writes its manifests while synthesizing: check them
  $python -c "import sys; from privasr.data.manifest import read_manifest as r; [r(f) for f in sys.argv[1:]]" \
    "$data/train.csv" "$data/dev.csv" "$data/test.csv" || die "the mini_tts manifests in $data are broken"
  log "manifests: $(($(wc -l < "$data/train.csv") - 1)) train, $(($(wc -l < "$data/dev.csv") - 1)) dev," \
      "$(($(wc -l < "$data/test.csv") - 1)) test utterances"
}
