"""The mitigation study: a grid of clipping configurations fine-tuned from one pre-trained model.

``egs/mini_tts/run_study.sh`` drives it; this module plans the runs and scores them (its rows; the
markdown is written by :mod:`privasr.results_md`, the one RESULTS.md writer).

    python -m privasr.study plan conf/study.yaml --quantiles exp_study/quantiles   # one run per line
    python -m privasr.study score conf/study.yaml --exp exp_study --canaries ... --holdout ...

A configuration is ``{clipping, per_core, bound?, finetune_epochs?, reference?, overrides?}``
(``finetune_epochs`` overrides the study's, the fine-tuning length axis; ``reference`` names the
unclipped configuration its exposure is compared with seed by seed, by default ``baseline``, ``null``
for none); ``bound`` may be a number or ``p10``/``p50``: that quantile of the per-core norms of the
pre-trained model at the same per-core batch B and loss normalization (``<quantiles>/B<b>_<loss_reduction>.json``, written by
``privasr-norm-quantiles``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

from privasr.core_log import markdown_table as core_markdown_table
from privasr.core_log import plot_core_logs, read_core_logs, summarize
from privasr.exposure import (difference_over_seeds, markdown_table, plot_exposure, score_exposure,
                              summarize_over_seeds)
from privasr.provenance import file_digest
from privasr.results import collect
from privasr.results_md import ResultsMarkdown, mean_std

SPREAD_NOTE = ("Mean ± std over a configuration's seeds of each seed's mean exposure over its canaries; "
               "a configuration with one seed decoded shows the std over its canaries instead.")
REQUIRED = ("total_batch", "pretrain_epochs", "finetune_epochs", "quantile_batches", "seeds", "configs")


def load_study(path: str | Path) -> dict:
    with open(path) as f:
        study = yaml.safe_load(f)
    missing = [k for k in REQUIRED if k not in study]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    for name, cfg in study["configs"].items():
        if cfg.get("clipping") not in ("none", "global", "pcc", "apcc", "pec"):
            raise ValueError(f"{path}: config {name}: clipping must be none|global|pcc|apcc|pec")
        if study["total_batch"] % int(cfg.get("per_core", 1)) != 0:
            raise ValueError(f"{path}: config {name}: per_core must divide total_batch {study['total_batch']}")
        ref = reference(study, name)
        if ref is not None and study["configs"].get(ref, {}).get("clipping") != "none":
            raise ValueError(f"{path}: config {name}: reference {ref!r} is not an unclipped (clipping: none) configuration")
        epochs = finetune_epochs(study, name)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"{path}: config {name}: finetune_epochs must be a positive integer, got {epochs!r}")
    return study


def quantile_file(quantiles_dir: Path, per_core: int, loss_reduction: str) -> Path:
    return Path(quantiles_dir) / f"B{per_core}_{loss_reduction}.json"


def needed_quantiles(study: dict) -> list[tuple[int, str]]:
    """The (B, loss_reduction) pairs whose norm quantiles some configuration's bound refers to."""
    pairs = set()
    for cfg in study["configs"].values():
        if isinstance(cfg.get("bound"), str):
            pairs.add((int(cfg["per_core"]), cfg.get("overrides", {}).get("loss_reduction", "mean")))
    return sorted(pairs)


def resolve_bound(cfg: dict, quantiles_dir: Path) -> float | None:
    bound = cfg.get("bound")
    if bound is None or isinstance(bound, (int, float)):
        return bound
    reduction = cfg.get("overrides", {}).get("loss_reduction", "mean")
    path = quantile_file(quantiles_dir, int(cfg["per_core"]), reduction)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: measure the norm quantiles first (study stage 5)")
    table = json.loads(path.read_text())
    return table[str(cfg["per_core"])][bound]


def reference(study: dict, name: str) -> str | None:
    """The configuration ``name`` is compared with: its ``reference``, else ``baseline`` if there is one."""
    ref = study["configs"][name].get("reference", "baseline" if "baseline" in study["configs"] else None)
    return None if ref == name else ref


