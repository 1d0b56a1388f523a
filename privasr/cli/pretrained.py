"""privasr-pretrained: keep a finished pre-training in the repository, check one, install one into a job.

    privasr-pretrained keep RUN --tokenizer DIR --out DEST [--notes FILE]   # a finished run -> a kept pre-training
    privasr-pretrained verify DEST          # every file's SHA-256, the tokenizer, a final checkpoint; prints what it is
    privasr-pretrained install DEST [--tokenizer DATA/tokenizer] [--run EXP/pretrain]   # idempotent; refuses other contents
    privasr-pretrained epochs DEST          # the epochs it trained (its fine-tunings continue the counter)
    privasr-pretrained model-args DEST      # the train.py overrides that give a fine-tuning its model

What a kept pre-training holds and what is checked: :mod:`privasr.pretrained`. Every problem ends with one line
``privasr-pretrained: error: ...`` and status 2; nothing here imports torch but ``keep``.
"""
from __future__ import annotations

import sys
from typing import Sequence

from privasr import pretrained
from privasr.cli import CliParser, run_cli

PROG = "privasr-pretrained"


def _parser() -> CliParser:
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=CliParser)
    keep = sub.add_parser("keep", help="keep a finished run's last checkpoint, fingerprint and tokenizer")
    keep.add_argument("run", help="the finished run's folder (its fingerprint.json and save/)")
    keep.add_argument("--tokenizer", required=True, help="the tokenizer folder it trained with")
    keep.add_argument("--out", required=True, help="the new folder to keep it in")
    keep.add_argument("--notes", help="a file saved as README.md beside it (how it was made)")
    for name, text in (("verify", "check it and print what it is"), ("epochs", "print its epochs"),
                       ("model-args", "print the train.py overrides of its model settings")):
        sub.add_parser(name, help=text).add_argument("kept", help="the kept pre-training's folder")
    install = sub.add_parser("install", help="copy it into a job (idempotent)")
    install.add_argument("kept", help="the kept pre-training's folder")
    install.add_argument("--tokenizer", help="the tokenizer folder to create (e.g. data/tokenizer)")
    install.add_argument("--run", help="the finished-run folder to create (e.g. exp/pretrain)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, PROG)


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keep":
        notes = open(args.notes, encoding="utf-8").read() if args.notes else None
        pretrained.keep(args.run, args.tokenizer, args.out, notes)
        print(pretrained.describe(args.out))
    elif args.command == "verify":
        print(pretrained.describe(args.kept))
    elif args.command == "epochs":
        print(pretrained.epochs(args.kept))
    elif args.command == "model-args":
        print(" ".join(pretrained.model_overrides(args.kept)))
    else:
        if not (args.tokenizer or args.run):
            raise pretrained.UserError("install: give --tokenizer DIR, --run DIR or both")
        for what, dest, install in (("tokenizer", args.tokenizer, pretrained.install_tokenizer),
                                    ("pre-training", args.run, pretrained.install_run)):
            if dest:
                print(f"{args.kept}: {what} {'installed in' if install(args.kept, dest) else 'already in'} {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
