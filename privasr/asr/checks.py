"""Start-up checks shared by every recipe's ``train.py``: settings refused before anything is written.

Each check raises :class:`privasr.errors.UserError` (one line, exit status 2 through
:func:`privasr.cli.run_cli`) or logs a warning where training can go on. They read only
the resolved hyper-parameters and the datasets, so a recipe calls them from its
``check_settings`` / ``load_datasets`` (and :func:`privasr.cli.hparams.load_hparams` runs the
ones that need no built object, :func:`check_output_paths`, :func:`check_batch_sizes` and
:func:`check_numbers`, for every recipe, before the YAML's objects are built).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping

from privasr.errors import UserError

__all__ = ["OUTPUT_FOLDERS", "OUTPUT_FILES", "check_output_paths", "check_batch_sizes", "check_numbers",
           "check_cores", "check_epochs", "check_decoding", "check_vocabulary", "check_enough_for_a_batch"]

#: hyper-parameters naming folders a run writes (inputs such as ``data_folder`` / ``tokenizer_dir`` are not here)
OUTPUT_FOLDERS = ("output_folder", "save_folder", "hyps_folder", "tensorboard_dir", "core_log_dir",
                  "warm_start_folder")
#: hyper-parameters naming files a run writes
OUTPUT_FILES = ("train_log", "privacy_file", "freeze_file", "encoder_file")


# -- output paths ---------------------------------------------------------------------------
def check_output_paths(hparams: Mapping) -> None:
    """Refuse output folders (and files) that are files (or folders), or cannot be created or written.

    Only string values are checked (``null`` switches an output off). Writability is probed by
    creating and removing an empty directory in the nearest existing ancestor, because
    :func:`os.access` says yes to root even on a read-only file system.
    """
    for key in OUTPUT_FOLDERS:
        if isinstance(hparams.get(key), str):
            _check_writable(key, Path(hparams[key]), folder=True)
    for key in OUTPUT_FILES:
        if isinstance(hparams.get(key), str):
            _check_writable(key, Path(hparams[key]), folder=False)


def _check_writable(key: str, path: Path, folder: bool) -> None:
    if path.exists():
        if folder and not path.is_dir():
            raise UserError(f"--{key} {path}: is a file, not a folder")
        if not folder and path.is_dir():
            raise UserError(f"--{key} {path}: is a folder, not a file")
    where = path if folder and path.is_dir() else path.parent
    ancestor = Path(os.path.abspath(where))
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--{key} {path}: cannot be created, {ancestor} is a file")
    try:  # nothing stays behind: the probe is removed at once
        os.rmdir(tempfile.mkdtemp(prefix=".privasr-write-probe-", dir=ancestor))
    except OSError as err:
        raise UserError(f"--{key} {path}: cannot write in {ancestor} ({err.strerror or err})") from None


# -- batches, cores, epochs -----------------------------------------------------------------
def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_batch_sizes(hparams: Mapping) -> None:
    """Every ``*batch_size`` setting and every ``*_dataloader_opts`` ``batch_size`` is an integer >= 1.

    ``null`` is allowed for a top-level ``*batch_size`` (a recipe may switch it off), never
    inside loader options, where it would make PyTorch yield unbatched examples.
    """
    for key, value in hparams.items():
        if str(key).endswith("batch_size") and value is not None and not _positive_int(value):
            raise UserError(f"--{key} must be a positive integer, got {value!r}")
    for key, value in hparams.items():
        if str(key).endswith("_dataloader_opts") and isinstance(value, Mapping) and "batch_size" in value:
            if not _positive_int(value["batch_size"]):
                raise UserError(f"{key}: batch_size must be a positive integer, got {value['batch_size']!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_numbers(hparams: Mapping) -> None:
    """Settings that only make sense in a range: learning rates > 0, ``max_duration`` > 0 (or null),
    loader workers and checkpoint intervals >= 0 (each would otherwise fail mid-run or be ignored)."""
    for key, value in hparams.items():
        key = str(key)
        if (key == "lr" or key.endswith("_lr")) and not (_number(value) and value > 0):
            raise UserError(f"--{key} must be a positive number, got {value!r}")
    duration = hparams.get("max_duration")
    if duration is not None and not (_number(duration) and duration > 0):
        raise UserError(f"--max_duration must be a positive number of seconds (null: no limit), got {duration!r}")
    for key in ("num_workers", "ckpt_interval_steps", "ckpt_interval_minutes"):
        value = hparams.get(key)
        if value is not None and not (_number(value) and value >= 0):
            raise UserError(f"--{key} must be >= 0, got {value!r}")


def check_cores(hparams: Mapping) -> None:
    """At least one example per core: ``batch_size >= virtual_cores`` unless ``pec`` (one example per core).

    :meth:`privasr.brain.ClippingConfig.num_shards` would otherwise quietly emulate fewer
    cores than asked, changing C and so what clipping means.
    """
    cores, batch = hparams.get("virtual_cores", 1), hparams.get("batch_size")
    if not _positive_int(cores):
        raise UserError(f"--virtual_cores must be a positive integer, got {cores!r}")
    accumulation = hparams.get("grad_accumulation_factor", 1)
    if not _positive_int(accumulation):
        raise UserError(f"--grad_accumulation_factor must be a positive integer, got {accumulation!r}")
    if hparams.get("clipping", "none") != "pec" and _positive_int(batch) and batch < cores:
        raise UserError(f"--batch_size {batch} is smaller than --virtual_cores {cores}: every core needs at least "
                        f"one example (per-core batch = batch_size / virtual_cores); use a batch_size of at least "
                        f"{cores} or fewer virtual_cores")


def check_epochs(hparams: Mapping) -> None:
    """A training mode must train: ``number_of_epochs >= 1``."""
    epochs = hparams.get("number_of_epochs")
    if hparams.get("mode", "train") != "decode" and not _positive_int(epochs):
        raise UserError(f"--number_of_epochs must be a positive integer to train, got {epochs!r} "
                        "(--mode decode decodes a trained run)")


LOSS_REDUCTIONS = ("mean", "sum")


def check_decoding(hparams: Mapping) -> None:
    """An ASR recipe's loss and decoding settings: ``loss_reduction``, ``beam_size >= 1``, ``train_eval_size >= 1``."""
    if hparams.get("loss_reduction", "mean") not in LOSS_REDUCTIONS:
        raise UserError(f"unknown loss_reduction {hparams['loss_reduction']!r}; accepted: {', '.join(LOSS_REDUCTIONS)}")
    for key in ("beam_size", "train_eval_size"):
        if key in hparams and not _positive_int(hparams[key]):
            raise UserError(f"--{key} must be a positive integer, got {hparams[key]!r}")


