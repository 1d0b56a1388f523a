"""LibriSpeech: an extracted corpus tree to SpeechBrain manifests (no download).

Expected layout (as extracted from the openslr.org tarballs)::

    ROOT/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    ROOT/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac

``ROOT`` may be the ``LibriSpeech`` directory or its parent. Each line of a ``.trans.txt``
file is ``<utterance id> <TRANSCRIPT>``. The manifest ``<out>/<split>.csv`` gets one row per
transcript line: ``ID`` the utterance id, ``duration`` from :func:`soundfile.info`, ``wav``
the absolute FLAC path, ``spk_id`` the speaker, ``wrd`` the transcript. Rows are sorted by ID.

With ``--recipe-dir DATA --train-splits ...`` it also writes the recipe's three manifests:
``DATA/train.csv`` (the train splits concatenated), ``DATA/dev.csv`` (dev-clean) and
``DATA/test.csv`` (test-clean) -- again only when they are missing or were made from other splits.

Usage::

    python -m privasr.data.librispeech --root /data/LibriSpeech \\
        --splits train-clean-100 dev-clean test-clean --out data/librispeech [--nj 4] \\
        [--recipe-dir data --train-splits train-clean-100]
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterable, Sequence

from privasr.cli import CliParser, run_cli
from privasr.data import audio_durations, is_done, mark_done
from privasr.data.manifest import Utterance, read_manifest, write_manifest

__all__ = ["prepare_librispeech", "write_recipe_manifests", "find_split", "read_transcripts", "DEFAULT_SPLITS"]

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("train-clean-100", "dev-clean", "test-clean")


def find_split(root: str | Path, split: str) -> Path:
    """The directory of ``split`` under ``root`` or ``root/LibriSpeech``.

    Raises :class:`FileNotFoundError` naming the places looked at.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech root not found: {root}")
    candidates = [root / split, root / "LibriSpeech" / split]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"LibriSpeech split '{split}' not found (looked for {' and '.join(map(str, candidates))})")


