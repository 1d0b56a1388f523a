r"""Exposure of Secret Sharer canaries (Carlini et al. 2019; paper section 2.3, Definition 1).

Every canary :math:`c` and holdout utterance :math:`r \in R` gets a score :math:`s`. The
*direction* says which scores mean the model finds an utterance likelier: ``"lower"`` (the
default, and the only one for CER and WER: an error rate or a loss is lower when the model
fits better) or ``"higher"`` (e.g. a log-likelihood, ``metric="score"`` only). Below, scores
are in the lower-is-likelier frame (``"higher"`` scores are negated first). The exposure is

.. math::  \mathrm{exposure}(c) = \log_2 |R| - \log_2 \mathrm{rank}(c),

with the rank of :math:`s_c` among the holdout scores (ranking against the holdout only):

* ``ties="mean"`` (default): :math:`\mathrm{rank} = 1 + \#\{r: s_r < s_c\} + \tfrac12 \#\{r: s_r = s_c\}`.
  A model that outputs nothing scores CER 1 everywhere, so every canary ties with every
  holdout utterance and gets :math:`\log_2 |R| - \log_2(1 + |R|/2) \approx 1` bit.
* ``ties="reference"``: :math:`\mathrm{rank} = 1 + \#\{r: s_r \le s_c\}` -- holdout
  utterances win ties, as in TensorFlow Privacy's ``compute_exposure_interpolation``;
  the all-tied model scores the minimum.

Range of the interpolation, for either tie rule: rank :math:`\in [1, |R| + 1]`, so exposure
:math:`\in [\log_2 \frac{|R|}{|R|+1}, \log_2 |R|]` (the minimum, slightly below 0, for a canary
scored worse than every holdout utterance -- or, with ``reference``, tied with all of them; the
maximum for one scored strictly better than all). A canary the model treats like a holdout
utterance (its rank uniform on :math:`1 \ldots |R|+1`) scores :math:`\approx \log_2 e = 1.44`
bits on average.

Extrapolation (TensorFlow Privacy's ``compute_exposure_extrapolation``) fits a skew-normal
distribution :math:`F` to the holdout scores (``scipy.stats.skewnorm.fit``) and reports
:math:`-\log_2 F(s_c)`, computed as ``-skewnorm.logcdf / ln 2``: at least 0, and not bounded
by :math:`\log_2|R|`. When :math:`F(s_c)` underflows the exposure is capped at
:data:`EXTRAPOLATION_CAP_BITS` (the probability of the smallest positive double) and flagged
``"capped": true``.

Two reports are comparable only when they agree on :data:`COMPARABLE_KEYS` (metric, score
direction, holdout size, tie rule, method): :func:`compare_reports` and the summaries over
seeds refuse others with one line naming what differs.

Per insertion count, :func:`summarize_by_insertions` reports the mean and the (population,
``ddof=0``) standard deviation over canaries, as in the paper's Table 1. Over several training
seeds, :func:`summarize_over_seeds` first averages each seed's canaries, then reports the mean and
std of those per-seed means, so the spread is run-to-run variation, not canary-to-canary.

Input CSV files may start with a UTF-8 byte-order mark (as spreadsheet programs write them).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import jiwer
import numpy as np
from scipy import stats

from privasr.canaries import read_canaries
from privasr.data.manifest import Utterance, read_manifest, read_table
from privasr.results_md import table_lines

__all__ = [
    "METRICS", "METHODS", "TIES", "DIRECTIONS", "COMPARABLE_KEYS", "EXTRAPOLATION_CAP_BITS", "check_comparable",
    "normalize_text", "error_rates", "ranks", "exposure_interpolation", "exposure_extrapolation",
    "summarize_by_insertions", "summarize_over_seeds", "markdown_table", "plot_exposure", "read_hyps", "score_exposure",
    "load_report", "compare_reports", "describe_settings",
]

METRICS = ("cer", "wer", "score")
METHODS = ("interpolation", "extrapolation")
TIES = ("mean", "reference")
#: Which scores mean "the model finds this utterance likelier"; lower for CER, WER and losses.
DIRECTIONS = ("lower", "higher")
#: What two reports must share for their exposures to be compared (a report without
#: ``direction`` predates the option, when scores were always lower-is-likelier).
COMPARABLE_KEYS = ("metric", "direction", "holdout_size", "ties", "method")
_REPORT_DEFAULTS = {"direction": "lower"}
#: :math:`-\log_2` of the smallest positive double: exposure reported when the CDF underflows.
EXTRAPOLATION_CAP_BITS = 1074.0


# ---------------------------------------------------------------------------- scores
def normalize_text(text: str) -> str:
    """Upper case, single spaces, no leading/trailing space (manifests' ``wrd`` convention)."""
    return " ".join(text.upper().split())


def error_rates(refs: Sequence[str], hyps: Sequence[str], metric: str = "cer") -> np.ndarray:
    """Per-utterance character (``"cer"``) or word (``"wer"``) error rate, via jiwer.

    Both sides go through :func:`normalize_text`; an empty hypothesis has error rate 1.
    """
    if metric not in ("cer", "wer"):
        raise ValueError(f"error-rate metric must be 'cer' or 'wer', got '{metric}'")
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    measure = jiwer.cer if metric == "cer" else jiwer.wer
    out = np.empty(len(refs))
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        ref = normalize_text(ref)
        if not ref:
            raise ValueError(f"empty reference at position {i}")
        out[i] = measure(reference=ref, hypothesis=normalize_text(hyp)) if hyp.strip() else 1.0
    return out


# ---------------------------------------------------------------------------- exposure
def _as_scores(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if np.isnan(array).any():
        raise ValueError(f"{name} contain NaN")
    return array


def ranks(canary_scores: Sequence[float], holdout_scores: Sequence[float], ties: str = "mean") -> np.ndarray:
    """Rank of each canary score among the holdout scores (1 = better than every holdout).

    ``ties="mean"``: :math:`1 + \\#\\{s_r < s_c\\} + \\frac12\\#\\{s_r = s_c\\}`;
    ``ties="reference"``: :math:`1 + \\#\\{s_r \\le s_c\\}`.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}, got '{ties}'")
    canary, holdout = _as_scores(canary_scores, "canary scores"), np.sort(_as_scores(holdout_scores, "holdout scores"))
    if holdout.size == 0:
        raise ValueError("empty holdout set")
    below = np.searchsorted(holdout, canary, side="left")
    below_or_equal = np.searchsorted(holdout, canary, side="right")
    if ties == "reference":
        return 1.0 + below_or_equal
    return 1.0 + below + 0.5 * (below_or_equal - below)


def exposure_interpolation(
    canary_scores: Sequence[float], holdout_scores: Sequence[float], ties: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, exposures)`` with exposure :math:`\\log_2|R| - \\log_2 \\mathrm{rank}`."""
    rank = ranks(canary_scores, holdout_scores, ties)
    return rank, np.log2(len(holdout_scores)) - np.log2(rank)


def exposure_extrapolation(
    canary_scores: Sequence[float], holdout_scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(exposures, capped, (a, loc, scale))``: :math:`-\\log_2 F(s_c)` for the skew-normal
    :math:`F` fitted to the holdout scores; ``capped`` marks CDFs that underflowed.

    Raises :class:`ValueError` if the holdout scores are constant, non-finite or too few.
    """
    canary, holdout = _as_scores(canary_scores, "canary scores"), _as_scores(holdout_scores, "holdout scores")
    if holdout.size < 3 or not np.isfinite(holdout).all() or np.ptp(holdout) == 0:
        raise ValueError("extrapolation needs >= 3 finite, not all equal holdout scores; use --method interpolation")
    try:
        params = tuple(float(p) for p in stats.skewnorm.fit(holdout))
    except (stats.FitError, RuntimeError) as err:
        raise ValueError(f"skew-normal fit of the holdout scores failed: {err}") from None
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = -stats.skewnorm.logcdf(canary, *params) / math.log(2)
    capped = ~np.isfinite(bits) | (bits > EXTRAPOLATION_CAP_BITS)
    return np.where(capped, EXTRAPOLATION_CAP_BITS, np.maximum(bits, 0.0)), capped, params


def summarize_by_insertions(insertions: Sequence[int], exposures: Sequence[float]) -> dict[int, dict]:
    """``{k: {"mean", "std", "n"}}`` over the canaries inserted ``k`` times (std with ddof=0)."""
    insertions, exposures = np.asarray(insertions, dtype=int), np.asarray(exposures, dtype=float)
    if insertions.shape != exposures.shape:
        raise ValueError(f"{insertions.size} insertion counts but {exposures.size} exposures")
    return {int(k): {"mean": float(exposures[insertions == k].mean()), "std": float(exposures[insertions == k].std()),
                     "n": int((insertions == k).sum())} for k in sorted(set(insertions.tolist()))}


def _report_by_insertions(report: Mapping) -> dict[int, dict]:
    """:func:`summarize_by_insertions` of one :func:`score_exposure` report's canaries."""
    canaries = report["per_canary"]
    return summarize_by_insertions([e["insertions"] for e in canaries], [e["exposure"] for e in canaries])


def check_comparable(reports: Sequence[Mapping], names: Sequence[str], required: bool = True) -> None:
    """Refuse reports whose exposures are not comparable: they differ in one of :data:`COMPARABLE_KEYS`.

    Exposure depends on all of them: ranks by CER and by loss differ, a direction flips the
    ranking, :math:`|R|` sets the ceiling :math:`\\log_2|R|`, tie rules move tied canaries by up
    to a bit, extrapolation is not bounded by :math:`\\log_2|R|`. With ``required``, a report
    lacking a key (other than ``direction``, see :data:`COMPARABLE_KEYS`) is refused too;
    without, only keys some report records are compared. Raises :class:`ValueError` (one line).
    """
    differing = []
    for key in COMPARABLE_KEYS:
        values = [report.get(key, _REPORT_DEFAULTS.get(key)) for report in reports]
        if not required and all(key not in report for report in reports):
            continue
        if required and any(v is None for v in values):
            missing = [n for n, v in zip(names, values) if v is None]
            raise ValueError(f"{_few(missing)}: no {key!r} recorded, so the report cannot be proved comparable "
                             f"(score it again with privasr-exposure)")
        if len(set(map(str, values))) > 1:
            differing.append(f"{key} " + ", ".join(f"{v} ({n})" for n, v in zip(names, values)))
    if differing:
        raise ValueError("exposure reports are not comparable: " + "; ".join(differing)
                         + f" (each of {', '.join(COMPARABLE_KEYS)} must be the same)")


def summarize_over_seeds(reports: Sequence[Mapping]) -> dict[int, dict]:
    """Exposure per insertion count over several seeds' reports (each from :func:`score_exposure`).

    With ``m_s`` the mean exposure of seed ``s``'s canaries inserted ``k`` times, entry ``k`` is
    ``{"mean": mean_s m_s, "std": std_s m_s (ddof=0), "n": seeds, "over": "seeds"}``. With one
    seed there is no run-to-run spread to report: the entry is that seed's mean and std over its
    canaries, marked ``"over": "canaries"``.
    """
    if not reports:
        raise ValueError("no exposure reports to summarize")
    check_comparable(reports, [f"seed {i + 1}" for i in range(len(reports))], required=False)
    per_seed = [_report_by_insertions(r) for r in reports]
    if len(per_seed) == 1:
        return {k: {**v, "over": "canaries"} for k, v in per_seed[0].items()}
    counts = sorted({k for summary in per_seed for k in summary})
    out = {}
    for k in counts:
        means = np.array([summary[k]["mean"] for summary in per_seed if k in summary])
        out[k] = {"mean": float(means.mean()), "std": float(means.std()), "n": int(means.size), "over": "seeds"}
    return out


def difference_over_seeds(reports: Mapping[str, Mapping], references: Mapping[str, Mapping]) -> dict[int, dict]:
    """Exposure change from a reference run, paired by seed (both map a seed to a :func:`score_exposure` report).

    Same-seed runs share their initialization and data order, so the per-seed difference
    ``d_s = m_s - r_s`` of the mean exposures of the canaries inserted ``k`` times removes the part
    of the run-to-run noise that both share. Entry ``k`` is ``{"mean": mean_s d_s, "std": std_s d_s
    (ddof=0), "n": seeds both have, "lower": seeds with d_s < 0}``; only seeds both have count.
    """
    seeds = [s for s in reports if s in references]
    if not seeds:
        raise ValueError("no seed is common to the runs and their reference")
    check_comparable([reports[s] for s in seeds] + [references[s] for s in seeds],
                     [f"seed {s}" for s in seeds] + [f"reference seed {s}" for s in seeds], required=False)
    per_seed = {s: [_report_by_insertions(r[s]) for r in (reports, references)] for s in seeds}
    out = {}
    for k in sorted({k for run, ref in per_seed.values() for k in run if k in ref}):
        d = np.array([run[k]["mean"] - ref[k]["mean"] for run, ref in per_seed.values() if k in run and k in ref])
        out[k] = {"mean": float(d.mean()), "std": float(d.std()), "n": int(d.size), "lower": int((d < 0).sum())}
    return out


# ---------------------------------------------------------------------------- reporting
def markdown_table(runs: Mapping[str, Mapping], digits: int = 1) -> str:
    """The paper's Table 1: one row per run, ``mean ± std`` per insertion count.

    ``runs`` maps a label to a ``by_insertions`` dict (keys may be ints or strings).
    """
    counts = sorted({int(k) for summary in runs.values() for k in summary})
    rows = [[label] + [_cell(summary.get(str(k), summary.get(k)), digits) for k in counts]
            for label, summary in runs.items()]
    return "\n".join(table_lines(["Canary #Insertion", *counts], rows)) + "\n"


def _cell(entry: Mapping | None, digits: int) -> str:
    return "–" if entry is None else f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def plot_exposure(runs: Mapping[str, Mapping], path: str | os.PathLike, max_exposure: float | None = None,
                  title: str = "Canary exposure") -> Path:
    """Exposure (mean ± std) against insertion count, one line per run; PNG via matplotlib Agg.

    ``max_exposure`` (e.g. :math:`\\log_2|R|`) is drawn as a dashed line when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(runs) > 5  # a study's grid: legend beside the axes, distinct colours, error bars side by side
    fig, ax = plt.subplots(figsize=(9, 4.5) if many else (6, 4))
    colours = plt.cm.tab20(np.linspace(0, 1, 20)) if len(runs) > 10 else plt.cm.tab10(np.arange(10))
    for i, (label, summary) in enumerate(runs.items()):
        counts = sorted(int(k) for k in summary)
        entries = [summary.get(str(k), summary.get(k)) for k in counts]
        shift = 2 ** (0.25 * (i / max(len(runs) - 1, 1) - 0.5)) if many else 1.0
        ax.errorbar([c * shift for c in counts], [e["mean"] for e in entries], yerr=[e["std"] for e in entries],
                    marker="o", capsize=3, label=label, color=colours[i % len(colours)])
    if max_exposure is not None:
        ax.axhline(max_exposure, linestyle="--", color="gray", label=f"max = log2|R| = {max_exposure:.1f}")
    ax.set_xscale("log", base=2)
    ticks = sorted({int(k) for summary in runs.values() for k in summary})
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("canary insertions")
    ax.set_ylabel("exposure (bits)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    else:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- files
def read_hyps(path: str | os.PathLike, metric: str) -> dict[str, tuple[str, float | None]]:
    """``{ID: (hyp, score)}`` from a CSV with columns ``ID,hyp[,score]``.

    ``hyp`` is required for cer/wer, ``score`` for the score metric. Raises
    :class:`ValueError` (file and line) for duplicate IDs and non-numeric or NaN scores.
    """
    required = ["ID", "score"] if metric == "score" else ["ID", "hyp"]
    hyps: dict[str, tuple[str, float | None]] = {}
    lines: dict[str, int] = {}
    for line, row in read_table(path, required):
        utt_id = row["ID"].strip()
        if utt_id in hyps:
            raise ValueError(f"{path}:{line}: duplicate ID '{utt_id}' (first on line {lines[utt_id]})")
        hyps[utt_id], lines[utt_id] = (row.get("hyp") or "", _score(path, line, row)), line
    return hyps


def _score(path, line: int, row: Mapping[str, str]) -> float | None:
    if not (row.get("score") or "").strip():
        return None
    try:
        value = float(row["score"])
    except ValueError:
        raise ValueError(f"{path}:{line}: score '{row['score']}' is not a number") from None
    if math.isnan(value):
        raise ValueError(f"{path}:{line}: score is NaN")
    return value


def _check_ids(hyps_path, hyps: Mapping[str, object], canaries: Sequence[Utterance], holdout: Sequence[Utterance]):
    known = [u.id for u in canaries] + [u.id for u in holdout]
    overlap = {u.id for u in canaries} & {u.id for u in holdout}
    if overlap:
        raise ValueError(f"IDs in both the canary and holdout manifests: {_few(sorted(overlap))}")
    unknown = [i for i in hyps if i not in set(known)]
    if unknown:
        raise ValueError(f"{hyps_path}: {len(unknown)} ID(s) not in the canary/holdout manifests: {_few(unknown)}")
    missing = [i for i in known if i not in hyps]
    if missing:
        raise ValueError(f"{hyps_path}: no hypothesis for {len(missing)} manifest ID(s): {_few(missing)}")


def _few(ids: Sequence[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (f" (and {len(ids) - n} more)" if len(ids) > n else "")


def _scores(utts: Sequence[Utterance], hyps: Mapping[str, tuple], metric: str, hyps_path) -> np.ndarray:
    if metric != "score":
        return error_rates([u.wrd for u in utts], [hyps[u.id][0] for u in utts], metric)
    missing = [u.id for u in utts if hyps[u.id][1] is None]
    if missing:
        raise ValueError(f"{hyps_path}: empty score for {len(missing)} ID(s): {_few(missing)}")
    return np.array([hyps[u.id][1] for u in utts], dtype=float)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def score_exposure(
    canaries_csv: str | os.PathLike,
    holdout_csv: str | os.PathLike,
    hyps_csv: str | os.PathLike,
    metric: str = "cer",
    method: str = "interpolation",
    ties: str = "mean",
    direction: str = "lower",
) -> dict:
    """The exposure report (the content of ``exposure.json``) of one model's hypotheses.

    ``{"holdout_size", "metric", "direction", "method", "ties", "per_canary": [{"id", "insertions",
    "score", "rank", "exposure"[, "capped"]}], "by_insertions": {"1": {"mean", "std", "n"}, ...}}``.
    ``direction`` says which scores are likelier (``"higher"``: only for ``metric="score"``);
    ``score`` is the value as read, ``rank`` always the empirical rank (with ``ties``) in that
    direction; non-finite scores are written as null.
    """
    for name, value, allowed in (("metric", metric, METRICS), ("method", method, METHODS), ("ties", ties, TIES),
                                 ("direction", direction, DIRECTIONS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
    if direction == "higher" and metric != "score":
        raise ValueError(f"direction 'higher' only applies to metric 'score': a lower {metric.upper()} is always "
                         f"a better fit")
    canaries, insertions = read_canaries(canaries_csv)  # read_table accepts a UTF-8 BOM (spreadsheets write one)
    holdout = read_manifest(holdout_csv, check_audio=False)
    if not holdout:
        raise ValueError(f"{holdout_csv}: empty holdout set")
    hyps = read_hyps(hyps_csv, metric)
    _check_ids(hyps_csv, hyps, canaries, holdout)
    canary_scores = _scores(canaries, hyps, metric, hyps_csv)
    holdout_scores = _scores(holdout, hyps, metric, hyps_csv)
    # Rank in the lower-is-likelier frame: negating "higher" scores reverses the order, ties stay ties.
    sign = -1.0 if direction == "higher" else 1.0
    rank, exposure = exposure_interpolation(sign * canary_scores, sign * holdout_scores, ties)
    report = {"holdout_size": len(holdout), "metric": metric, "direction": direction, "method": method, "ties": ties}
    per_canary = [{"id": u.id, "insertions": k, "score": _finite(s), "rank": float(r), "exposure": float(e)}
                  for u, k, s, r, e in zip(canaries, insertions, canary_scores, rank, exposure)]
    if method == "extrapolation":
        exposure, capped, params = exposure_extrapolation(sign * canary_scores, sign * holdout_scores)
        for entry, e, c in zip(per_canary, exposure, capped):
            entry.update(exposure=float(e), capped=bool(c))
        report["skewnorm_fit"] = dict(zip(("a", "loc", "scale"), params))  # of the (sign-adjusted) holdout scores
    report["holdout_scores"] = {"min": _finite(holdout_scores.min()), "median": _finite(np.median(holdout_scores)),
                                "max": _finite(holdout_scores.max())}
    report["per_canary"] = per_canary
    summary = summarize_by_insertions(insertions, exposure)
    report["by_insertions"] = {str(k): v for k, v in summary.items()}
    return report


def load_report(path: str | os.PathLike) -> dict:
    """Read an ``exposure.json``; :class:`ValueError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    by = report.get("by_insertions") if isinstance(report, dict) else None
    if not isinstance(by, dict) or not all(isinstance(v, dict) and {"mean", "std"} <= set(v) for v in by.values()):
        raise ValueError(f"{path}: not an exposure report (no valid 'by_insertions')")
    return report


def compare_reports(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> dict[str, dict]:
    """``{label: by_insertions}`` of several reports, refused unless they are comparable (:func:`check_comparable`).

    Labels are ``labels`` if given, else the reports' own ``"label"`` fields when all are
    present and distinct, else the file names.
    """
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(paths)} reports but {len(labels)} labels")
    reports = [load_report(path) for path in paths]
    own = [r.get("label") for r in reports]
    if labels is not None:
        names = list(labels)
    elif all(isinstance(n, str) and n for n in own) and len(set(own)) == len(own):
        names = own
    else:
        names = _labels(paths)
    if len(set(names)) != len(names):
        raise ValueError(f"labels are not distinct: {', '.join(names)}; pass --labels")
    check_comparable(reports, [str(p) for p in paths])
    return {name: report["by_insertions"] for name, report in zip(names, reports)}


def describe_settings(report: Mapping) -> str:
    """One line saying what a report's numbers mean: metric, direction, |R|, tie rule, method, range."""
    size = report["holdout_size"]
    direction = report.get("direction", "lower")
    text = (f"exposure by {report['metric']} ({direction} = likelier), |R| = {size}, ties: {report['ties']}, "
            f"{report['method']}")
    if report["method"] == "interpolation":
        return text + f": range [{math.log2(size / (size + 1)):.4f}, {math.log2(size):.2f}] bits"
    return text + f": >= 0 bits, capped at {EXTRAPOLATION_CAP_BITS:.0f}"


def _labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """File stems, or ``parent/stem`` when stems repeat (``base/exposure.json`` vs ``pcc/...``)."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(p).parent.name}/{Path(p).stem}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
