r"""A pre-training kept in the repository, installed for the fine-tunings that start from it.

Some experiments need a model far better fitted than a job on two CPU cores can train in minutes (the
regime where clipping curbs memorization needs a well-fit model: README, "The regime"). The project
trains such a model once, keeps it, and every job that needs it installs it instead of training it.
A kept pre-training is a folder of plain files:

* ``fingerprint.json`` -- the run's record (:mod:`privasr.provenance`): settings, data and tokenizer
  digests, code version;
* ``save/CKPT+.../`` -- its final end-of-epoch SpeechBrain checkpoint (model, optimizer, counters),
  the only one;
* ``tokenizer/`` -- the tokenizer it trained with (its digest is the fingerprint's ``tokenizer``);
* ``SHA256SUMS`` -- the SHA-256 of every other file, in ``sha256sum`` format (``sha256sum -c SHA256SUMS``
  checks it too); anything else (a README saying how it was made) is listed there as well.

:func:`verify` refuses, in one line, a kept pre-training that is not exactly what it says: a file
missing, changed or not listed, a tokenizer other than the fingerprint's, a checkpoint that is not
the end of the run's last epoch. :func:`install_run` and :func:`install_tokenizer` copy it into a
job's folders (idempotent; a folder holding something else is refused, never overwritten). The
fine-tunings then carry its fingerprint as ``init_fingerprint.json`` (:func:`privasr.provenance.
claim_run_folder`), which also refuses a fine-tuning whose model settings differ from it
(:data:`privasr.provenance.MODEL_KEYS`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from privasr.errors import UserError
from privasr.provenance import (FINGERPRINT_FILE, MODEL_KEYS, ProvenanceError, digest_of, dir_digest, file_sha256,
                                read_fingerprint, select_checkpoint)

SUMS_FILE = "SHA256SUMS"
TRAINED_MARKER = ".trained"  # the stage library's "this run is finished" (egs/lib/stages.sh)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the digest list, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)


def write_sums(folder) -> None:
    """``folder/SHA256SUMS``: one ``<sha256>  <path>`` line per file (``sha256sum`` format)."""
    folder = Path(folder)
    lines = [f"{file_sha256(folder / name)}  {name}\n" for name in _files(folder)]
    (folder / SUMS_FILE).write_text("".join(lines), encoding="utf-8")


def _read_sums(folder: Path) -> dict[str, str]:
    path = folder / SUMS_FILE
    if not path.is_file():
        raise ProvenanceError(f"{folder} is not a kept pre-training: it has no {SUMS_FILE} "
                              f"(make one with privasr-pretrained keep)")
    sums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ProvenanceError(f"{path}:{number}: not a '<sha256>  <file>' line: {line!r}")
        sums[name] = digest
    return sums


def checkpoint_dir(folder) -> Path:
    """The one checkpoint folder of a kept pre-training (``save/CKPT+...``)."""
    found = sorted(Path(folder, "save").glob("CKPT*"))
    if len(found) != 1:
        raise ProvenanceError(f"{folder}/save holds {len(found)} checkpoints: a kept pre-training keeps exactly one "
                              f"(its last end-of-epoch checkpoint)")
    return found[0]


def verify(folder) -> dict:
    """Check a kept pre-training (see the module docstring) and return its fingerprint.

    Raises :class:`~privasr.provenance.ProvenanceError` naming the first problem: a listed file missing
    or with another SHA-256, a file not listed, a tokenizer whose digest is not the fingerprint's, a
    checkpoint that is not the end of epoch ``number_of_epochs``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ProvenanceError(f"no kept pre-training at {folder}: no such folder")
    sums = _read_sums(folder)
    present = _files(folder)
    for name, digest in sums.items():
        if not (folder / name).is_file():
            raise ProvenanceError(f"{folder}: {name} is listed in {SUMS_FILE} but missing")
        if file_sha256(folder / name) != digest:
            raise ProvenanceError(f"{folder}: {name} differs from the kept one (SHA-256 mismatch): restore it "
                                  f"(git checkout) or keep a new pre-training")
    extra = [name for name in present if name not in sums]
    if extra:
        raise ProvenanceError(f"{folder}: {extra[0]} is not listed in {SUMS_FILE}"
                              f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: a kept pre-training "
                              f"holds only the files it lists")
    fingerprint = read_fingerprint(folder)
    if fingerprint is None:
        raise ProvenanceError(f"{folder}: no {FINGERPRINT_FILE}")
    if dir_digest(folder / "tokenizer") != fingerprint.get("tokenizer"):
        raise ProvenanceError(f"{folder}/tokenizer is not the tokenizer the model was trained with "
                              f"(digest {dir_digest(folder / 'tokenizer')}, the fingerprint's {fingerprint.get('tokenizer')})")
    _check_final(checkpoint_dir(folder), fingerprint, folder)
    return fingerprint


def _check_final(ckpt: Path, fingerprint: dict, where) -> None:
    """``ckpt`` is the end of the run's last epoch (not an intra-epoch one, not an earlier epoch)."""
    meta = _checkpoint_meta(ckpt)
    epochs = int(fingerprint["settings"]["number_of_epochs"])
    if not meta.get("end-of-epoch") or int(meta.get("epoch", -1)) != epochs:
        found = f"epoch {meta.get('epoch')}" if meta.get("end-of-epoch") else "an intra-epoch one"
        raise ProvenanceError(f"{where}: its last checkpoint is {found}, not the end of the run's {epochs} epochs: "
                              f"keep a finished pre-training")