def check_enough_for_a_batch(dataset, manifest: str, batch_size: int, drop_last: bool = True) -> None:
    """Refuse a training set with no full batch per process (``drop_last`` would train on nothing)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if drop_last and len(dataset) < batch_size * world:
        procs = f" x {world} processes" if world > 1 else ""
        raise UserError(f"{manifest}: {len(dataset)} training utterances, fewer than one batch "
                        f"(batch_size {batch_size}{procs}): every batch would be dropped (drop_last); "
                        "use a smaller batch_size or more data")


# -- the model against the tokenizer --------------------------------------------------------
def check_vocabulary(hparams: Mapping) -> None:
    """The model's output layer matches the tokenizer, and the tokenizer is the one the YAML describes.

    * model classes != tokenizer classes: decoding maps ids the tokenizer does not have
      (a near-initial model crashes validation after a whole epoch), or targets exceed the
      output layer; refused.
    * ``vocab_size`` / ``tokenizer_type`` differ from the settings the tokenizer in
      ``tokenizer_dir`` was trained with (its ``tokenizer.json``): the run would not be the
      one asked for; refused.
    """
    tokenizer, model = hparams.get("tokenizer"), hparams.get("model")
    if tokenizer is None:
        return
    where = f"the tokenizer in {getattr(tokenizer, 'model_dir', None) or hparams.get('tokenizer_dir')}"
    classes = getattr(model, "vocab_size", None)
    if isinstance(classes, int) and classes != tokenizer.vocab_size:
        raise UserError(f"the model has {classes} output classes but {where} has {tokenizer.vocab_size} "
                        "(blank included): build the model with vocab_size: "
                        "!apply:privasr.tokenizer.model_output_size [!ref <tokenizer>, !ref <vocab_size>]")
    trained = getattr(tokenizer, "config", None) or {}
    for key, saved_key in (("vocab_size", "vocab_size"), ("tokenizer_type", "model_type")):
        if key in hparams and saved_key in trained and hparams[key] != trained[saved_key]:
            raise UserError(f"--{key} {hparams[key]} but {where} was trained with {saved_key} "
                            f"{trained[saved_key]}: train a tokenizer with these settings (egs stage 3, "
                            f"another tokenizer_dir) or set --{key} {trained[saved_key]}")
