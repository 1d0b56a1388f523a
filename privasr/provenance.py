r"""Provenance: every run and every transcript carries a fingerprint of what produced it.

A number privasr reports must be traceable to exactly what made it. Two records do that:

* ``<run>/fingerprint.json`` -- written by a recipe's ``train.py`` before it trains: the
  resolved hyper-parameters (after command-line overrides) that determine the model, the
  digests of the manifests, canaries and tokenizer it trained on, the cores
  (processes x ``virtual_cores`` x gradient accumulation), SpeechBrain's result-changing run
  options, the checkpoint it was initialised from (if any) and the code version. Re-running
  ``train.py`` on the same folder (to resume, or a stage asking "already trained?") compares
  the new fingerprint with the recorded one and refuses, in one line naming the keys that
  differ, a folder trained with other settings. A folder holding checkpoints but no
  fingerprint (made before provenance was recorded) is refused too: its settings cannot be
  proved. A different code version is only warned about (resuming across a bug fix is
  legitimate), and recorded.
* ``<run>/hyps/provenance.json`` -- written after decoding: the checkpoint the transcripts
  came from (its name and the digest of its parameters), the run's fingerprint digest, the
  decoding settings and the digest of every decoded manifest. Scoring
  (:func:`check_transcripts`) refuses transcripts made by another checkpoint, for other
  manifests (canaries remade with the same IDs and new texts), or with no record at all.

Digests are SHA-256 of file contents (16 hex digits shown), so moving a corpus keeps its
runs valid and editing one line of a manifest does not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from privasr.errors import UserError

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
ENV_FILE = "env.log"  # the environment a run trained in (SpeechBrain's name for it)
TRANSCRIPTS_FILE = "provenance.json"
INIT_FINGERPRINT_FILE = "init_fingerprint.json"  # a run started from another run's checkpoint keeps its record

# Keys that say where things go, how often to log or checkpoint, or how to decode: they do not change the model.
OPERATIONAL_KEYS = frozenset({
    "mode", "beam_size", "decode_checkpoint", "train_eval_size", "check_audio", "num_workers",
    "log_every_n_steps", "ckpt_interval_minutes", "ckpt_interval_steps", "nonfinite_patience",
})
# Manifests whose content determines the model (digested); the other *_csv keys are decoding inputs.
TRAINING_MANIFESTS = ("train_csv", "dev_csv", "valid_csv", "canaries_csv")
PATH_SUFFIXES = ("_folder", "_dir", "_csv", "_log", "_file", "_path", "_encoder")
# Settings that fix a model's architecture and output units. A run started from another run's checkpoint
# (init_fingerprint.json) must have the same ones, and the same tokenizer: otherwise the checkpoint would load into
# another model without an error (subsampling_factor changes only strides, so every tensor keeps its shape).
MODEL_KEYS = ("model_kind", "model_size", "subsampling_factor", "frontend_channels", "tokenizer_type", "vocab_size",
              "sample_rate")
# SpeechBrain run options (not YAML keys) that change what is trained.
RESULT_RUN_OPTIONS = ("precision", "max_grad_norm", "skip_nonfinite_grads", "grad_accumulation_factor")


class ProvenanceError(UserError):
    """A run or transcripts that cannot be proved to be what was asked for (one line)."""


# -- digests --------------------------------------------------------------------------------
def file_sha256(path) -> str:
    """The full SHA-256 of a file's bytes (64 hex digits, as ``sha256sum`` prints it), read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path) -> Optional[str]:
    """SHA-256 of a file's bytes (16 hex digits), ``None`` if there is no such file."""
    if not path or not os.path.isfile(path):
        return None
    return file_sha256(path)[:16]


def dir_digest(path) -> Optional[str]:
    """SHA-256 over the names and contents of a folder's files (sorted), ``None`` if it is no folder."""
    if not path or not os.path.isdir(path):
        return None
    sha = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            sha.update(name.encode() + b"\0" + file_digest(full).encode() + b"\0")
    return sha.hexdigest()[:16]


def digest_of(record: Mapping) -> str:
    """A short digest of a JSON-serialisable record (its canonical form)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> str:
    """privasr's version and, in a git checkout, its commit (``-dirty`` with uncommitted changes)."""
    from privasr import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "privasr", "recipes"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"privasr {__version__}"
    return f"privasr {__version__} ({commit}{'-dirty' if dirty else ''})"


# -- the training fingerprint ---------------------------------------------------------------
def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def is_path_key(key: str) -> bool:
    return key.endswith(PATH_SUFFIXES) or key in ("output_folder", "data_folder")


def model_settings(hparams: Mapping) -> dict:
    """The plain-valued hyper-parameters that determine the trained model (paths and operational keys left out)."""
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in sorted(hparams.items())
            if not key.startswith("_") and key not in OPERATIONAL_KEYS and not is_path_key(key) and _plain(value)}


