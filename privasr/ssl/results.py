r"""``RESULTS.md`` of DP pre-training: the (ε, δ) of the encoder next to the WER it fine-tunes to.

Reads the pre-training's ``privacy.json`` (written by :class:`privasr.dp.brain.DPSGDBrain`)
and, for every fine-tuned model, its ``hyps/dev.csv`` and ``hyps/test.csv`` (``ID,hyp,ref,score``,
written by the ASR recipe's ``train.py``); WER is recomputed from them with
:func:`privasr.metrics.wer`. A fine-tuning run named ``scratch`` (no pre-trained encoder)
used no private data: its ε is reported as 0. This module builds the rows; :mod:`privasr.results_md`
writes the markdown (the one RESULTS.md writer).

Usage::

    python -m privasr.ssl.results --pretrain exp/dp/pretrain \
        --finetune dp=exp/dp/finetune scratch=exp/dp/scratch --out exp/dp/RESULTS.md
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from privasr.cli import CliParser, run_cli
from privasr.metrics import wer
from privasr.results_md import ResultsMarkdown

__all__ = ["read_wer", "results_markdown", "write_results"]

SCRATCH = "scratch"


def read_wer(hyps_csv: str | Path) -> float:
    """Corpus WER (%) of an ``ID,hyp,ref,score`` transcript file."""
    with open(hyps_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"hyp", "ref"} <= set(rows[0]):
        raise ValueError(f"{hyps_csv}: expected a non-empty CSV with 'hyp' and 'ref' columns")
    return 100.0 * wer([r["ref"] for r in rows], [r["hyp"] for r in rows])


def _privacy(pretrain: Path) -> dict:
    path = pretrain / "privacy.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: run the DP pre-training stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def _row(name: str, folder: Path, privacy: dict) -> list[str]:
    hyps = {s: folder / "hyps" / f"{s}.csv" for s in ("dev", "test")}
    for path in hyps.values():
        if not path.is_file():
            raise ValueError(f"{path} not found: run the fine-tuning stage of {name!r} first")
    scratch = name == SCRATCH
    pre = "none (random init)" if scratch else "BEST-RQ, DP-SGD"
    eps = "0" if scratch else f"{privacy['epsilon']:.3g}"
    return [name, pre, eps, f"{privacy['delta']:g}", f"{read_wer(hyps['dev']):.2f}", f"{read_wer(hyps['test']):.2f}"]


def _report(pretrain: str | Path, finetuned: Dict[str, str | Path], title: Optional[str] = None) -> ResultsMarkdown:
    if not finetuned:
        raise ValueError("give at least one fine-tuned model (NAME=DIR)")
    privacy = _privacy(Path(pretrain))
    report = ResultsMarkdown(title or "DP pre-training (BEST-RQ + DP-SGD), then CTC fine-tuning")
    report.table(["model", "encoder pre-training", "ε", "δ", "dev WER (%)", "test WER (%)"],
                 [_row(name, Path(folder), privacy) for name, folder in finetuned.items()])
    frozen = privacy["frozen_layers"]
    report.paragraph(
        f"**Guarantee.** The encoder is ({privacy['epsilon']:.4g}, {privacy['delta']:g})-DP with respect to the "
        f"{privacy['dataset_size']} private pre-training utterances ({privacy['accountant'].upper()} accountant, "
        "add/remove-one neighbours); the fine-tuning data is treated as public, as in the paper.")
    report.paragraph(
        f"**DP-SGD.** σ = {privacy['noise_multiplier']:g}, C = {privacy['clip_bound']:g} "
        f"({privacy['clip_mode']} clipping), q = {privacy['sample_rate']:.4g} (expected batch "
        f"{privacy['expected_batch_size']:g}), {privacy['steps']} steps"
        + (f", target ε = {privacy['target_epsilon']:g}" if privacy.get("target_epsilon") else "")
        + (" (stopped at the target)" if privacy.get("stopped_at_target") else "") + ".")
    report.paragraph(
        f"**Warm-start and LayerFreeze.** {privacy['warm_start_steps']} non-private steps on the public subset; "
        f"{len(frozen)} layer(s) frozen ({privacy['total_parameters'] - privacy['trained_parameters']:,} of "
        f"{privacy['total_parameters']:,} parameters){': ' + ', '.join(frozen) if frozen else ''}.")
    return report


def results_markdown(pretrain: str | Path, finetuned: Dict[str, str | Path], title: Optional[str] = None) -> str:
    """The RESULTS.md text for one DP pre-training and its fine-tuned models."""
    return _report(pretrain, finetuned, title).text()


def write_results(out: str | Path, pretrain: str | Path, finetuned: Dict[str, str | Path],
                  title: Optional[str] = None) -> Path:
    """Write :func:`results_markdown` to ``out`` (atomically, :mod:`privasr.results_md`); returns the path."""
    return _report(pretrain, finetuned, title).write(out)


def _named(items: Sequence[str]) -> Dict[str, str]:
    named = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--finetune takes NAME=DIR, got {item!r}")
        named[name] = folder
    return named


def _main(argv: Optional[Sequence[str]]) -> None:
    parser = CliParser(prog="privasr.ssl.results", description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", required=True, help="the DP pre-training's output folder (privacy.json)")
    parser.add_argument("--finetune", nargs="+", required=True, metavar="NAME=DIR",
                        help="fine-tuning output folders (hyps/dev.csv, hyps/test.csv); NAME 'scratch' = no pre-training")
    parser.add_argument("--out", required=True, help="the RESULTS.md to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    path = write_results(args.out, args.pretrain, _named(args.finetune), args.title)
    print(path.read_text(encoding="utf-8"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv, "privasr.ssl.results")


if __name__ == "__main__":
    sys.exit(main())
