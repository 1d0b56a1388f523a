"""privasr-exposure: exposure of canaries from a model's hypotheses, and comparison of runs.

Score one model::

    privasr-exposure --canaries canaries.csv --holdout holdout.csv --hyps hyps.csv \\
        [--metric cer|wer|score] [--direction lower|higher] [--method interpolation|extrapolation] \\
        [--ties mean|reference] --out exposure.json [--plot exposure.png] [--label baseline]

Compare runs (one markdown table, one plot)::

    privasr-exposure compare base/exposure.json pcc/exposure.json [--labels base pcc] \\
        --plot cmp.png [--out table.md]

``hyps.csv`` has columns ``ID,hyp`` and optionally ``score``, one row per canary and holdout
ID (a UTF-8 byte-order mark is accepted). ``--direction``: which scores mean the model finds an
utterance likelier; ``lower`` (the default) for CER, WER and a loss (the recipes' decoders write
the per-utterance loss as ``score``), ``higher`` for e.g. a log-likelihood (``--metric score``
only). ``compare`` refuses reports that differ in metric, direction, holdout size, tie rule or
method. Exposure by interpolation lies in ``[log2(|R|/(|R|+1)), log2 |R|]``; see
:mod:`privasr.exposure` for the definitions. Bad input: one line ``privasr-exposure: error: ...``,
exit status 2, nothing written.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from privasr.cli import CliParser, check_output_file, run_cli
from privasr.exposure import (DIRECTIONS, METHODS, METRICS, TIES, compare_reports, describe_settings, load_report,
                              markdown_table, plot_exposure, score_exposure)

PROG = "privasr-exposure"


def _score_parser() -> CliParser:
    p = CliParser(prog=PROG, description="Exposure of Secret Sharer canaries.",
                  epilog=f"To compare runs: {PROG} compare A.json B.json ... --plot cmp.png")
    p.add_argument("--canaries", required=True, help="canaries.csv (manifest with an insertions column)")
    p.add_argument("--holdout", required=True, help="holdout.csv (manifest)")
    p.add_argument("--hyps", required=True, help="CSV with columns ID,hyp[,score]")
    p.add_argument("--metric", choices=METRICS, default="cer",
                   help="ranking score: cer, wer (of hyp against the manifest's wrd) or the score column (default cer)")
    p.add_argument("--direction", choices=DIRECTIONS, default="lower",
                   help="which scores mean the model finds an utterance likelier: lower (default; CER, WER and a "
                        "loss, e.g. the decoders' score column) or higher (e.g. a log-likelihood; --metric score only)")
    p.add_argument("--method", choices=METHODS, default="interpolation", help="default interpolation")
    p.add_argument("--ties", choices=TIES, default="mean", help="tie rule of the rank (default mean)")
    p.add_argument("--out", required=True, help="exposure.json to write")
    p.add_argument("--plot", help="PNG of exposure against insertions")
    p.add_argument("--label", help="row label of the table (default: the directory of --hyps)")
    return p


def _compare_parser() -> CliParser:
    # prog stays PROG so that errors read "privasr-exposure: error: ..." like the scoring mode's
    p = CliParser(prog=PROG, usage=f"{PROG} compare [-h] REPORT [REPORT ...] [--labels LABEL ...] --plot PLOT "
                  f"[--out OUT]", description="Compare exposure reports: one table, one plot. Reports must share "
                  "metric, direction, holdout size, tie rule and method.")
    p.add_argument("reports", nargs="+", help="exposure.json files")
    p.add_argument("--labels", nargs="+", help="one label per report (default: file names)")
    p.add_argument("--plot", required=True, help="PNG to write")
    p.add_argument("--out", help="markdown table to write")
    return p


def _check_outputs(inputs: Sequence[str], **outputs: str | None) -> None:
    """Refuse, before any work, outputs that cannot be written, repeat each other or overwrite an input."""
    given = {option: path for option, path in outputs.items() if path is not None}
    for option, path in given.items():
        check_output_file(path, f"--{option}")
    resolved = {option: Path(path).resolve() for option, path in given.items()}
    if len(set(resolved.values())) < len(resolved):
        raise ValueError(f"{' and '.join('--' + o for o in resolved)} name the same file")
    for option, path in resolved.items():
        if any(Path(i).resolve() == path for i in inputs):
            raise ValueError(f"--{option} {given[option]} is one of the inputs: it would be overwritten")


def _write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _score(argv: Sequence[str]) -> None:
    args = _score_parser().parse_args(argv)
    _check_outputs([args.canaries, args.holdout, args.hyps], out=args.out, plot=args.plot)
    report = score_exposure(args.canaries, args.holdout, args.hyps, args.metric, args.method, args.ties,
                            args.direction)
    report["label"] = args.label or Path(args.hyps).resolve().parent.name
    _write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(describe_settings(report))
    print(markdown_table({report["label"]: report["by_insertions"]}), end="")
    capped = sum(entry.get("capped", False) for entry in report["per_canary"])
    if capped:
        print(f"note: {capped} canary CDF(s) underflowed; their exposure is capped (\"capped\": true)")
    if args.plot:
        interpolated = args.method == "interpolation"
        plot_exposure({report["label"]: report["by_insertions"]}, args.plot,
                      max_exposure=math.log2(report["holdout_size"]) if interpolated else None)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


def _compare(argv: Sequence[str]) -> None:
    args = _compare_parser().parse_args(argv)
    _check_outputs(args.reports, out=args.out, plot=args.plot)
    runs = compare_reports(args.reports, args.labels)  # refused unless comparable
    first = load_report(args.reports[0])
    table = markdown_table(runs)
    print(describe_settings(first))
    print(table, end="")
    if args.out:
        _write_text(args.out, table)
    interpolated = first["method"] == "interpolation"
    plot_exposure(runs, args.plot, title="Canary exposure by run",
                  max_exposure=math.log2(first["holdout_size"]) if interpolated else None)


def _main(argv: Sequence[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        _compare(argv[1:])
    else:
        _score(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