def training_fingerprint(hparams: Mapping, run_opts: Optional[Mapping] = None,
                         world_size: Optional[int] = None) -> dict:
    """What determines a run's trained model (see the module docstring).

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without torchrun); the cores are
    processes x ``virtual_cores`` (one per example for ``pec``) x gradient accumulation.
    """
    from privasr.brain import run_option

    options = {}  # the value each run option takes (command line > YAML > default); max_grad_norm only when given
    for key in RESULT_RUN_OPTIONS:
        value, explicit = run_option(key, run_opts, hparams)
        if explicit or key != "max_grad_norm":
            options[key] = value
    processes = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    accumulation = int(options.get("grad_accumulation_factor") or 1)
    virtual = hparams.get("virtual_cores", 1)
    batch = hparams.get("batch_size")
    per_process = batch if hparams.get("clipping") == "pec" else virtual
    return {
        "settings": model_settings(hparams),
        "data": {key: file_digest(hparams[key]) for key in TRAINING_MANIFESTS if key in hparams},
        "tokenizer": dir_digest(hparams.get("tokenizer_dir")),
        "pretrained": {key: file_digest(hparams[key]) for key in sorted(hparams)
                       if key.startswith("pretrained") and isinstance(hparams[key], str)},
        "cores": {"processes": processes, "virtual_cores": virtual, "grad_accumulation": accumulation,
                  "total": processes * int(per_process or 1) * accumulation},
        "run_options": options,
        "code": code_version(),
    }


