r"""Unlabeled audio for self-supervised pre-training, and its public / private split.

Pre-training reads only the ``ID``, ``duration`` and ``wav`` columns of a manifest (a
transcript, if present, is ignored), so Libri-Light-style audio-only manifests work too.

The public warm-start set (paper §4.2.1) is a seeded random fraction :math:`f` of the
utterances: :math:`\max(1, \mathrm{round}(fN))` of them when :math:`f > 0`. The rest is the
private set that DP-SGD trains on and that the privacy guarantee is about; the two are
disjoint, so the public examples never enter the accountant's :math:`N`.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import soundfile
import speechbrain as sb
import torch

from privasr.data.manifest import read_table

__all__ = ["read_audio_manifest", "split_public_private", "audio_dataset"]

AUDIO_COLUMNS = ("ID", "duration", "wav")

Row = Dict[str, str]


def read_audio_manifest(path: str, max_duration: Optional[float] = None,
                        sample_rate: Optional[int] = None) -> List[Row]:
    """Rows ``{ID, duration, wav}`` of ``path``; utterances longer than ``max_duration`` s are left out.

    With ``sample_rate``, every audio file is opened first (as the ASR recipes do: a missing,
    unreadable or wrong-rate file, or one whose length is far from its duration, is a
    :class:`privasr.errors.UserError` naming its manifest line; a small length mismatch one warning).
    """
    from types import SimpleNamespace

    from privasr.asr.dataio import check_audio_file, warn_duration_mismatches

    rows = [{k: row[k] for k in AUDIO_COLUMNS} for _, row in read_table(path, AUDIO_COLUMNS)]
    if max_duration is not None:
        rows = [r for r in rows if float(r["duration"]) <= max_duration]
    if not rows:
        raise ValueError(f"{path}: no utterances" + (f" of at most {max_duration} s" if max_duration else ""))
    if sample_rate is not None:
        mismatches = []
        for r in rows:
            utt = SimpleNamespace(id=r["ID"], wav=r["wav"], duration=float(r["duration"]))
            mismatches += check_audio_file(path, utt, sample_rate, resample=False)
        warn_duration_mismatches(path, mismatches)
    return rows


def split_public_private(rows: Sequence[Row], public_fraction: float, seed: int = 0) -> Tuple[List[Row], List[Row]]:
    """Disjoint ``(public, private)`` rows; the public ones are a seeded random ``public_fraction``."""
    if not 0.0 <= public_fraction < 1.0:
        raise ValueError(f"public_fraction must be in [0, 1), got {public_fraction!r}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = 0 if public_fraction == 0 else max(1, round(public_fraction * len(rows)))
    if count >= len(rows):
        raise ValueError(f"public_fraction {public_fraction} of {len(rows)} utterances leaves no private data")
    public = set(order[:count])
    return [rows[i] for i in sorted(public)], [r for i, r in enumerate(rows) if i not in public]


def audio_dataset(rows: Sequence[Row], sample_rate: int = 16000,
                  sort: str = "random") -> sb.dataio.dataset.DynamicItemDataset:
    """A dataset yielding ``id`` and ``sig`` (mono float32 at ``sample_rate``) for ``rows``."""
    data = {r["ID"]: {"wav": r["wav"], "duration": float(r["duration"])} for r in rows}
    dataset = sb.dataio.dataset.DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        signal, rate = soundfile.read(wav, dtype="float32", always_2d=False)
        if rate != sample_rate:
            raise ValueError(f"{wav}: sample rate {rate} Hz, expected {sample_rate} Hz (resample the corpus first)")
        return torch.from_numpy(signal if signal.ndim == 1 else signal.mean(axis=1))

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig"])
    if sort in ("ascending", "descending"):
        return dataset.filtered_sorted(sort_key="duration", reverse=sort == "descending")
    if sort != "random":
        raise ValueError(f"unknown sorting {sort!r}; accepted: ascending, descending, random")
    return dataset
