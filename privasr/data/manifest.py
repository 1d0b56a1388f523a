"""SpeechBrain CSV manifests: typed reading, writing and validation.

A manifest is a CSV file with the header ``ID,duration,wav,spk_id,wrd`` (the format of
SpeechBrain's LibriSpeech recipes) and one utterance per row:

* ``ID``       -- unique utterance identifier;
* ``duration`` -- length of the audio in seconds;
* ``wav``      -- path of the audio file (absolute when written by privasr);
* ``spk_id``   -- speaker identifier (for synthesized corpora: the voice configuration);
* ``wrd``      -- transcript, upper-case words separated by single spaces.

Further columns (e.g. ``insertions`` in ``canaries.csv``) are kept in
:attr:`Utterance.extra`. Every problem found while reading is a :class:`ValueError` that
names the file and the line, e.g. ``train.csv:7: duplicate ID 'a-1' (first on line 3)``.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "MANIFEST_COLUMNS",
    "Utterance",
    "read_manifest",
    "write_manifest",
    "read_table",
    "lexicon",
    "read_lexicon",
    "write_lexicon",
]

MANIFEST_COLUMNS = ("ID", "duration", "wav", "spk_id", "wrd")


@dataclass(frozen=True)
class Utterance:
    """One manifest row. ``extra`` holds the values of any further columns, as strings."""

    id: str
    duration: float
    wav: str
    spk_id: str
    wrd: str
    extra: Mapping[str, str] = field(default_factory=dict, compare=True, hash=False)

    def row(self) -> dict[str, str]:
        """The CSV row; the duration keeps 7 decimals (exact to the sample at 16 kHz)."""
        base = {"ID": self.id, "duration": _format_duration(self.duration), "wav": self.wav,
                "spk_id": self.spk_id, "wrd": self.wrd}
        return {**base, **{k: str(v) for k, v in self.extra.items()}}


def _format_duration(seconds: float) -> str:
    text = f"{seconds:.7f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def read_table(path: str | os.PathLike, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV file with a header; return ``(line number, row)`` pairs.

    Raises :class:`FileNotFoundError` when the file is absent and :class:`ValueError` when it is
    empty, not valid CSV, lacks one of the ``required`` columns or has a row with too many or
    too few fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: a spreadsheet's BOM is not part of "ID"
            return _read_rows(path, csv.DictReader(handle), required)
    except (csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable UTF-8 CSV file ({err})") from None


def _read_rows(path: Path, reader: csv.DictReader, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    header = reader.fieldnames
    if not header:
        raise ValueError(f"{path}: empty file, expected a header with columns {','.join(required)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    rows = []
    for row in reader:
        if None in row or None in row.values():
            raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields")
        rows.append((reader.line_num, row))
    return rows


def read_manifest(
    path: str | os.PathLike,
    *,
    check_audio: bool = True,
    replacements: Mapping[str, str] | None = None,
) -> list[Utterance]:
    """Read and validate a manifest.

    Args:
        path: the CSV file.
        check_audio: raise if a ``wav`` file does not exist.
        replacements: SpeechBrain-style placeholders, e.g. ``{"data_root": "/data"}`` turns
            ``$data_root/a.wav`` into ``/data/a.wav``.

    Raises:
        ValueError: missing columns, duplicate IDs, empty transcripts, bad durations or
            missing audio, naming the file and the line.
    """
    seen: dict[str, int] = {}
    utterances = []
    for line, row in read_table(path, MANIFEST_COLUMNS):
        utt = _utterance(path, line, row, replacements or {})
        if utt.id in seen:
            raise ValueError(f"{path}:{line}: duplicate ID '{utt.id}' (first on line {seen[utt.id]})")
        if check_audio and not Path(utt.wav).is_file():
            raise ValueError(f"{path}:{line}: audio file of '{utt.id}' not found: {utt.wav}")
        seen[utt.id] = line
        utterances.append(utt)
    return utterances


def _utterance(path, line: int, row: dict[str, str], replacements: Mapping[str, str]) -> Utterance:
    utt_id = row["ID"].strip()
    if not utt_id:
        raise ValueError(f"{path}:{line}: empty ID")
    try:
        duration = float(row["duration"])
    except ValueError:
        raise ValueError(f"{path}:{line}: duration '{row['duration']}' of '{utt_id}' is not a number") from None
    if not duration >= 0:
        raise ValueError(f"{path}:{line}: duration {duration} of '{utt_id}' is negative or NaN")
    wrd = " ".join(row["wrd"].split())
    if not wrd:
        raise ValueError(f"{path}:{line}: empty transcript (wrd) for '{utt_id}'")
    wav = row["wav"]
    for key, value in replacements.items():
        wav = wav.replace(f"${key}", str(value))
    extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS}
    return Utterance(utt_id, duration, wav, row["spk_id"], wrd, extra)


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance]) -> Path:
    """Write ``utterances`` to ``path`` atomically; extra columns follow the standard five.

    Raises :class:`ValueError` on duplicate IDs or rows with different extra columns.
    """
    path = Path(path)
    utterances = list(utterances)
    extra = list(utterances[0].extra) if utterances else []
    _check_writable(path, utterances, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*MANIFEST_COLUMNS, *extra], lineterminator="\n")
        writer.writeheader()
        writer.writerows(u.row() for u in utterances)
    os.replace(tmp, path)
    return path


def _check_writable(path: Path, utterances: Sequence[Utterance], extra: Sequence[str]) -> None:
    seen: set[str] = set()
    for utt in utterances:
        if utt.id in seen:
            raise ValueError(f"{path}: refusing to write duplicate ID '{utt.id}'")
        if list(utt.extra) != list(extra):
            raise ValueError(f"{path}: '{utt.id}' has columns {list(utt.extra)}, expected {list(extra)}")
        seen.add(utt.id)


def lexicon(utterances: Iterable[Utterance]) -> list[str]:
    """Sorted unique words of the transcripts."""
    return sorted({word for utt in utterances for word in utt.wrd.split()})


def write_lexicon(path: str | os.PathLike, words: Iterable[str]) -> Path:
    """Write one word per line (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{w}\n" for w in words), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_lexicon(path: str | os.PathLike) -> list[str]:
    """Read a word list (one word per line, blank lines ignored); sorted and unique.

    Raises :class:`ValueError` if a line holds more than one word or the list is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    words = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if len(fields) > 1:
            raise ValueError(f"{path}:{number}: expected one word per line, got '{line.strip()}'")
        words.update(fields)
    if not words:
        raise ValueError(f"{path}: empty word list")
    return sorted(words)
