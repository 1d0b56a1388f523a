#!/usr/bin/env python3
"""Conformer ASR trained with per-core clipping (none | global | pcc | apcc | pec).

    python train.py hparams/conformer_ctc.yaml --clipping pcc --clip_bound 2.5
    torchrun --nproc_per_node 2 train.py hparams/conformer_ctc.yaml --clipping apcc --virtual_cores 4 \
        --distributed_backend gloo   # on CPU; SpeechBrain defaults to nccl

``--mode decode`` (or the default ``train_and_decode``) loads the best checkpoint and writes
``ID,hyp,ref,score`` (score = per-utterance loss) for the test, dev, canary and holdout sets
into ``<output_folder>/hyps/`` for exposure scoring.

Resuming: re-running the same command after a crash or a kill (even SIGKILL, even during a
checkpoint save) continues from the last checkpoint and ends with the same model as an
uninterrupted run (bit-identical on CPU): model, optimizer, epoch and step counters, data
position, the RNG states of every process and the fault counters are checkpointed, and a
checkpoint is written completely or not at all. Checkpoints are taken every
``ckpt_interval_minutes``, or every ``ckpt_interval_steps`` batches when that is > 0, and at
the end of every epoch.

Multi-node, surviving the loss of a worker: run the same command on every node, e.g. 2 nodes
x 8 GPUs = 16 processes (x ``virtual_cores 8`` = the paper's 128 cores)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
        --rdzv_id pcc-seed1 --max-restarts 3 \\
        train.py hparams/conformer_ctc.yaml --output_folder /shared/exp/pcc/seed1 --virtual_cores 8

Export ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` first (``egs/lib/stages.sh`` does): with
torchrun's shared rendezvous store a restarted worker can read the previous attempt's
addresses and fail to connect (pytorch/pytorch#135712).
``HOST`` is one of the nodes (reachable from all); ``output_folder`` must be on storage that
every node sees (rank 0 writes the checkpoints, every rank reads them to resume). When a
worker dies or a node is pre-empted, torchrun stops the other workers and starts them all
again, up to ``--max-restarts`` times; training resumes from the last checkpoint, so at most
``ckpt_interval_minutes`` of work is repeated. Restart on the same number of processes:
with ``--nnodes MIN:MAX`` an elastic restart may continue on fewer, and then the data
partition, the RNG streams and the number of cores C = processes x ``virtual_cores`` that
clipping sees all change (the run completes, but is not the uninterrupted run).

Provenance (:mod:`privasr.provenance`): the run's fingerprint (resolved settings, digests of
the manifests, canaries and tokenizer, processes x virtual cores, code version) is written to
``<output_folder>/fingerprint.json``; re-running on a folder made with other settings, or
decoding a folder without a trained checkpoint, is refused in one line. Transcripts carry
``hyps/provenance.json`` (checkpoint, manifests); an unchanged decode is not redone.

Errors: bad input (unknown or mistyped option, a broken manifest, missing, unreadable or
wrong-rate audio, an invalid clipping setting) ends with one line ``train.py: error: ...``
and exit status 2 before anything is written; a run whose gradients stay NaN/Inf beyond
``nonfinite_patience`` skipped steps ends with one line and status 1
(``PRIVASR_DEBUG=1`` shows the traceback instead).
"""
import sys
from types import SimpleNamespace

import speechbrain as sb

from privasr.asr import ASRBrain, make_dataset
from privasr.brain import ClippingConfig, check_run_options
from privasr.cli import run_cli
from privasr.cli.hparams import RECIPE_ERRORS, RESUME_HINT, load_hparams, parse_arguments, warnings_to_stdout
from privasr.errors import UserError
from privasr.provenance import (claim_run_folder, record_run, record_transcripts, trained_checkpoint,
                                transcripts_current, transcripts_record)

MODES = ("train", "decode", "train_and_decode")
DECODE_CHECKPOINTS = {"best": {"min_key": "WER"}, "last": {"max_key": "epoch"}}
DECODE_SETS = ("test", "dev", "canaries", "holdout")
DECODE_KEYS = ("decode_checkpoint", "beam_size", "train_eval_size")  # what the transcripts also depend on


