r"""Canary-aware clipping diagnostics: what clipping did to the cores that hold a canary.

Per-core clipping curbs memorization only if it shrinks a canary's contribution more than
an ordinary utterance's. With per-core batch :math:`B`, a canary's excess gradient is
diluted by the :math:`B-1` other utterances of its core, so the scale that clipping applies
to a canary core,

.. math:: s_c = \frac{\hat g_c}{\bar g_c} = \min\Big(1, \frac{b}{\lVert \bar g_c \rVert}\Big)
          \ \text{(PCC)}, \qquad s_c = \frac{b_t}{\lVert \bar g_c \rVert}\ \text{(APCC)},

approaches that of the other cores as :math:`B` grows. :class:`CoreLog` records, at every
optimizer step, each local core's gradient norm :math:`\lVert \bar g_c \rVert`, its scale
:math:`s_c` and a label: the largest insertion count among the canaries in that core (0 for
a core without canary). One CSV per process, ``core_stats.rank<r>.csv`` with columns
``step,core,norm,scale,label`` (``scale`` = 0 for a dropped core). A resumed run appends
the steps it repeats again; :func:`read_core_logs` keeps the last row of each
``(rank, step, core)``. :func:`summarize` and :func:`plot_core_logs` compare the
distributions by label after training.

What to expect from the canary's gradient alone (:func:`predicted_weight_ratio`): if a canary's
per-example gradient norm is :math:`r` times a normal utterance's and the gradients of a core are
roughly orthogonal, a core of :math:`B` holding one canary has norm
:math:`\approx g\sqrt{r^2 + B - 1}` against :math:`g\sqrt{B}` for a normal core; clipping every core
to the same norm scales the canary core by that ratio less, so the canary's weight relative to a
normal utterance falls by :math:`\sqrt{r^2+B-1}/\sqrt{B}` (:math:`r` for per-example clipping,
:math:`B = 1`). :func:`markdown_table` puts this prediction next to the measured ratio of clip scales
(normal core / canary core) when ``r`` is given.
"""
from __future__ import annotations

import csv
import glob
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from privasr.results_md import table_lines


COLUMNS = ("step", "core", "norm", "scale", "label")
FILE_PATTERN = "core_stats.rank*.csv"


def shard_partition(items: Sequence, num_shards: int) -> list[list]:
    """``items`` split as :func:`torch.tensor_split` splits a batch into ``num_shards`` shards."""
    return [list(part) for part in np.array_split(np.asarray(items, dtype=object), num_shards)]


class CoreLog:
    """Appends one row per core and optimizer step to ``<directory>/core_stats.rank<rank>.csv``."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0):
        self.path = Path(directory) / f"core_stats.rank{rank}.csv"

    def add(self, step: int, norms: Sequence[float], scales: Sequence[float], labels: Sequence[int]) -> None:
        if not len(norms) == len(scales) == len(labels):
            raise ValueError(f"{len(norms)} norms, {len(scales)} scales and {len(labels)} labels: one each per core")
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(COLUMNS)
            for core, (norm, scale, label) in enumerate(zip(norms, scales, labels)):
                writer.writerow([step, core, f"{float(norm):.6g}", f"{float(scale):.6g}", int(label)])


def read_core_logs(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every rank's log in ``directory`` as arrays ``norm``, ``scale``, ``label`` (a resumed step counted once)."""
    rows: dict[tuple[int, int, int], tuple[float, float, int]] = {}
    for path in sorted(glob.glob(str(Path(directory) / FILE_PATTERN))):
        rank = int(Path(path).stem.rsplit("rank", 1)[1])
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                rows[(rank, int(row["step"]), int(row["core"]))] = (
                    float(row["norm"]), float(row["scale"]), int(row["label"]))
    values = np.array(list(rows.values()), dtype=float).reshape(-1, 3)
    return {"norm": values[:, 0], "scale": values[:, 1], "label": values[:, 2].astype(int)}