def differences(recorded: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """``key: A there, B here`` for every leaf that differs (``code`` excluded: see :func:`check_run_folder`)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if not prefix and key == "code":
            continue
        name = f"{prefix}{key}"
        there, here = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(there, Mapping) and isinstance(here, Mapping):
            out += differences(there, here, name + ".")
        elif there != here:
            out.append(f"{name}: {there!r} there, {here!r} here")
    return out


def has_checkpoints(save_dir) -> bool:
    return os.path.isdir(save_dir) and any(name.startswith("CKPT") for name in os.listdir(save_dir))


def check_run_folder(output_folder, fingerprint: dict, save_dir=None) -> Optional[dict]:
    """Refuse a folder made with other settings; return the recorded fingerprint (``None`` if new).

    Raises :class:`ProvenanceError` (one line naming the differing keys) when ``output_folder``
    holds a fingerprint that differs, or checkpoints without one (and no
    ``init_fingerprint.json`` saying which run they were copied from).
    """
    folder = Path(output_folder)
    record = folder / FINGERPRINT_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ProvenanceError(f"{record}: unreadable ({err}); move the folder aside") from None
        diffs = differences(recorded, fingerprint)
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise ProvenanceError(f"{folder} holds a run made with other settings ({shown}): choose another output "
                                  f"folder (run.sh: another --exp), or move it aside")
        if recorded.get("code") != fingerprint.get("code"):
            logger.warning("%s was started by %s; continuing it with %s", folder, recorded.get("code"),
                           fingerprint.get("code"))
        return recorded
    save_dir = Path(save_dir) if save_dir else folder / "save"
    if has_checkpoints(save_dir) and not (folder / INIT_FINGERPRINT_FILE).is_file():
        raise ProvenanceError(f"{folder} holds checkpoints but no {FINGERPRINT_FILE} (made by an older privasr?): "
                              f"its settings cannot be proved; move it aside and train again")
    return None


def record_run(output_folder, fingerprint: dict) -> None:
    """Write ``fingerprint.json`` (atomically) and ``env.log`` (:func:`environment_description`)."""
    write_json(Path(output_folder) / FINGERPRINT_FILE, fingerprint)
    (Path(output_folder) / ENV_FILE).write_text(environment_description(), encoding="utf-8")


def environment_description() -> str:
    """SpeechBrain's ``env.log`` sections (Python, installed packages, code version, CUDA), read in milliseconds.

    SpeechBrain writes it with ``pip freeze`` (2-5 s at every start of a train.py); the installed
    distributions' metadata gives the same ``name==version`` list without a subprocess. Recipes
    call ``create_experiment_directory(..., save_env_desc=False)`` and this instead.
    """
    import platform
    from importlib import metadata

    import torch

    packages = sorted({f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions()
                       if dist.metadata["Name"]}, key=str.lower)
    cuda = f"CUDA version:\n{torch.version.cuda}" if torch.cuda.is_available() else "CUDA not available"
    rule = "==============================\n"
    return (f"privasr system description (SpeechBrain's env.log sections)\n{rule}"
            f"Python version:\n{sys.version} ({platform.platform()})\n{rule}"
            "Installed Python packages:\n" + "\n".join(packages) + f"\n{rule}"
            f"Code version:\n{code_version()}\n{rule}{cuda}\n")


def claim_run_folder(hparams: Mapping, run_opts: Optional[Mapping] = None, needs_checkpoint: bool = False) -> dict:
    """The run's fingerprint, once ``hparams["output_folder"]`` is known to hold this run or nothing.

    A folder whose checkpoints were copied from another run (the study's fine-tunings start
    from the pre-training) carries that run's record as ``init_fingerprint.json``; its digest
    becomes part of the fingerprint (``init``). With ``needs_checkpoint`` (decoding), a folder
    without a recorded run or without a checkpoint is refused: a randomly initialised model is
    never decoded as a trained one.
    """
    folder = Path(hparams["output_folder"])
    fingerprint = training_fingerprint(hparams, run_opts)
    init = read_fingerprint(folder, INIT_FINGERPRINT_FILE)
    if init is not None:
        check_same_model(init, fingerprint, folder)
        fingerprint["init"] = digest_of(init)
    save_dir = hparams.get("save_folder") or folder / "save"
    recorded = check_run_folder(folder, fingerprint, save_dir)
    if needs_checkpoint and (recorded is None or not has_checkpoints(save_dir)):
        raise ProvenanceError(f"{folder} holds no trained model ({'no checkpoint in ' + str(save_dir) if recorded else 'no ' + FINGERPRINT_FILE}): "
                              f"train it first (--mode train)")
    return fingerprint


def check_same_model(init: Mapping, fingerprint: Mapping, folder) -> None:
    """Refuse a run whose model settings (:data:`MODEL_KEYS`) or tokenizer differ from those of the run its
    checkpoint came from (``init``): one line naming the first difference."""
    before, now = init.get("settings", {}), fingerprint.get("settings", {})
    for key in MODEL_KEYS:
        if before.get(key) != now.get(key):
            raise ProvenanceError(f"{folder} starts from a checkpoint trained with {key} {before.get(key)!r}, but "
                                  f"this run asks for {now.get(key)!r}: a fine-tuning keeps the model it starts from "
                                  f"(give --{key} {before.get(key)}, or train from scratch in another folder)")
    if init.get("tokenizer") != fingerprint.get("tokenizer"):
        raise ProvenanceError(f"{folder} starts from a checkpoint trained with tokenizer {init.get('tokenizer')}, "
                              f"but this run's tokenizer is {fingerprint.get('tokenizer')}: its output units would "
                              f"mean other tokens (use the tokenizer it was trained with)")


def read_fingerprint(run_dir, name: str = FINGERPRINT_FILE) -> Optional[dict]:
    """A run's record (``name``: its own, or :data:`INIT_FINGERPRINT_FILE`, that of the run it started
    from); ``None`` if absent."""
    path = Path(run_dir) / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_json(path: Path, record: Mapping) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- checkpoints ----------------------------------------------------------------------------
def checkpoint_identity(checkpoint) -> dict:
    """A SpeechBrain checkpoint's name, meta and the digest of its model parameters."""
    path = Path(checkpoint.path)
    params = sorted(path.glob("*.ckpt"))
    model = [p for p in params if p.name == "model.ckpt"] or params
    meta = {k: v for k, v in (checkpoint.meta or {}).items() if _plain(v) and k != "unixtime"}
    return {"name": path.name, "meta": meta, "model_digest": file_digest(model[0]) if model else None}


def select_checkpoint(save_dir, rule: str):
    """The checkpoint SpeechBrain would load for ``rule`` (best: lowest WER, last: highest epoch), or None."""
    from speechbrain.utils.checkpoints import Checkpointer

    if not has_checkpoints(save_dir):
        return None
    keys = {"best": {"min_key": "WER"}, "last": {"max_key": "epoch"}}[rule]
    return Checkpointer(save_dir).find_checkpoint(**keys)


def trained_checkpoint(save_dir, rule: str):
    """The checkpoint decoding will load (:func:`select_checkpoint`); refused when there is none."""
    checkpoint = select_checkpoint(save_dir, rule)
    if checkpoint is None:
        raise ProvenanceError(f"no {rule} checkpoint in {save_dir}: train first (a randomly initialised model is "
                              f"never decoded)")
    return checkpoint


# -- transcripts ----------------------------------------------------------------------------
def transcripts_record(run_fingerprint: Mapping, checkpoint, manifests: Mapping[str, str],
                       decode_settings: Mapping) -> dict:
    """What ``hyps/provenance.json`` holds: checkpoint, run, decoding settings, decoded manifests."""
    return {
        "checkpoint": checkpoint_identity(checkpoint),
        "run": digest_of({k: v for k, v in run_fingerprint.items() if k != "code"}),
        "decode": dict(decode_settings),
        "manifests": {name: {"path": str(path), "digest": file_digest(path)} for name, path in manifests.items()},
        "code": code_version(),
    }


