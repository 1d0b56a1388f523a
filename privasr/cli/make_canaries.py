"""privasr-canaries: make Secret Sharer canaries, a holdout set, and insert the canaries.

Example (mini_tts)::

    privasr-canaries --out data/canaries --train-in data/mini_tts/train.csv \\
        --train-out data/mini_tts/train_with_canaries.csv --nj 2

Writes ``canaries.csv`` (manifest + ``insertions``), ``holdout.csv`` and the training manifest
with each canary repeated ``insertions`` times (IDs ``canary_0003_r1``...), then prints the
milliseconds of audio per character of each set. See :mod:`privasr.canaries`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from privasr.canaries import (DEFAULT_COUNTS, DEFAULT_VOICE, MIN_MS_PER_CHAR, char_duration_stats, format_char_stats,
                              make_canaries)
from privasr.cli import CliParser, check_output_file, nonnegative_int, positive_float, positive_int, run_cli
from privasr.data.manifest import read_manifest
from privasr.tts import ENGINES, Voice

PROG = "privasr-canaries"


def _parser() -> CliParser:
    p = CliParser(prog=PROG, description="Make Secret Sharer canaries and a holdout set; insert the canaries.")
    p.add_argument("--out", required=True, help="output directory (canaries.csv, holdout.csv, wav/)")
    p.add_argument("--train-in", help="training manifest; its lexicon is the default vocabulary")
    p.add_argument("--train-out", help="training manifest with canaries (default OUT/train_with_canaries.csv)")
    p.add_argument("--vocab", help="word list, one word per line (instead of the training lexicon)")
    p.add_argument("--counts", type=positive_int, nargs="+", default=list(DEFAULT_COUNTS),
                   help="insertion counts (default 1 2 4 8 16)")
    p.add_argument("--per-count", type=positive_int, default=20, help="canaries per insertion count (default 20)")
    p.add_argument("--holdout", type=positive_int, default=1000,
                   help="holdout utterances, never inserted (default 1000)")
    p.add_argument("--words", type=positive_int, default=7, help="words per transcript (default 7)")
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_VOICE.engine)
    p.add_argument("--voice", nargs="+", default=[DEFAULT_VOICE.name],
                   help="voice(s), drawn uniformly per utterance (default en-us)")
    p.add_argument("--rate", type=positive_int, default=DEFAULT_VOICE.rate,
                   help="words per minute before the speed-up (default 80)")
    p.add_argument("--pitch", type=nonnegative_int, default=None, help="espeak-ng pitch 0..99 / flite F0 in Hz")
    p.add_argument("--word-gap", type=nonnegative_int, default=DEFAULT_VOICE.word_gap,
                   help="espeak-ng pause between words in 10 ms units (default 16)")
    p.add_argument("--speed", type=positive_float, default=4.0, help="sox tempo factor (default 4)")
    p.add_argument("--nj", type=positive_int, default=1, help="parallel synthesis jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame-ms", type=positive_float, default=MIN_MS_PER_CHAR,
                   help="the CTC model's output frame in ms, for the report of utterances with fewer than one frame "
                        "a character (default %(default)g: subsampling_factor 4; 20 for factor 2)")
    return p


def check_outputs(args) -> None:
    """Refuse, before any synthesis, outputs that cannot be written or would overwrite an input."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a directory")
    check_output_file(out / "canaries.csv", "--out")
    train_out = args.train_out if args.train_out is not None else (out / "train_with_canaries.csv" if args.train_in
                                                                   else None)
    if train_out is not None:
        check_output_file(train_out, "--train-out")
        if args.train_in is not None and Path(train_out).resolve() == Path(args.train_in).resolve():
            raise ValueError(f"--train-out {train_out} is --train-in: the training manifest would be overwritten")


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    check_outputs(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    voices = [Voice(args.engine, name, args.rate, args.pitch, args.word_gap) for name in args.voice]
    outputs = make_canaries(args.out, train_in=args.train_in, train_out=args.train_out, vocab=args.vocab,
                            counts=args.counts, per_count=args.per_count, holdout=args.holdout, length=args.words,
                            voices=voices, speed=args.speed, nj=args.nj, seed=args.seed)
    for name, path in outputs.items():
        print(f"{name}: {path}")
    for name in ("canaries", "holdout"):
        stats = char_duration_stats(read_manifest(outputs[name], check_audio=False), args.frame_ms)
        print(format_char_stats(name, stats))


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
