"""``RESULTS.md``: the one writer behind every report a recipe scores into.

Each report builds only its own rows and calls this module for the markdown:

* :mod:`privasr.results` -- the method comparison (stage 6 of every ``egs/<corpus>/run.sh``);
* :mod:`privasr.study` -- the mitigation study (stage 8 of ``egs/mini_tts/run_study.sh``);
* :mod:`privasr.ssl.results` -- DP pre-training next to its fine-tuned WER (stage 6 of ``run_dp.sh``).

A report is a title and a sequence of blocks -- a heading, a paragraph, a table, a code block, an
image, or lines another module formatted (:func:`privasr.exposure.markdown_table`,
:func:`privasr.core_log.markdown_table`) -- with one blank line between blocks::

    report = ResultsMarkdown("Results")
    report.heading("WER (%)")
    report.table(["method", "test"], [["pcc", mean_std([10.0, 12.0])]])   # | pcc | 11.00 ± 1.00 |
    report.write(exp / "RESULTS.md")

:meth:`ResultsMarkdown.write` replaces the file atomically (a temporary file in the same folder, then
``os.replace``): a reader, or a scoring stage killed half-way, sees the old report or the new one, never
part of one.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

__all__ = ["ResultsMarkdown", "mean_std", "table_lines", "write_atomic"]


def mean_std(values: Iterable[Optional[float]]) -> str:
    """A table cell: ``mean ± std`` (population std) of the finite values, one value alone, ``–`` if none.

    ``None``, NaN and infinite values are left out (a run whose set was not decoded, a WER that
    could not be computed): ``mean_std([1.0, None, 3.0]) == "2.00 ± 1.00"``.
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "–"
    return f"{np.mean(finite):.2f} ± {np.std(finite):.2f}" if len(finite) > 1 else f"{finite[0]:.2f}"


def table_lines(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table: ``| a | b |``, ``|---|---|``, then one ``| x | y |`` line per row.

    Cells are written with ``str``; a row with another number of cells than the header is refused
    (markdown would shift every later column of that row silently).
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells, its header {len(header)}: {row!r}")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines


def write_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


class ResultsMarkdown:
    """A ``RESULTS.md`` being built: ``# TITLE``, then blocks separated by one blank line."""

    def __init__(self, title: str):
        self._blocks: list[str] = [f"# {title}"]

    def heading(self, text: str, level: int = 2) -> None:
        """``## text`` (``level`` 2) or ``### text`` (3)."""
        if level not in (2, 3, 4):
            raise ValueError(f"a section heading has level 2, 3 or 4 (1 is the title), got {level}")
        self._blocks.append(f"{'#' * level} {text}")

    def paragraph(self, text: str) -> None:
        self._blocks.append(text)

    def table(self, header: Sequence[object], rows: Iterable[Sequence[object]]) -> None:
        """A table of :func:`table_lines`."""
        self._blocks.append("\n".join(table_lines(header, rows)))

    def lines(self, text: Union[str, Sequence[str]]) -> None:
        """Lines formatted elsewhere (e.g. another module's table), trailing blank lines dropped."""
        self._blocks.append((text if isinstance(text, str) else "\n".join(text)).rstrip("\n"))

    def code(self, lines: Sequence[str]) -> None:
        """A fenced code block (commands to copy), each line as it is."""
        self._blocks.append("\n".join(["```", *lines, "```"]))

    def image(self, alt: str, file: str) -> None:
        """``![alt](file)``, ``file`` relative to the report's folder."""
        self._blocks.append(f"![{alt}]({file})")

    def commands(self, heading: str, path: Optional[Path]) -> None:
        """A section listing the commands in ``path`` (one a line), when that file exists."""
        if path is not None and Path(path).is_file():
            self.heading(heading)
            self.code(Path(path).read_text(encoding="utf-8").splitlines())

    def text(self) -> str:
        return "\n\n".join(self._blocks) + "\n"

    def write(self, path: Union[str, os.PathLike]) -> Path:
        """The report into ``path``, atomically (:func:`write_atomic`); returns the path."""
        return write_atomic(path, self.text())
