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
"""
from __future__ import annotations

import csv
import glob
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

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


def markdown_table(runs: dict[str, dict[int, dict[str, float]]], labels: Iterable[int] = (0, 1, 16)) -> str:
    """Median norm and scale per run for a few labels, as a markdown table."""
    labels = list(labels)
    head = "| run | " + " | ".join(f"{label_name(lab)}: norm / scale" for lab in labels) + " |"
    lines = [head, "|---" * (len(labels) + 1) + "|"]
    for name, summary in runs.items():
        cells = []
        for lab in labels:
            s = summary.get(lab)
            cells.append("–" if s is None else f"{s['norm_p50']:.3g} / {s['scale_p50']:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
