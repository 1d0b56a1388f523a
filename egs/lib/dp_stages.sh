#!/usr/bin/env bash
# Stages of DP pre-training (BEST-RQ + DP-SGD) and CTC fine-tuning, shared by every corpus.
# Source it after stages.sh (which gives $python, log, die, in_stage, parse_options and
# launch_train); the corpus's run_dp.sh sets data/exp/model_size, the corpus stages and
#   recipe/hparams          the ASR recipe and its fine-tuning YAML (used by launch_train)
#   ssl_recipe/ssl_hparams  the pre-training recipe and YAML
# then calls run_dp_stages. Every stage skips work already done (re-run to resume).

ssl_recipe=recipes/mini_tts/SSL/bestrq
ssl_hparams=hparams/bestrq_dp.yaml
model_size=mini                   # encoder size, the same for pre-training and fine-tuning
pretrain_args=""                  # extra overrides for the pre-training, e.g. "--noise_multiplier 1.5"
stages_help="0 corpus, 1 manifests, 2 tokenizer, 3 DP pre-training, 4 fine-tuning from the DP encoder, 5 fine-tuning from scratch (--baseline true), 6 results"
last_stage=6
baseline=true                     # also fine-tune from scratch (same recipe, no pre-trained encoder)

launch_ssl() {  # launch_ssl OUTPUT_DIR OVERRIDES... : the pre-training recipe's train.py
  local out=$1 launcher; shift
  python_launcher
  # shellcheck disable=SC2206
  local extra=($pretrain_args $(backend_args))
  "${launcher[@]}" "$PRIVASR_ROOT/$ssl_recipe/train.py" "$PRIVASR_ROOT/$ssl_recipe/$ssl_hparams" \
    --output_folder "$out" --data_folder "$data" --model_size "$model_size" "${extra[@]}" "$@"
}

stage_dp_pretrain() {
  local dir=$exp/pretrain
  if [ -f "$dir/.done" ]; then log "DP pre-training already done: $(tail -n 1 "$dir/train.log")"; return; fi
  mkdir -p "$dir"
  log "DP pre-training -> $dir (log: $dir/train.log; progress: tensorboard --logdir $dir/tensorboard)"
  launch_ssl "$dir" >> "$dir/train.log" 2>&1 \
    || die "DP pre-training failed: $(error_line "$dir/train.log") (log: $dir/train.log)"
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

run_dp_stages() {
  case "$baseline" in true|false) ;; *) die "--baseline takes true or false, got '$baseline'" ;; esac
  if in_stage 0 "corpus"; then corpus_prepare; fi
  if in_stage 1 "manifests"; then corpus_manifests; fi
  if in_stage 2 "tokenizer"; then stage_tokenizer; fi
  if in_stage 3 "DP pre-training: public warm-start, LayerFreeze, DP-SGD"; then stage_dp_pretrain; fi
  if in_stage 4 "CTC fine-tuning from the DP encoder"; then stage_dp_finetune finetune "$exp/pretrain/encoder.ckpt"; fi
  if [ "$baseline" = true ] && in_stage 5 "CTC fine-tuning from scratch (baseline)"; then
    stage_dp_finetune scratch null
  fi
  if in_stage 6 "results -> $exp/RESULTS.md"; then stage_dp_results; fi
  log "done (stages $stage..$stop_stage) in $((SECONDS / 60)) min $((SECONDS % 60)) s"
}
