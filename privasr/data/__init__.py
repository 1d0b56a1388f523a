"""Corpora and manifests.

* :mod:`privasr.data.manifest` -- SpeechBrain CSV manifests (``ID,duration,wav,spk_id,wrd``).
* :mod:`privasr.data.text_source` -- the offline English sentence generator behind mini_tts.
* :mod:`privasr.data.mini_tts` -- a small corpus synthesized on the machine (espeak-ng, flite, sox).
* :mod:`privasr.data.librispeech` -- LibriSpeech directory tree to manifests.
* :mod:`privasr.data.librilight` -- Libri-Light audio tree to an audio-only manifest (pre-training).

This module also holds the data steps' bookkeeping: :func:`is_done` / :func:`mark_done`: a step
that completed with the same parameters is not run again (idempotent, resumable stages);
:func:`claim_dir` empties a directory of generated files that were made with other settings, so
resuming never mixes two runs.

The command-line convention (``CliParser``, ``run_cli``, the argument types, ``check_output_file``)
lives in :mod:`privasr.cli`.

The corpus modules are not imported here, so that ``python -m privasr.data.mini_tts`` runs
cleanly.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence


__all__ = ["is_done", "mark_done", "claim_dir", "audio_durations"]


def is_done(marker: str | os.PathLike, params: Mapping[str, Any], outputs: Sequence[str | os.PathLike] = ()) -> bool:
    """True when ``marker`` records exactly ``params`` and every path in ``outputs`` exists."""
    marker = Path(marker)
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == _jsonable(params) and all(Path(p).exists() for p in outputs)


def mark_done(marker: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Record that the step producing ``marker`` finished with ``params`` (atomic write)."""
    marker = Path(marker)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(params), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def claim_dir(directory: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    """Create ``directory`` for files generated under ``key``; return it.

    ``directory/.key.json`` records the key. If it records another key, the directory (which
    privasr created) is deleted first; files left by an interrupted run with the same key stay.
    """
    directory = Path(directory)
    key_file = directory / ".key.json"
    if key_file.is_file() and not is_done(key_file, key):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mark_done(key_file, key)
    return directory


def audio_durations(paths: Sequence[str | os.PathLike], nj: int, desc: str) -> list[float]:
    """Durations in seconds of the audio files ``paths`` (from their headers), ``nj`` at a time, with a progress bar."""
    from concurrent.futures import ThreadPoolExecutor

    import soundfile
    from tqdm import tqdm

    def duration(path) -> float:
        info = soundfile.info(str(path))
        return info.frames / info.samplerate

    with ThreadPoolExecutor(max_workers=nj) as pool:
        return list(tqdm(pool.map(duration, paths), total=len(paths), desc=desc, unit="file"))


def _jsonable(params: Mapping[str, Any]) -> Any:
    """Normalise ``params`` through JSON, so tuples and lists compare equal after a round trip."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))