def _checkpoint_meta(ckpt: Path) -> dict:
    """A checkpoint's CKPT.yaml (SpeechBrain's meta: epoch, end-of-epoch, ...)."""
    import yaml

    path = ckpt / "CKPT.yaml"
    if not path.is_file():
        raise ProvenanceError(f"{ckpt} has no CKPT.yaml: not a SpeechBrain checkpoint")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def epochs(folder) -> int:
    """The epochs the kept pre-training trained (its fine-tunings continue the epoch counter)."""
    return int(verify(folder)["settings"]["number_of_epochs"])


def model_overrides(folder) -> list[str]:
    """The ``--key=value`` train.py overrides that give a fine-tuning the kept model's architecture and units
    (:data:`~privasr.provenance.MODEL_KEYS` present in its settings)."""
    settings = verify(folder)["settings"]
    return [f"--{key}={settings[key]}" for key in MODEL_KEYS if key in settings]


def keep(run_dir, tokenizer_dir, dest, notes: Optional[str] = None) -> dict:
    """Keep a finished run as a pre-training in ``dest`` (new): its fingerprint, its last end-of-epoch
    checkpoint, its tokenizer (which must be the one it trained with), ``notes`` as ``README.md``, and
    ``SHA256SUMS``. Returns the fingerprint."""
    run_dir, dest = Path(run_dir), Path(dest)
    fingerprint = read_fingerprint(run_dir)
    if fingerprint is None:
        raise ProvenanceError(f"{run_dir} holds no {FINGERPRINT_FILE}: not a privasr run")
    if dir_digest(tokenizer_dir) != fingerprint.get("tokenizer"):
        raise ProvenanceError(f"{tokenizer_dir} is not the tokenizer {run_dir} trained with")
    checkpoint = select_checkpoint(run_dir / "save", "last")
    if checkpoint is None:
        raise ProvenanceError(f"{run_dir}/save holds no checkpoint: train it first")
    _check_final(Path(checkpoint.path), fingerprint, run_dir)
    if dest.exists():
        raise UserError(f"{dest} exists: keep a pre-training in a new folder")
    tmp = _run_copy(run_dir, Path(checkpoint.path), dest)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    if notes:
        (tmp / "README.md").write_text(notes, encoding="utf-8")
    write_sums(tmp)
    try:
        verify(tmp)
    except ProvenanceError:
        shutil.rmtree(tmp)
        raise
    os.replace(tmp, dest)
    return fingerprint


def install_tokenizer(folder, dest) -> bool:
    """Copy the kept tokenizer to ``dest``; ``False`` (nothing done) when ``dest`` already is it.
    A ``dest`` holding another tokenizer is refused."""
    folder, dest = Path(folder), Path(dest)
    verify(folder)
    wanted = dir_digest(folder / "tokenizer")
    if dest.exists():
        if dir_digest(dest) == wanted:
            return False
        raise ProvenanceError(f"{dest} holds another tokenizer than the kept pre-training's ({folder}/tokenizer): "
                              f"move it aside, or use another --data")
    _copy_atomically(folder / "tokenizer", dest)
    return True


def install_run(folder, dest) -> bool:
    """Install the kept pre-training as the finished run ``dest`` (its fingerprint, checkpoint and the stage
    library's ``.trained``); ``False`` when ``dest`` already is it. A ``dest`` holding another run is refused."""
    folder, dest = Path(folder), Path(dest)
    fingerprint = verify(folder)
    if dest.exists():
        if read_fingerprint(dest) == fingerprint and (dest / TRAINED_MARKER).is_file():
            return False
        raise ProvenanceError(f"{dest} holds another run than the kept pre-training {folder}: move it aside, "
                              f"or use another --exp")
    tmp = _run_copy(folder, checkpoint_dir(folder), dest)
    (tmp / TRAINED_MARKER).touch()
    os.replace(tmp, dest)
    return True


def _run_copy(run: Path, ckpt: Path, dest: Path) -> Path:
    """``dest.partial``, made afresh: ``run``'s fingerprint and the one checkpoint ``ckpt`` under ``save/``
    (the caller adds to it, then moves it to ``dest`` in one rename)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "save").mkdir(parents=True)
    shutil.copy2(run / FINGERPRINT_FILE, tmp / FINGERPRINT_FILE)
    shutil.copytree(ckpt, tmp / "save" / ckpt.name)
    return tmp


def _copy_atomically(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dest)


def describe(folder) -> str:
    """One line: what the kept pre-training is (its settings that matter, epochs, record digest)."""
    fingerprint = verify(folder)
    settings = fingerprint["settings"]
    model = ", ".join(f"{key} {settings[key]}" for key in MODEL_KEYS if key in settings)
    return (f"{folder}: {settings['number_of_epochs']} epochs, {model}; record {digest_of(fingerprint)}, "
            f"{fingerprint.get('code')}")