def finetune_epochs(study: dict, name: str) -> int:
    return study["configs"][name].get("finetune_epochs", study["finetune_epochs"])


def run_overrides(study: dict, name: str, quantiles_dir: Path) -> list[str]:
    """train.py overrides of one configuration (the fine-tuning epochs count from the pre-training)."""
    cfg = study["configs"][name]
    per_core = int(cfg.get("per_core", 1))
    args = [f"--clipping={cfg['clipping']}", f"--batch_size={study['total_batch']}",
            f"--virtual_cores={study['total_batch'] // per_core}",
            f"--number_of_epochs={study['pretrain_epochs'] + finetune_epochs(study, name)}"]
    bound = resolve_bound(cfg, quantiles_dir)
    if bound is not None:
        args.append(f"--clip_bound={bound:.6g}")
    args += [f"--{k}={v}" for k, v in cfg.get("overrides", {}).items()]
    return args


def score(study: dict, exp: Path, canaries: Path, holdout: Path, quantiles_dir: Path,
          commands: Path | None = None, pretrain_save: Path | None = None) -> Path:
    """exp/RESULTS.md of the study: one row per configuration, plots against B and bound."""
    names = list(study["configs"])
    decoded = {n: [str(s) for s in study["seeds"] if (exp / n / f"seed{s}" / "hyps" / "canaries.csv").exists()]
               for n in names}
    done = [n for n in names if decoded[n]]
    if not done:
        raise FileNotFoundError(f"no configuration of {exp} is decoded yet")
    results = {n: collect(exp, canaries, holdout, [n], decoded[n])[n] for n in done}
    holdout_size = results[done[0]][0]["exposure"]["cer"]["holdout_size"]
    report = ResultsMarkdown("Mitigation study")
    report.paragraph(f"Configurations decoded: {len(done)} of {len(names)} "
                     f"(seeds of the study: {', '.join(str(s) for s in study['seeds'])}; each row says how many it "
                     f"has); holdout |R| = {holdout_size} (ceiling {math.log2(holdout_size):.2f} bits).")
    report.table(["configuration", "seeds decoded"], [[n, ", ".join(decoded[n])] for n in done])
    for metric, label in (("cer", "CER"), ("score", "loss")):
        pooled = {n: summarize_over_seeds([r["exposure"][metric] for r in results[n]]) for n in done}
        report.heading(f"Exposure ranked by {label}")
        report.paragraph(SPREAD_NOTE)
        report.lines(markdown_table(pooled))
        _paired_table(report, study, results, decoded, metric, label)
        _plot_against(study, pooled, exp / f"exposure_vs_B_{metric}.png", "per_core", "per-core batch B", quantiles_dir)
        _plot_against(study, pooled, exp / f"exposure_vs_bound_{metric}.png", "bound", "clip bound b", quantiles_dir)
        plot_exposure(pooled, exp / f"exposure_{metric}.png", math.log2(holdout_size), f"Exposure by {label}")
    extrapolated = {n: _extrapolated_loss_exposure(exp, n, decoded[n], canaries, holdout) for n in done}
    report.heading("Exposure ranked by loss, extrapolated (skew-normal fit to the holdout losses; no log2|R| ceiling)")
    report.lines(markdown_table(extrapolated))
    report.heading("WER (%) and generalization gap (mean ± std over seeds)")
    rows = []
    for n in done:
        cfg, runs = study["configs"][n], results[n]
        bound = resolve_bound(cfg, quantiles_dir)
        rows.append([n, cfg.get("per_core"), "–" if bound is None else f"{bound:.3g}", finetune_epochs(study, n),
                     *(mean_std([r["wer"].get(name) for r in runs]) for name in ("test", "dev", "gap"))])
    report.table(["configuration", "B", "bound", "fine-tune epochs", "test WER", "dev WER", "gap (test − train)"], rows)
    clipped = {n: int(study["configs"][n]["per_core"]) for n in done if study["configs"][n]["clipping"] != "none"}
    r = canary_gradient_ratios(exp / "canary_gradients.json", canaries, pretrain_save)
    core_diagnostics(report, exp, {n: decoded[n] for n in done}, r, clipped)
    report.commands("Commands that trained these runs (re-run any of them to resume or extend the grid)", commands)
    report.paragraph("Plots: exposure_vs_B_*.png (a line per insertion count and bound quantile; the main grid only: "
                     "the configurations of the most common fine-tuning length without other overrides), "
                     "exposure_vs_bound_*.png, exposure_*.png, "
                     "core_stats.png (per-core norms and clip scales of cores with and without a canary).")
    return report.write(exp / "RESULTS.md")


