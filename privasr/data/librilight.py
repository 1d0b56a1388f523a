"""Libri-Light: an extracted (or VAD-cut) audio tree to an audio-only manifest (no download).

Libri-Light is unlabeled: pre-training (:mod:`privasr.ssl`) reads only ``ID``, ``duration`` and
``wav``. Expected layout, as extracted from the ``small``/``medium``/``large`` tarballs or as
written by libri-light's ``cut_by_vad.py`` (which cuts the hour-long recordings into segments)::

    ROOT/<subset>/<speaker>/<book>/<file>.flac

The manifest gets one row per FLAC file, sorted by ID: ``ID`` = ``<speaker>-<book>-<file>``
(unique within a subset; the subset is prepended when several are combined), ``duration`` from
:func:`soundfile.info`, ``wav`` the absolute path, ``spk_id`` the speaker, ``wrd`` empty.
Files longer than ``--max-duration`` seconds are counted and reported, as the recipe leaves them
out: uncut Libri-Light needs ``cut_by_vad.py`` first.

Usage::

    python -m privasr.data.librilight --root /data/librilight_cut --subsets small \\
        --out data/librilight.csv [--nj 8]
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from privasr.cli import CliParser, run_cli
from privasr.data import audio_durations, is_done, mark_done
from privasr.data.manifest import Utterance, write_manifest

__all__ = ["prepare_librilight", "find_audio"]

log = logging.getLogger(__name__)


def find_audio(root: str | Path, subset: str) -> list[tuple[str, Path, str]]:
    """``(ID, flac path, speaker)`` of every ``<speaker>/<book>/<file>.flac`` of ``root/subset``.

    Raises :class:`FileNotFoundError` when the subset directory is missing or holds no FLAC file
    at that depth (the error says which layout was expected).
    """
    subset_dir = Path(root) / subset
    if not subset_dir.is_dir():
        raise FileNotFoundError(f"Libri-Light subset '{subset}' not found: {subset_dir}")
    files = sorted(subset_dir.glob("*/*/*.flac"))
    if not files:
        raise FileNotFoundError(f"no audio (<speaker>/<book>/<file>.flac) under {subset_dir}")
    return [("-".join((f.parent.parent.name, f.parent.name, f.stem)), f.resolve(), f.parent.parent.name)
            for f in files]


def prepare_librilight(root: str | Path, subsets: Sequence[str], out: str | Path, nj: int = 1,
                       max_duration: float = 30.0) -> Path:
    """Write the audio-only manifest ``out`` of ``subsets``; skipped when already written from the same tree."""
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    if not subsets:
        raise ValueError("no subset given")
    found = {subset: find_audio(root, subset) for subset in subsets}  # every subset located first
    out = Path(out)
    marker = out.with_name(f".{out.name}.done")
    params = {"root": str(Path(root).resolve()), "subsets": list(subsets), "files": sum(map(len, found.values()))}
    if is_done(marker, params, [out]):
        log.info("%s already prepared (nothing to do)", out)
        return out
    entries = [(f"{subset}-{uid}" if len(subsets) > 1 else uid, path, spk)
               for subset, rows in found.items() for uid, path, spk in rows]
    durations = audio_durations([e[1] for e in entries], nj, desc="libri-light")
    utterances = [Utterance(uid, d, str(path), spk, "") for (uid, path, spk), d in zip(entries, durations)]
    write_manifest(out, sorted(utterances, key=lambda u: u.id))
    mark_done(marker, params)
    long = sum(d > max_duration for d in durations)
    log.info("%s: %d files, %.2f h", out, len(entries), sum(durations) / 3600)
    if long:
        log.warning("%d of %d files are longer than %.0f s and will be left out by pre-training: "
                    "cut Libri-Light with its cut_by_vad.py first", long, len(entries), max_duration)
    return out


def _parser() -> CliParser:
    parser = CliParser(prog="python -m privasr.data.librilight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the directory holding the subsets (small, medium, ...)")
    parser.add_argument("--subsets", nargs="+", default=["small"], help="default: %(default)s")
    parser.add_argument("--out", required=True, help="the manifest to write, e.g. data/librilight.csv")
    parser.add_argument("--nj", type=int, default=1, help="parallel jobs reading durations")
    parser.add_argument("--max-duration", type=float, default=30.0,
                        help="report files longer than this (the recipe's max_duration; default %(default)s s)")
    return parser


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_librilight(args.root, args.subsets, args.out, nj=args.nj, max_duration=args.max_duration))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_cli(_main, argv, prog="python -m privasr.data.librilight")


if __name__ == "__main__":
    sys.exit(main())
