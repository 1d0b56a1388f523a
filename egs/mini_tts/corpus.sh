# shellcheck shell=bash disable=SC2154  # $python and --nj come from ../lib/stages.sh, sourced first
# mini_tts's corpus stages (0: synthesize, 1: check manifests), shared by run.sh, run_study.sh and run_dp.sh.
# Sourced after ../lib/stages.sh (for $python, --nj, log and die):
#   corpus_prepare DATA ARGS...   synthesize the corpus into DATA (ARGS: privasr.data.mini_tts's, e.g. its sizes)
#   corpus_manifests DATA         check DATA's manifests (mini_tts writes them while synthesizing)

# The CI-sized corpus and canaries both drivers use with --quick true
# shellcheck disable=SC2034  # read by run.sh and run_study.sh
quick_corpus_args="--num-train 120 --num-dev 20 --num-test 20"
# shellcheck disable=SC2034
quick_canary_args="--per-count 2 --counts 1 4 --holdout 20"

corpus_prepare() {  # corpus_prepare DATA ARGS...
  local dir=$1; shift
  $python -m privasr.data.mini_tts --out "$dir" --nj "$nj" "$@"
}

corpus_manifests() {  # corpus_manifests DATA: mini_tts writes its manifests while synthesizing: check them
  local dir=$1
  $python -c "import sys; from privasr.data.manifest import read_manifest as r; [r(f) for f in sys.argv[1:]]" \
    "$dir/train.csv" "$dir/dev.csv" "$dir/test.csv" || die "the mini_tts manifests in $dir are broken"
  log "manifests: $(($(wc -l < "$dir/train.csv") - 1)) train, $(($(wc -l < "$dir/dev.csv") - 1)) dev," \
      "$(($(wc -l < "$dir/test.csv") - 1)) test utterances"
}