def _paired_table(report: ResultsMarkdown, study: dict, results: dict, decoded: dict, metric: str,
                  label: str) -> None:
    """Exposure change of each configuration from its reference, paired by seed (same seed = the same data
    order, the training loader being reseeded from (seed, epoch), from the same pre-trained model); nothing
    when no configuration shares a seed with its reference."""
    rows = {}
    for name in results:
        ref = reference(study, name)
        if ref in results and set(decoded[name]) & set(decoded[ref]):
            by_seed = {n: {r["seed"]: r["exposure"][metric] for r in results[n]} for n in (name, ref)}
            rows[f"{name} − {ref}"] = difference_over_seeds(by_seed[name], by_seed[ref])
    if not rows:
        return
    counts = sorted({k for row in rows.values() for k in row})
    report.heading(f"Change from the reference ({label}), paired by seed", level=3)
    report.paragraph("Mean ± std over the seeds both have of the difference of per-seed means; (lower in m of n seeds).")
    report.table(["configuration − reference", *(f"×{k}" for k in counts)],
                 [[row_label, *(_difference_cell(row[k]) if k in row else "–" for k in counts)]
                  for row_label, row in rows.items()])


def _difference_cell(entry: dict) -> str:
    spread = f" ± {entry['std']:.1f}" if entry["n"] > 1 else ""  # one seed: no spread to show
    return f"{entry['mean']:+.1f}{spread} ({entry['lower']}/{entry['n']})"


def canary_gradient_ratios(path: Path, canaries: Path, pretrain_save: Path | None = None) -> dict[int, float] | None:
    """``r`` per insertion count measured by ``privasr-canary-gradients`` on the pre-trained model, or None.

    ``r`` is a canary's median per-example gradient norm over a normal utterance's (see
    :func:`privasr.core_log.predicted_weight_ratio`). A record made on other canaries (their bytes) or, when
    ``pretrain_save`` is given, on another checkpoint than its newest is refused: the prediction it would
    print beside the measured clip scales would belong to another experiment.
    """
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("canaries_sha256") != file_digest(canaries):
        raise ValueError(f"{path} was measured on other canaries than {canaries}: delete it and run stage 5 again")
    if pretrain_save is not None:
        from speechbrain.utils.checkpoints import Checkpointer

        from privasr.provenance import checkpoint_identity

        newest = Checkpointer(str(pretrain_save)).find_checkpoint()
        if newest is None or checkpoint_identity(newest) != record.get("checkpoint"):
            raise ValueError(f"{path} was measured on another checkpoint than {pretrain_save}'s newest: "
                             f"delete it and run stage 5 again")
    ratios = {int(count): group["r_median"] for count, group in record.get("by_insertions", {}).items()
              if group.get("r_median") is not None}
    return ratios or None


