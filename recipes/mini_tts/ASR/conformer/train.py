#!/usr/bin/env python3
"""Conformer ASR trained with per-core clipping (none | global | pcc | apcc | pec).

    python train.py hparams/conformer_ctc.yaml --clipping pcc --clip_bound 2.5
    torchrun --nproc_per_node 2 train.py hparams/conformer_ctc.yaml --clipping apcc --virtual_cores 4

Re-running the same command resumes from the last checkpoint. ``--mode decode`` (or the
default ``train_and_decode``) loads the best checkpoint and writes ``ID,hyp,ref,score`` (score = per-utterance loss) for the
test, dev, canary and holdout sets into ``<output_folder>/hyps/`` for exposure scoring.
"""
import sys

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

from privasr.asr import ASRBrain, make_dataset


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides)

    def dataset(csv, sort="ascending", select_n=None):
        return make_dataset(csv, hparams["tokenizer"], hparams["sample_rate"], sort, hparams["max_duration"], select_n)

    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])

    # 1. Train: per-core gradients -> clip -> one all_reduce -> step (privasr.brain).
    modes = ("train", "decode", "train_and_decode")
    if hparams["mode"] not in modes:
        raise SystemExit(f"train.py: error: unknown mode {hparams['mode']!r}; accepted: {', '.join(modes)}")
    if hparams["mode"] != "decode":
        brain.fit(hparams["epoch_counter"], dataset(hparams["train_csv"], hparams["sorting"]),
                  dataset(hparams["dev_csv"]), train_loader_kwargs=hparams["train_dataloader_opts"],
                  valid_loader_kwargs=hparams["valid_dataloader_opts"])

    # 2. Test WER with the best checkpoint, then transcripts + losses for exposure.
    if hparams["mode"] == "train":
        return
    which = {"best": {"min_key": "WER"}, "last": {"max_key": "epoch"}}[hparams["decode_checkpoint"]]
    brain.evaluate(dataset(hparams["test_csv"]), test_loader_kwargs=hparams["valid_dataloader_opts"], **which)
    if sb.utils.distributed.if_main_process():
        sets = {name: dataset(hparams[f"{name}_csv"]) for name in ("test", "dev", "canaries", "holdout")}
        sets["train_eval"] = dataset(hparams["train_eval_csv"], select_n=hparams["train_eval_size"])
        for name, data in sets.items():
            brain.transcribe(data, f"{hparams['hyps_folder']}/{name}.csv", hparams["valid_dataloader_opts"])


if __name__ == "__main__":
    main(sys.argv[1:])