def record_transcripts(hyps_dir, record: Mapping) -> None:
    """Write ``hyps/provenance.json``, after every transcript file it describes is complete."""
    write_json(Path(hyps_dir) / TRANSCRIPTS_FILE, record)


def transcripts_current(hyps_dir, record: Mapping) -> bool:
    """True when ``hyps_dir`` already holds transcripts made exactly as ``record`` says (code aside)."""
    path = Path(hyps_dir) / TRANSCRIPTS_FILE
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text(encoding="utf-8"))
    return not differences(recorded, record) and all(
        (Path(hyps_dir) / f"{name}.csv").is_file() for name in record["manifests"])


def check_transcripts(run_dir, names: Iterable[str]) -> dict:
    """Refuse to score a run's ``hyps/<name>.csv`` that cannot be traced to the run's current checkpoint.

    Checks that ``hyps/provenance.json`` exists, that its run fingerprint is the run's,
    that every decoded manifest still has the digest it had when decoded, and that the
    checkpoint it names is still the one its rule (best / last) selects. Returns the record.
    """
    run_dir, hyps = Path(run_dir), Path(run_dir) / "hyps"
    path = hyps / TRANSCRIPTS_FILE
    if not path.is_file():
        raise ProvenanceError(f"{hyps} has no {TRANSCRIPTS_FILE}: these transcripts cannot be traced to a checkpoint; "
                              f"decode again (run.sh stage 5)")
    record = json.loads(path.read_text(encoding="utf-8"))
    fingerprint = read_fingerprint(run_dir)
    if fingerprint is None or record.get("run") != digest_of({k: v for k, v in fingerprint.items() if k != "code"}):
        raise ProvenanceError(f"{hyps} were decoded from another run than {run_dir}/{FINGERPRINT_FILE} records; "
                              f"decode again (run.sh stage 5)")
    for name in names:
        entry = record["manifests"].get(name)
        if entry is None:
            raise ProvenanceError(f"{hyps}: no record of how {name}.csv was decoded; decode again (run.sh stage 5)")
        if file_digest(entry["path"]) != entry["digest"]:
            raise ProvenanceError(f"{entry['path']} changed since {hyps}/{name}.csv was decoded from it "
                                  f"(e.g. canaries remade): decode again (run.sh stage 5)")
    rule = record["decode"].get("decode_checkpoint", "best")
    current = select_checkpoint(run_dir / "save", rule)
    if current is None or checkpoint_identity(current) != record["checkpoint"]:
        now = "none" if current is None else Path(current.path).name
        raise ProvenanceError(f"{hyps} come from checkpoint {record['checkpoint']['name']}, but the run's {rule} "
                              f"checkpoint is now {now}: decode again (run.sh stage 5)")
    return record


def check_references(hyps_csv, manifest_csv) -> None:
    """Refuse transcripts whose IDs or ``ref`` texts are not the manifest's (e.g. canaries remade, same IDs)."""
    import csv

    def table(path, column):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return {row["ID"]: row[column] for row in csv.DictReader(handle)}

    refs, texts = table(hyps_csv, "ref"), table(manifest_csv, "wrd")
    if set(refs) != set(texts):
        extra, missing = sorted(set(refs) - set(texts)), sorted(set(texts) - set(refs))
        raise ProvenanceError(f"{hyps_csv} does not transcribe {manifest_csv} ({len(missing)} of its IDs missing, "
                              f"{len(extra)} others{', e.g. ' + (missing or extra)[0] if missing or extra else ''}): "
                              f"decode again (run.sh stage 5)")
    for uid, text in texts.items():
        if refs[uid] != text:
            raise ProvenanceError(f"{hyps_csv}: the reference of {uid} is {refs[uid]!r}, but {manifest_csv} now says "
                                  f"{text!r} (remade with the same IDs?): decode again (run.sh stage 5)")


def describe_run(fingerprint: Optional[Mapping]) -> str:
    """The settings that tell runs apart, for a results row: bound b, per-core batch B, cores C."""
    if not fingerprint:
        return "–"
    settings, cores = fingerprint["settings"], fingerprint["cores"]
    clipping = settings.get("clipping", "none")
    per_core = 1 if clipping == "pec" else max(1, int(settings.get("batch_size", 1)) // int(cores["virtual_cores"]))
    parts = [clipping]
    if clipping in ("pcc", "pec", "global"):
        parts.append(f"b={settings.get('clip_bound')}")
    parts += [f"B={per_core}", f"C={cores['total']}"]
    return ", ".join(parts)