def main(argv):
    hparams_file, run_opts, overrides = parse_arguments(argv)
    hparams = load_hparams(hparams_file, overrides)
    check_run_options(run_opts, hparams)  # SpeechBrain options privasr cannot honour: one line, exit 2
    check_settings(hparams)
    # The run's fingerprint; a folder trained with other settings (or unprovable) is refused here.
    fingerprint = claim_run_folder(hparams, run_opts, needs_checkpoint=hparams["mode"] == "decode")
    data = load_datasets(hparams)  # every manifest and audio file checked before anything is written
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides,
                                 save_env_desc=False)  # env.log: record_run, without pip freeze
    if sb.utils.distributed.if_main_process():
        record_run(hparams["output_folder"], fingerprint)
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])

    # 1. Train: per-core gradients -> clip -> one all_reduce -> step (privasr.brain).
    if hparams["mode"] != "decode":
        brain.fit(hparams["epoch_counter"], data["train"], data["dev"],
                  train_loader_kwargs=hparams["train_dataloader_opts"],
                  valid_loader_kwargs=hparams["valid_dataloader_opts"])

    # 2. Test WER with the chosen checkpoint, then transcripts + losses for exposure,
    #    bound to that checkpoint and to the manifests they came from (hyps/provenance.json).
    if hparams["mode"] == "train":
        return
    checkpoint = trained_checkpoint(hparams["save_folder"], hparams["decode_checkpoint"])
    decoded = {name: hparams[f"{name}_csv"] for name in (*DECODE_SETS, "train_eval")}
    record = transcripts_record(fingerprint, checkpoint, decoded, {key: hparams[key] for key in DECODE_KEYS})
    if transcripts_current(hparams["hyps_folder"], record):
        print(f"{hparams['hyps_folder']}: already decoded from {record['checkpoint']['name']}")
        return
    brain.evaluate(data["test"], test_loader_kwargs=hparams["valid_dataloader_opts"],
                   **DECODE_CHECKPOINTS[hparams["decode_checkpoint"]])
    if sb.utils.distributed.if_main_process():
        for name in decoded:
            brain.transcribe(data[name], f"{hparams['hyps_folder']}/{name}.csv", hparams["valid_dataloader_opts"])
        record_transcripts(hparams["hyps_folder"], record)


def check_settings(hparams: dict) -> None:
    """Refuse an unknown mode or decode checkpoint, an invalid clipping configuration, fewer examples per
    batch than cores, no epoch to train, and a model whose output size is not the tokenizer's."""
    from privasr.asr.checks import check_cores, check_decoding, check_epochs, check_vocabulary

    if hparams["mode"] not in MODES:
        raise UserError(f"unknown mode {hparams['mode']!r}; accepted: {', '.join(MODES)}")
    if hparams["decode_checkpoint"] not in DECODE_CHECKPOINTS:
        raise UserError(f"unknown decode_checkpoint {hparams['decode_checkpoint']!r}; accepted: best, last")
    if hparams["model_kind"] == "transducer" and hparams.get("beam_size", 1) > 1:
        raise UserError("beam_size > 1 is CTC prefix beam search; the transducer decodes greedily (beam_size: 1)")
    try:
        ClippingConfig.from_hparams(SimpleNamespace(**hparams))
    except ValueError as err:
        raise UserError(str(err)) from None
    check_cores(hparams)
    check_epochs(hparams)
    check_decoding(hparams)
    check_vocabulary(hparams)


def load_datasets(hparams: dict) -> dict:
    """The datasets this mode needs, each manifest validated (see :func:`privasr.asr.make_dataset`); the
    training set must fill one batch per process."""
    from privasr.asr.checks import check_enough_for_a_batch

    def dataset(key, sort="ascending", select_n=None):
        if not hparams.get(key):  # e.g. `--canaries_csv ""` (a canary-free pre-training) asked to decode canaries
            raise UserError(f"{key} is empty, but --mode {hparams['mode']} reads that set: give its manifest")
        return make_dataset(hparams[key], hparams["tokenizer"], hparams["sample_rate"], sort, hparams["max_duration"],
                            select_n, resample=hparams.get("resample_audio", False),
                            check_audio=hparams.get("check_audio", "all"))

    data = {}
    if hparams["mode"] != "decode":
        data["train"] = dataset("train_csv", hparams["sorting"])
        loader = hparams["train_dataloader_opts"]
        check_enough_for_a_batch(data["train"], hparams["train_csv"], loader["batch_size"], loader.get("drop_last"))
        data["dev"] = dataset("dev_csv")
    if hparams["mode"] != "train":
        data.update({name: dataset(f"{name}_csv") for name in DECODE_SETS})
        data["train_eval"] = dataset("train_eval_csv", select_n=hparams["train_eval_size"])
    return data


if __name__ == "__main__":
    warnings_to_stdout()  # until SpeechBrain sets up logging; stderr is for the one error line
    sys.exit(run_cli(main, sys.argv[1:], prog="train.py", user_errors=RECIPE_ERRORS, interrupted_hint=RESUME_HINT))