def summarize(log: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
    """Per label (0 = no canary): number of core-steps, median and 10/90th percentiles of norm and scale."""
    summary = {}
    for label in sorted(set(log["label"].tolist())):
        mask = (log["label"] == label) & np.isfinite(log["norm"])
        norms, scales = log["norm"][mask], log["scale"][mask]
        if not norms.size:
            continue
        summary[int(label)] = {
            "n": int(norms.size),
            **{f"norm_p{q}": float(np.percentile(norms, q)) for q in (10, 50, 90)},
            **{f"scale_p{q}": float(np.percentile(scales, q)) for q in (10, 50, 90)},
        }
    return summary


def predicted_weight_ratio(r: float, per_core: int) -> float:
    r"""The factor by which clipping every core cuts a canary's weight relative to a normal utterance's.

    ``r`` is the canary's per-example gradient norm over a normal utterance's, ``per_core`` the
    per-core batch :math:`B`. Model: a canary core holds the canary (norm :math:`r g`) and
    :math:`B - 1` normal utterances (norm :math:`g` each), all roughly orthogonal, so

    .. math:: \lVert \textstyle\sum_{i \in c} g_i \rVert \approx g \sqrt{r^2 + B - 1}
              \quad\text{vs.}\quad g \sqrt{B} \ \text{for a normal core.}

    (The core gradient is the mean, a common factor :math:`1/B` that cancels.) Clipping every core to
    the same bound :math:`b` multiplies each by :math:`b / \lVert \bar g_c \rVert`, so the canary core's
    scale is smaller than a normal core's by

    .. math:: \rho(r, B) = \frac{\sqrt{r^2 + B - 1}}{\sqrt{B}},

    the measured ``scale(normal core) / scale(canary core)`` when every core is clipped.
    :math:`\rho(r, 1) = r` (per-example clipping), :math:`\rho \to 1` as :math:`B` grows, and
    :math:`\rho(1, B) = 1`: for :math:`r > 1` no clipping removes more than the factor :math:`r`. A bound
    above the normal cores' norms (PCC at a high quantile) leaves them unclipped and the measured ratio
    below :math:`\rho`. E.g. ``r = 1.6``: 1.33, 1.18, 1.09 at ``B`` = 2, 4, 8.
    """
    r = float(r)
    if not (np.isfinite(r) and r > 0):
        raise ValueError(f"r must be a finite positive norm ratio, got {r}")
    if isinstance(per_core, bool) or int(per_core) != per_core or per_core < 1:
        raise ValueError(f"the per-core batch B must be an integer >= 1, got {per_core}")
    return float(np.sqrt((r * r + per_core - 1) / per_core))


def label_name(label: int) -> str:
    return "no canary" if label == 0 else f"canary x{label}"


def plot_core_logs(runs: dict[str, dict[str, np.ndarray]], path: str | os.PathLike,
                   title: Optional[str] = None) -> Path:
    """Box plots of per-core norm and clip scale by label, one group of boxes per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({int(x) for log in runs.values() for x in log["label"]})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) * len(labels)), 4.5))
    width = 0.8 / max(1, len(labels))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(labels))))
    for ax, key, ylabel in ((axes[0], "norm", "per-core gradient norm"), (axes[1], "scale", "clip scale s_c")):
        for j, label in enumerate(labels):
            data = [log[key][(log["label"] == label) & np.isfinite(log[key])] for log in runs.values()]
            positions = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(runs))]
            kept = [(p, d) for p, d in zip(positions, data) if d.size]
            if not kept:
                continue
            box = ax.boxplot([d for _, d in kept], positions=[p for p, _ in kept], widths=width * 0.9,
                             patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(colors[j])
            ax.plot([], [], color=colors[j], linewidth=6, label=label_name(label))
        ax.set_xticks(range(len(runs)), list(runs), rotation=20)
        ax.set_ylabel(ylabel)
        if key == "norm":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(title or "per-core clipping of cores with and without canaries")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(runs: dict[str, dict[int, dict[str, float]]], labels: Iterable[int] = (0, 1, 16),
                   r: Union[float, Mapping[int, float], None] = None,
                   per_core: Optional[Mapping[str, int]] = None) -> str:
    """Median norm and scale per run for a few labels, as a markdown table.

    With ``r`` (a canary's per-example gradient norm over a normal utterance's, e.g. from
    ``privasr-canary-gradients``; one number, or one per insertion count) two columns follow: the
    measured ``median scale(no canary) / median scale(canary xk)`` for each canary label, and
    :func:`predicted_weight_ratio` at the run's per-core batch ``per_core[run]`` (``–`` for a run
    not in ``per_core``, e.g. an unclipped baseline). Without ``r`` the table is as before.
    """
    labels = list(labels)
    canary_labels = [lab for lab in labels if lab != 0]
    header = ["run"] + [f"{label_name(lab)}: norm / scale" for lab in labels]
    if r is not None:
        counts = " / ".join(f"x{lab}" for lab in canary_labels)
        predicted = f"r = {float(r):.3g}" if not isinstance(r, Mapping) else counts
        header += [f"normal / canary clip scale, measured ({counts})", f"predicted from r, √(r²+B−1)/√B ({predicted})"]
    rows = []
    for name, summary in runs.items():
        cells = [name]
        for lab in labels:
            s = summary.get(lab)
            cells.append("–" if s is None else f"{s['norm_p50']:.3g} / {s['scale_p50']:.3g}")
        if r is not None:
            cells += [_measured_ratios(summary, canary_labels),
                      _predicted_ratios(r, None if per_core is None else per_core.get(name), canary_labels)]
        rows.append(cells)
    return "\n".join(table_lines(header, rows))


def _measured_ratios(summary: dict[int, dict[str, float]], canary_labels: list[int]) -> str:
    """``median scale(no canary) / median scale(canary xk)`` per canary label, ``–`` where one is missing."""
    normal = summary.get(0)
    cells = []
    for lab in canary_labels:
        s = summary.get(lab)
        ok = normal is not None and s is not None and s["scale_p50"] > 0
        cells.append(f"{normal['scale_p50'] / s['scale_p50']:.3g}" if ok else "–")
    return " / ".join(cells) or "–"


def _predicted_ratios(r: Union[float, Mapping[int, float]], per_core: Optional[int], canary_labels: list[int]) -> str:
    if per_core is None:
        return "–"
    if not isinstance(r, Mapping):
        return f"{predicted_weight_ratio(r, per_core):.3g}"
    return " / ".join("–" if r.get(lab) is None else f"{predicted_weight_ratio(r[lab], per_core):.3g}"
                      for lab in canary_labels) or "–"
