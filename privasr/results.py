"""Stage 6 of the egs recipes: every run's transcripts into ``exp/RESULTS.md`` and plots.

For each method and seed, ``<exp>/<method>/seed<s>/hyps/{test,dev,train_eval,canaries,holdout}.csv``
(``ID,hyp,ref,score``, written by ``train.py --mode decode``) give:

* Table 2 — WER on test and dev, mean ± std over seeds;
* Table 5 — the generalization gap, WER(test) − WER(train subset);
* Table 1 — canary exposure per insertion count, ranked by CER and by the model's loss,
  mean ± std over seeds of each seed's mean over its canaries (one seed: std over canaries;
  ``exposure_<metric>.json`` per run as well).

This module builds the rows; :mod:`privasr.results_md` writes the markdown (the one RESULTS.md writer).

    python -m privasr.results --exp exp --canaries data/canaries/canaries.csv \\
        --holdout data/canaries/holdout.csv --methods "baseline pcc apcc" --seeds "1 2 3"
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from privasr.exposure import markdown_table, plot_exposure, score_exposure, summarize_over_seeds
from privasr.metrics import wer
from privasr.provenance import (INIT_FINGERPRINT_FILE, ProvenanceError, check_references, check_transcripts,
                                describe_run, read_fingerprint)
from privasr.results_md import ResultsMarkdown, mean_std, write_atomic

EXPOSURE_METRICS = {"cer": "CER", "score": "loss"}
DECODED_SETS = ("test", "dev", "train_eval", "canaries", "holdout")


def read_transcripts(path: Path) -> tuple[list[str], list[str]]:
    """References and hypotheses of a ``hyps/*.csv``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["ref"] for r in rows], [r["hyp"] for r in rows]


def run_wers(run_dir: Path) -> dict[str, float]:
    """WER (%) of each decoded set of one run."""
    out = {}
    for name in ("test", "dev", "train_eval"):
        path = run_dir / "hyps" / f"{name}.csv"
        if path.exists():
            refs, hyps = read_transcripts(path)
            out[name] = 100 * wer(refs, hyps)
    if "test" in out and "train_eval" in out:
        out["gap"] = out["test"] - out["train_eval"]
    return out


def run_exposures(run_dir: Path, canaries: Path, holdout: Path) -> dict[str, dict]:
    """``{metric: exposure report}`` of one run; each report also saved as exposure_<metric>.json."""
    reports = {}
    for metric in EXPOSURE_METRICS:
        report = score_exposure(canaries, holdout, run_dir / "hyps" / "canaries_and_holdout.csv", metric=metric)
        (run_dir / f"exposure_{metric}.json").write_text(json.dumps(report, indent=1))
        reports[metric] = report
    return reports


def merge_hyps(run_dir: Path) -> None:
    """canaries.csv + holdout.csv -> canaries_and_holdout.csv (what privasr-exposure reads)."""
    rows, header = [], None
    for name in ("canaries", "holdout"):
        with open(run_dir / "hyps" / f"{name}.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            rows += list(reader)
    with open(run_dir / "hyps" / "canaries_and_holdout.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def exposure_spread_note(seeds: int) -> str:
    """The sentence under an exposure table saying what its ± is."""
    if seeds > 1:
        return f"Mean ± std over {seeds} seeds of each seed's mean exposure over its canaries."
    return "One seed: mean ± std over its canaries (run-to-run spread needs --seeds with several seeds)."


def check_run_transcripts(run_dir: Path, canaries: Path, holdout: Path) -> None:
    """Refuse transcripts not traceable to the run's checkpoint, or not of these canaries and holdout."""
    check_transcripts(run_dir, DECODED_SETS)
    check_references(run_dir / "hyps" / "canaries.csv", canaries)
    check_references(run_dir / "hyps" / "holdout.csv", holdout)


def run_settings(runs: list[dict], key: str = "settings") -> str:
    """A method's settings (b, B, C) or training; seeds trained otherwise are refused."""
    described = {r[key] for r in runs}
    if len(described) > 1:
        raise ValueError(f"the seeds of one method were trained with other settings: {' / '.join(sorted(described))}")
    return described.pop()


def run_training(run_dir: Path, fingerprint: dict) -> str:
    """How a run was trained: its epochs with the canaries, and the canary-free pre-training it started
    from (its epochs and record digest, from ``init_fingerprint.json``), if any."""
    epochs = int(fingerprint["settings"]["number_of_epochs"])
    init = read_fingerprint(run_dir, INIT_FINGERPRINT_FILE)
    if init is None:
        return f"{epochs} epochs with the canaries, from scratch"
    before = int(init["settings"]["number_of_epochs"])
    return f"{before} epochs without canaries (pre-training {fingerprint['init']}), then {epochs - before} with them"


def collect(exp: Path, canaries: Path, holdout: Path, methods: list[str], seeds: list[str]) -> dict:
    results = {}
    for method in methods:
        runs = []
        for seed in seeds:
            run_dir = exp / method / f"seed{seed}"
            if not (run_dir / "hyps" / "canaries.csv").exists():
                raise FileNotFoundError(f"{run_dir}/hyps/canaries.csv not found: run the decode stage (5) first")
            check_run_transcripts(run_dir, canaries, holdout)
            merge_hyps(run_dir)
            fingerprint = read_fingerprint(run_dir)
            runs.append({"seed": seed, "settings": describe_run(fingerprint),
                         "training": run_training(run_dir, fingerprint), "wer": run_wers(run_dir),
                         "exposure": run_exposures(run_dir, canaries, holdout)})
        results[method] = runs
    return results


def write_results(exp: Path, results: dict) -> Path:
    """RESULTS.md (written by :class:`privasr.results_md.ResultsMarkdown`), results.json and the exposure
    plots; returns the RESULTS.md path."""
    first = next(iter(results.values()))
    holdout_size = first[0]["exposure"]["cer"]["holdout_size"]
    report = ResultsMarkdown("Results")
    report.paragraph(f"Methods: {', '.join(results)}; seeds: {', '.join(r['seed'] for r in first)}; "
                     f"holdout |R| = {holdout_size} (exposure ceiling log2|R| = {math.log2(holdout_size):.2f} bits, "
                     "floor ≈ 1 bit).")
    report.heading("Runs")
    report.table(["method", "settings (b: bound, B: per-core batch, C: cores)", "training", "seeds"],
                 [[method, run_settings(runs), run_settings(runs, "training"), len(runs)]
                  for method, runs in results.items()])

    def wer_cell(runs, name):
        return mean_std([r["wer"].get(name) for r in runs])

    report.heading("WER (%) — Table 2")
    report.table(["method", "test", "dev"],
                 [[method, wer_cell(runs, "test"), wer_cell(runs, "dev")] for method, runs in results.items()])
    report.heading("Generalization gap — Table 5")
    report.table(["method", "train subset WER", "test WER", "gap (test − train)"],
                 [[method, wer_cell(runs, "train_eval"), wer_cell(runs, "test"), wer_cell(runs, "gap")]
                  for method, runs in results.items()])
    for metric, label in EXPOSURE_METRICS.items():
        pooled = {m: summarize_over_seeds([r["exposure"][metric] for r in runs]) for m, runs in results.items()}
        plot = exp / f"exposure_{metric}.png"
        plot_exposure(pooled, plot, max_exposure=math.log2(holdout_size), title=f"Canary exposure (ranked by {label})")
        report.heading(f"Exposure ranked by {label} — Table 1")
        report.paragraph(exposure_spread_note(len(first)))
        report.lines(markdown_table(pooled))
        report.image(f"exposure by {label}", plot.name)
    path = report.write(exp / "RESULTS.md")
    write_atomic(exp / "results.json", json.dumps(results, indent=1, default=str))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Score every run of an egs recipe into RESULTS.md")
    p.add_argument("--exp", required=True, type=Path)
    p.add_argument("--canaries", required=True, type=Path)
    p.add_argument("--holdout", required=True, type=Path)
    p.add_argument("--methods", required=True, help="space-separated run names")
    p.add_argument("--seeds", required=True, help="space-separated seeds")
    args = p.parse_args(argv)
    try:
        results = collect(args.exp, args.canaries, args.holdout, args.methods.split(), args.seeds.split())
        path = write_results(args.exp, results)
    except (FileNotFoundError, ValueError, ProvenanceError) as err:
        print(f"privasr.results: error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