def core_diagnostics(report: ResultsMarkdown, exp: Path, decoded: dict[str, list[str]],
                     r: dict[int, float] | None = None, per_core: dict[str, int] | None = None) -> None:
    """A section of ``report`` comparing the clipping of cores with and without a canary, and core_stats.png;
    nothing when no run logged its cores.

    With ``r`` (per insertion count) and each clipped configuration's per-core batch, the table also
    gives the measured normal/canary clip-scale ratio beside the prediction √(r²+B−1)/√B.
    """
    logs = {}
    for name, seeds in decoded.items():
        per_seed = [read_core_logs(exp / name / f"seed{s}" / "core_stats") for s in seeds]
        logs[name] = {k: np.concatenate([log[k] for log in per_seed]) for k in ("norm", "scale", "label")}
    logs = {name: log for name, log in logs.items() if log["norm"].size}
    if not logs:
        return
    plot_core_logs(logs, exp / "core_stats.png")
    summaries = {name: summarize(log) for name, log in logs.items()}
    labels = sorted({label for summary in summaries.values() for label in summary})
    report.heading("Clipping of cores with and without a canary (median norm / median clip scale, all steps)")
    report.paragraph("A core's label is the largest insertion count among its canaries. Clipping can only curb "
                     "memorization if canary cores get a clearly smaller scale than the others.")
    if r:
        report.paragraph("r (a canary's median per-example gradient norm over a normal utterance's, on the "
                         "pre-trained model, canary_gradients.json): "
                         + ", ".join(f"x{c}: {v:.3g}" for c, v in sorted(r.items())) + ".")
    report.lines(core_markdown_table(summaries, labels, r=r, per_core=per_core if r else None))


def _extrapolated_loss_exposure(exp: Path, name: str, seeds: list[str], canaries: Path, holdout: Path) -> dict:
    """Exposure by loss with the skew-normal extrapolation, summarized over the seeds."""
    reports = []
    for seed in seeds:
        run_dir = exp / name / f"seed{seed}"
        report = score_exposure(canaries, holdout, run_dir / "hyps" / "canaries_and_holdout.csv",
                                metric="score", method="extrapolation")
        (run_dir / "exposure_score_extrapolation.json").write_text(json.dumps(report, indent=1))
        reports.append(report)
    return summarize_over_seeds(reports)


BOUND_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"))  # (line, marker) per bound quantile