def read_transcripts(split_dir: str | Path) -> list[tuple[str, Path, str, str]]:
    """``(utterance id, flac path, speaker, transcript)`` for every line of every ``.trans.txt``.

    Raises :class:`FileNotFoundError` when the split holds no transcript or a listed FLAC file
    is missing, and :class:`ValueError` for a malformed line (both name the file and line).
    """
    split_dir = Path(split_dir)
    trans_files = sorted(split_dir.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise FileNotFoundError(f"no transcripts (<speaker>/<chapter>/*.trans.txt) under {split_dir}")
    entries = []
    for trans in trans_files:
        entries.extend(_read_trans_file(trans))
    return sorted(entries)


def _read_trans_file(trans: Path) -> Iterable[tuple[str, Path, str, str]]:
    speaker, chapter = trans.parent.parent.name, trans.parent.name
    for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        utt_id, _, text = line.strip().partition(" ")
        if not utt_id.startswith(f"{speaker}-{chapter}-") or not text.strip():
            raise ValueError(f"{trans}:{number}: expected '{speaker}-{chapter}-<n> TRANSCRIPT', got '{line.strip()}'")
        flac = trans.parent / f"{utt_id}.flac"
        if not flac.is_file():
            raise FileNotFoundError(f"{trans}:{number}: audio of '{utt_id}' not found: {flac}")
        yield utt_id, flac.resolve(), speaker, " ".join(text.split())


def _manifest(entries: Sequence[tuple[str, Path, str, str]], nj: int, split: str) -> list[Utterance]:
    durations = audio_durations([e[1] for e in entries], nj, desc=f"librispeech {split}")
    return [Utterance(i, d, str(f), spk, text) for (i, f, spk, text), d in zip(entries, durations)]


def prepare_librispeech(
    root: str | Path,
    splits: Sequence[str] = DEFAULT_SPLITS,
    out_dir: str | Path = "data/librispeech",
    nj: int = 1,
) -> dict[str, Path]:
    """Write ``<out_dir>/<split>.csv`` for each split; return ``{split: manifest path}``.

    Every split is located before any is processed, so a missing one fails fast. A split whose
    manifest was already written from the same root is skipped.
    """
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    if not splits:
        raise ValueError("no split given")
    split_dirs = {split: find_split(root, split) for split in splits}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for split, split_dir in split_dirs.items():
        outputs[split] = _prepare_split(split, split_dir, out_dir, nj)
    return outputs


def _prepare_split(split: str, split_dir: Path, out_dir: Path, nj: int) -> Path:
    manifest = out_dir / f"{split}.csv"
    marker = out_dir / f".{split}.done"
    params = {"split_dir": str(split_dir.resolve())}
    if is_done(marker, params, [manifest]):
        log.info("%s already prepared (nothing to do)", manifest)
        return manifest
    utterances = _manifest(read_transcripts(split_dir), nj, split)
    write_manifest(manifest, utterances)
    mark_done(marker, params)
    hours = sum(u.duration for u in utterances) / 3600
    log.info("%s: %d utterances, %.2f h, %d speakers", split, len(utterances), hours,
             len({u.spk_id for u in utterances}))
    return manifest


def write_recipe_manifests(prepared: dict[str, Path], recipe_dir: str | Path, train_splits: Sequence[str],
                           dev_split: str = "dev-clean", test_split: str = "test-clean") -> dict[str, Path]:
    """``recipe_dir/{train,dev,test}.csv`` from the per-split manifests ``prepared`` (see
    :func:`prepare_librispeech`); skipped when written before from the same splits."""
    missing = [s for s in (*train_splits, dev_split, test_split) if s not in prepared]
    if missing:
        raise ValueError(f"split(s) {', '.join(missing)} not prepared; add them to --splits")
    recipe_dir = Path(recipe_dir)
    outputs = {name: recipe_dir / f"{name}.csv" for name in ("train", "dev", "test")}
    marker = recipe_dir / ".librispeech_recipe.done"
    # a source manifest rewritten (e.g. from another --root) has another size or mtime: redo
    params = {"train": list(train_splits), "dev": dev_split, "test": test_split,
              "sources": {s: [str(Path(prepared[s]).resolve()), Path(prepared[s]).stat().st_size,
                              Path(prepared[s]).stat().st_mtime_ns] for s in (*train_splits, dev_split, test_split)}}
    if is_done(marker, params, outputs.values()):
        log.info("%s/{train,dev,test}.csv already written (nothing to do)", recipe_dir)
        return outputs
    write_manifest(outputs["train"], [u for s in train_splits for u in read_manifest(prepared[s])])
    write_manifest(outputs["dev"], read_manifest(prepared[dev_split]))
    write_manifest(outputs["test"], read_manifest(prepared[test_split]))
    mark_done(marker, params)
    log.info("%s: train.csv (%s), dev.csv (%s), test.csv (%s)", recipe_dir, " + ".join(train_splits),
             dev_split, test_split)
    return outputs


def _parser() -> CliParser:
    parser = CliParser(prog="python -m privasr.data.librispeech", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the LibriSpeech directory (or its parent)")
    parser.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="default: %(default)s")
    parser.add_argument("--out", required=True, help="output directory for <split>.csv")
    parser.add_argument("--nj", type=int, default=1, help="parallel jobs reading durations")
    parser.add_argument("--recipe-dir", help="also write the recipe's train.csv, dev.csv and test.csv here")
    parser.add_argument("--train-splits", nargs="+", help="the splits concatenated into train.csv (with --recipe-dir)")
    return parser


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.recipe_dir and not args.train_splits:
        raise ValueError("--recipe-dir needs --train-splits")
    prepared = prepare_librispeech(args.root, args.splits, args.out, nj=args.nj)
    for split, path in prepared.items():
        print(f"{split}: {path}")
    if args.recipe_dir:
        for name, path in write_recipe_manifests(prepared, args.recipe_dir, args.train_splits).items():
            print(f"{name}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_cli(_main, argv, prog="python -m privasr.data.librispeech")


if __name__ == "__main__":
    sys.exit(main())
