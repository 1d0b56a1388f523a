# shellcheck shell=bash disable=SC2154  # the options and $python come from stages.sh, sourced first
# Stages of DP pre-training (BEST-RQ + DP-SGD) and CTC fine-tuning, shared by every corpus's run_dp.sh.
# Sourced after stages.sh (its options, run_stage, launch_recipe, launch_train; see there). The driver defines
# recipe/hparams (the ASR recipe and its fine-tuning YAML, for launch_train) and corpus.sh's hooks, sets the
# options below to its own values, then calls `run_dp_stages CORPUS_ARGS`. Its options (beyond stages.sh's):
ssl_recipe=recipes/mini_tts/SSL/bestrq   # the pre-training recipe
ssl_hparams=hparams/bestrq_dp.yaml
model_size=mini                   # encoder size, the same for pre-training and fine-tuning
pretrain_args=""                  # extra overrides for the pre-training, e.g. "--noise_multiplier 1.5"
baseline=true                     # also fine-tune from scratch (same recipe, no pre-trained encoder)
# Functions:
#   stage_dp_pretrain                 stage 3: the pre-training recipe on --data -> $exp/pretrain (its encoder.ckpt);
#                                     a finished one is skipped only if made with these settings (train.py --check_only)
#   stage_dp_finetune NAME ENCODER    stages 4, 5: CTC fine-tuning from ENCODER ("null": from scratch) -> $exp/NAME
#   stage_dp_results                  stage 6: $exp/RESULTS.md, WER next to the encoder's (epsilon, delta)
#   run_dp_stages CORPUS_ARGS         stages 0-6 (CORPUS_ARGS: a string of words for corpus_prepare)
# Every stage skips work already done (re-run to resume).
declare_stages 6 "0 corpus, 1 manifests, 2 tokenizer, 3 DP pre-training, 4 fine-tuning from the DP encoder, 5 fine-tuning from scratch (--baseline true), 6 results"

stage_dp_pretrain() {
  local dir=$exp/pretrain why
  # shellcheck disable=SC2206  # --pretrain_args is a string of words
  local args=(--data_folder "$data" --model_size "$model_size" $pretrain_args)
  if [ -f "$dir/.done" ]; then
    # Skip only the pre-training these settings would make: train.py --check_only compares the folder's
    # fingerprint.json with them (nothing trained or written). Re-running train.py instead would re-export
    # encoder.ckpt, whose digest the fine-tunings' fingerprints record. WORLD_SIZE: the training's processes.
    WORLD_SIZE=$nproc "$python" "$PRIVASR_ROOT/$ssl_recipe/train.py" "$PRIVASR_ROOT/$ssl_recipe/$ssl_hparams" \
      --output_folder "$dir" "${args[@]}" --check_only true > "$dir/check.log" 2>&1 \
      || { why=$(error_line "$dir/check.log"); die "${why#*: error: }"; }
    log "DP pre-training already done with these settings: $(tail -n 1 "$dir/train.log")"; return
  fi
  mkdir -p "$dir"
  log "DP pre-training -> $dir (log: $dir/train.log; progress: tensorboard --logdir $dir/tensorboard)"
  launch_recipe "$ssl_recipe" "$ssl_hparams" "$dir" "${args[@]}" \
    >> "$dir/train.log" 2>&1 || die "DP pre-training failed: $(error_line "$dir/train.log") (log: $dir/train.log)"
  grep -A 100 "^LayerFreeze" "$dir/train.log" | grep -m 1 "layers frozen" | sed "s/^/    /" || true
  tail -n 1 "$dir/train.log" | sed "s/^/    /"
  touch "$dir/.done"
}

stage_dp_finetune() {  # stage_dp_finetune NAME ENCODER : CTC fine-tuning ("null" encoder: from scratch)
  # train.py finishes at once a finished run (and does not decode again), refuses one made with other settings
  local name=$1 encoder=$2 dir=$exp/$1 done_before=false
  [ -f "$dir/.done" ] && done_before=true
  [ "$encoder" = null ] || [ -f "$encoder" ] || die "no pre-trained encoder $encoder; run stage 3 first"
  mkdir -p "$dir"
  [ "$done_before" = true ] || log "CTC fine-tuning '$name' -> $dir (log: $dir/train.log)"
  launch_train "$dir" --mode train_and_decode --pretrained_encoder "$encoder" --model_size "$model_size" \
    >> "$dir/train.log" 2>&1 || die "fine-tuning '$name' failed: $(error_line "$dir/train.log") (log: $dir/train.log)"
  if [ "$done_before" = true ]; then log "fine-tuning '$name' already done with these settings ($dir/fingerprint.json)"
  else tail -n 1 "$dir/train_log.txt" | sed "s/^/    /"; touch "$dir/.done"; fi
}

stage_dp_results() {
  local runs=("dp=$exp/finetune")
  [ "$baseline" = true ] && runs+=("scratch=$exp/scratch")
  $python -m privasr.ssl.results --pretrain "$exp/pretrain" --finetune "${runs[@]}" --out "$exp/RESULTS.md" \
    > /dev/null || die "writing $exp/RESULTS.md failed"
  sed -n '3,100p' "$exp/RESULTS.md" | sed '/^$/d; s/^/    /'
  log "results: $exp/RESULTS.md"
}

run_dp_stages() {  # run_dp_stages CORPUS_ARGS
  require_bool baseline
  # shellcheck disable=SC2086  # a string of words
  run_stage 0 "corpus" corpus_prepare "$data" $1
  run_stage 1 "manifests" corpus_manifests "$data"
  run_stage 2 "tokenizer" stage_tokenizer "$data"
  run_stage 3 "DP pre-training: public warm-start, LayerFreeze, DP-SGD" stage_dp_pretrain
  run_stage 4 "CTC fine-tuning from the DP encoder" stage_dp_finetune finetune "$exp/pretrain/encoder.ckpt"
  if [ "$baseline" = true ]; then
    run_stage 5 "CTC fine-tuning from scratch (baseline)" stage_dp_finetune scratch null
  fi
  run_stage 6 "results -> $exp/RESULTS.md" stage_dp_results
  stages_done "in $((SECONDS / 60)) min $((SECONDS % 60)) s"
}