def _plot_against(study, pooled, path, key, xlabel, quantiles_dir):
    """Exposure against per-core batch or bound: one panel per clipping method (PCC, APCC), a line per
    insertion count (colour) and bound quantile (line and marker style: p10 solid, p50 dashed); the baseline
    is a dotted line and PEC a star (at B = 1). Only the main grid is drawn: configurations with other
    overrides or fine-tuning lengths (the other axes) would not be comparable along B or b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pooled = {n: pooled[n] for n in _main_grid(study, pooled)}
    counts = sorted({k for summary in pooled.values() for k in summary})
    colour = {k: plt.cm.viridis(i / max(len(counts) - 1, 1)) for i, k in enumerate(counts)}
    # APCC has no bound; against the bound, points of different B are not joined but labelled with their B
    candidates = ("pcc",) if key == "bound" else ("pcc", "apcc")
    methods = [m for m in candidates if any(study["configs"][n]["clipping"] == m for n in pooled)] or ["pcc"]
    quantiles = sorted({str(study["configs"][n]["bound"]) for n in pooled if study["configs"][n].get("bound")})
    style = {"None": BOUND_STYLES[0], **dict(zip(quantiles, BOUND_STYLES * len(quantiles)))}
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for count in counts:
            for bound, (line, marker) in style.items():
                points = sorted(_points(study, pooled, method, count, key, quantiles_dir, bound))
                if points:
                    ax.plot(*zip(*points), marker=marker, color=colour[count],
                            linestyle="none" if key == "bound" else line)
                for x, y in _points(study, pooled, "pec", count, key, quantiles_dir, bound):
                    ax.plot([x], [y], marker="*", markersize=11, color=colour[count], linestyle="none",
                            markerfacecolor=colour[count] if marker == "o" else "none")
            if key == "bound" and count == counts[-1]:
                for name, cfg in study["configs"].items():
                    if name in pooled and cfg["clipping"] == method and count in pooled[name]:
                        ax.annotate(f"B={cfg['per_core']}", (resolve_bound(cfg, quantiles_dir),
                                    pooled[name][count]["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            for _, y in _points(study, pooled, "none", count, None, quantiles_dir):
                ax.axhline(y, linestyle=":", color=colour[count])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{method.upper()} (★ PEC, dotted: baseline)")
    handles = [Line2D([], [], color=colour[k], marker="o", label=f"×{k}") for k in counts]
    if len(quantiles) > 1:  # which style is which bound quantile
        handles += [Line2D([], [], color="grey", linestyle=style[q][0], marker=style[q][1], label=f"b = {q}")
                    for q in quantiles]
    axes[0][-1].legend(handles=handles, title="insertions", fontsize=7, loc="best")
    axes[0][0].set_ylabel("exposure (bits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _main_grid(study: dict, names) -> list[str]:
    """The configurations comparable along B and b: no other overrides, the most common fine-tuning length."""
    plain = [n for n in names if not study["configs"][n].get("overrides")]
    lengths = [finetune_epochs(study, n) for n in plain]
    common = max(set(lengths), key=lengths.count, default=None)
    return [n for n in plain if finetune_epochs(study, n) == common]


def _points(study, pooled, method, count, key, quantiles_dir, bound=None):
    """(x, mean exposure) of every configuration of ``method`` (with bound label ``bound``, if given) that has
    insertion count ``count``."""
    for name, summary in pooled.items():
        cfg = study["configs"][name]
        if cfg["clipping"] != method or count not in summary or bound not in (None, str(cfg.get("bound"))):
            continue
        x = None if key is None else cfg.get("per_core") if key == "per_core" else resolve_bound(cfg, quantiles_dir)
        if key is None or x is not None:
            yield x, summary[count]["mean"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plan or score the mitigation study")
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print 'name seed overrides...' per run")
    plan.add_argument("study")
    plan.add_argument("--quantiles", required=True, type=Path)
    need = sub.add_parser("quantiles-needed", help="print 'B loss_reduction' pairs to measure")
    need.add_argument("study")
    get = sub.add_parser("get", help="print one top-level setting of the study")
    get.add_argument("study")
    get.add_argument("key")
    sc = sub.add_parser("score")
    sc.add_argument("study")
    for name in ("--exp", "--canaries", "--holdout", "--quantiles"):
        sc.add_argument(name, required=True, type=Path)
    sc.add_argument("--commands", type=Path, help="file of the driver commands that trained the runs")
    sc.add_argument("--pretrain", type=Path, help="the pre-trained model's save folder (checks canary_gradients.json)")
    cur = sub.add_parser("r-current", help="exit 0 when canary_gradients.json is of these canaries and checkpoint")
    cur.add_argument("json", type=Path)
    for name in ("--canaries", "--pretrain"):
        cur.add_argument(name, required=True, type=Path)
    pcs = sub.add_parser("per-core-values", help="print the study's per-core batch sizes B")
    pcs.add_argument("study")
    args = p.parse_args(argv)
    if args.command == "r-current":  # a question, not a command that can fail: 1 means "measure again"
        try:
            return 0 if canary_gradient_ratios(args.json, args.canaries, args.pretrain) is not None else 1
        except (OSError, ValueError, KeyError):
            return 1
    try:
        study = load_study(args.study)
        if args.command == "per-core-values":
            print(*sorted({int(cfg["per_core"]) for cfg in study["configs"].values()}))
        elif args.command == "get":
            print(study[args.key])
        elif args.command == "quantiles-needed":
            for b, reduction in needed_quantiles(study):
                print(b, reduction)
        elif args.command == "plan":  # seed-major: a partly run grid has every configuration at its first seed
            for seed in study["seeds"]:
                for name in study["configs"]:
                    print(name, seed, *run_overrides(study, name, args.quantiles))
        else:
            print(score(study, args.exp, args.canaries, args.holdout, args.quantiles, args.commands,
                        args.pretrain).read_text())
    except (OSError, ValueError, KeyError) as err:
        print(f"privasr.study: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
