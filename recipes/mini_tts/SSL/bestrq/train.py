#!/usr/bin/env python3
"""BEST-RQ pre-training of a Conformer encoder with DP-SGD.

    python train.py hparams/bestrq_dp.yaml --data_folder data --noise_multiplier 1.0
    torchrun --nproc_per_node 2 train.py hparams/bestrq_dp.yaml --target_epsilon 8

1. public warm-start: non-private training on ``public_fraction`` of the audio, with the
   LayerFreeze scores; the lowest-scoring layers are frozen (printed, ``freeze.json``);
2. DP-SGD on the rest: Poisson batches, per-example (per-layer) clipping, Gaussian noise
   once per step, ε logged every epoch (``privacy.json``), optional stop at ``target_epsilon``;
3. the encoder is exported (``encoder_file``) for CTC fine-tuning.

Re-running the same command resumes (warm-start, DP steps and the privacy ledger).
Any YAML key can be overridden on the command line.

    python train.py hparams/bestrq_dp.yaml ... --check_only true

only compares the run folder's ``fingerprint.json`` with these settings (what a stage asks before
it skips a finished pre-training): one line ``... holds a run made with other settings (KEY: A
there, B here)`` and exit status 2 when they differ, nothing trained, exported or written. The
processes are torchrun's ``WORLD_SIZE`` (set it to the training's process count).
"""
import os
import sys

import speechbrain as sb

from privasr.brain import check_run_options
from privasr.cli import run_cli
from privasr.cli.hparams import RECIPE_ERRORS, RESUME_HINT, load_hparams, parse_arguments, warnings_to_stdout
from privasr.errors import UserError
from privasr.provenance import FINGERPRINT_FILE, claim_run_folder, record_run
from privasr.ssl import DPBestRQBrain, audio_dataset, read_audio_manifest, split_public_private


def pop_check_only(argv):
    """``(argv without --check_only VALUE, VALUE)``: the option is this script's, not a YAML key."""
    argv, found = list(argv), []
    for i, arg in reversed(list(enumerate(argv))):
        if arg == "--check_only" or arg.startswith("--check_only="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if "=" in arg else 2)]
            found.append(value)
    if any(v not in ("true", "false") for v in found):
        raise UserError(f"--check_only expects true or false, got {found[0]!r}")
    return argv, bool(found) and found[0] == "true"


def check_finished_run(hparams, run_opts) -> None:
    """Refuse (one line naming the differing keys) a run folder made with other settings; write nothing."""
    folder = hparams["output_folder"]
    if not os.path.isfile(os.path.join(folder, FINGERPRINT_FILE)):
        raise UserError(f"{folder} holds no recorded pre-training (no {FINGERPRINT_FILE}): its settings cannot be "
                        f"checked; move it aside and pre-train again")
    claim_run_folder(hparams, run_opts)  # ProvenanceError: another run's settings
    print(f"{folder}: a pre-training with these settings")


def main(argv):
    argv, check_only = pop_check_only(argv)
    hparams_file, run_opts, overrides = parse_arguments(argv)  # unknown or mistyped options: one line, exit 2
    hparams = load_hparams(hparams_file, overrides)
    check_run_options(run_opts, hparams)  # SpeechBrain options privasr cannot honour: one line, exit 2
    if check_only:  # the fingerprint comparison alone: no training, no export (encoder.ckpt keeps its digest)
        return check_finished_run(hparams, run_opts)
    rate = hparams["sample_rate"]
    try:  # manifests and the DP configuration are checked before anything is written
        rows = read_audio_manifest(hparams["train_csv"], hparams["max_duration"], rate)
        public, private = split_public_private(rows, hparams["public_fraction"], hparams["split_seed"])
        valid = audio_dataset(read_audio_manifest(hparams["valid_csv"], hparams["max_duration"], rate), rate,
                              "ascending")
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    fingerprint = claim_run_folder(hparams, run_opts)  # a folder pre-trained with other settings is refused
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides,
                                 save_env_desc=False)  # env.log: record_run, without pip freeze
    if sb.utils.distributed.if_main_process():
        record_run(hparams["output_folder"], fingerprint)
    try:
        brain = DPBestRQBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                              run_opts=run_opts, checkpointer=hparams["checkpointer"])
    except ValueError as err:
        raise UserError(str(err)) from None

    # 1. Public warm-start (non-private) with LayerFreeze scores, then freeze the lowest-score layers.
    brain.public_warm_start(audio_dataset(public, rate), hparams["warm_start_dataloader_opts"])

    # 2. DP-SGD on the private audio: Poisson batches -> clip per example -> sum + noise once -> / qN.
    brain.fit(hparams["epoch_counter"], audio_dataset(private, rate), valid,
              train_loader_kwargs=hparams["train_dataloader_opts"], valid_loader_kwargs=hparams["valid_dataloader_opts"])

    # 3. The encoder for fine-tuning; the guarantee it carries is in privacy.json.
    brain.export_encoder()
    summary = brain.privacy_summary()
    if sb.utils.distributed.if_main_process():
        print(f"({summary['epsilon']:.4g}, {summary['delta']:g})-DP after {summary['steps']} DP-SGD steps; "
              f"encoder: {hparams['encoder_file']}")


if __name__ == "__main__":
    warnings_to_stdout()  # until SpeechBrain sets up logging; stderr is for the one error line
    sys.exit(run_cli(main, sys.argv[1:], prog="bestrq/train.py", user_errors=RECIPE_ERRORS,
                     interrupted_hint=RESUME_HINT))
