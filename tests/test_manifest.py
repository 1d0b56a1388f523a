"""SpeechBrain CSV manifests: round trips and validation errors naming file and line."""
from __future__ import annotations

import csv

import pytest

from privasr.data.manifest import (MANIFEST_COLUMNS, Utterance, lexicon, read_lexicon, read_manifest, read_table,
                                   write_lexicon, write_manifest)


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def wavs(tmp_path):
    paths = []
    for name in ("a.wav", "b,with comma.wav"):
        path = tmp_path / name
        path.write_bytes(b"")
        paths.append(str(path))
    return paths


def test_round_trip_keeps_every_field_and_extra_columns(tmp_path, wavs):
    utts = [Utterance("u1", 1.5, wavs[0], "spk1", "HELLO WORLD", {"insertions": "4"}),
            Utterance("u2", 12345 / 16000, wavs[1], "spk2", "GOOD DAY", {"insertions": "1"})]
    path = write_manifest(tmp_path / "m.csv", utts)
    assert path.read_text().splitlines()[0] == "ID,duration,wav,spk_id,wrd,insertions"
    assert read_manifest(path) == utts


def test_header_is_the_speechbrain_one(tmp_path, wavs):
    path = write_manifest(tmp_path / "m.csv", [Utterance("u1", 2.0, wavs[0], "s", "A B")])
    assert path.read_text().splitlines() == [",".join(MANIFEST_COLUMNS), f"u1,2.0,{wavs[0]},s,A B"]


def test_replacements_expand_data_root(tmp_path, wavs):
    path = _write_csv(tmp_path / "m.csv", MANIFEST_COLUMNS, [["u1", "1", "$data_root/a.wav", "s", "A"]])
    (utt,) = read_manifest(path, replacements={"data_root": str(tmp_path)})
    assert utt.wav == f"{tmp_path}/a.wav"


def test_missing_column_names_file_and_column(tmp_path):
    path = _write_csv(tmp_path / "m.csv", ["ID", "duration", "wav", "spk_id"], [["u1", "1", "x", "s"]])
    with pytest.raises(ValueError, match=r"m\.csv:1: missing column\(s\) wrd"):
        read_manifest(path, check_audio=False)


def test_duplicate_id_names_both_lines(tmp_path):
    rows = [["u1", "1", "x", "s", "A"], ["u2", "1", "x", "s", "B"], ["u1", "1", "x", "s", "C"]]
    path = _write_csv(tmp_path / "m.csv", MANIFEST_COLUMNS, rows)
    with pytest.raises(ValueError, match=r"m\.csv:4: duplicate ID 'u1' \(first on line 2\)"):
        read_manifest(path, check_audio=False)


def test_empty_transcript_names_line(tmp_path):
    path = _write_csv(tmp_path / "m.csv", MANIFEST_COLUMNS, [["u1", "1", "x", "s", "A"], ["u2", "1", "x", "s", "  "]])
    with pytest.raises(ValueError, match=r"m\.csv:3: empty transcript \(wrd\) for 'u2'"):
        read_manifest(path, check_audio=False)


def test_missing_audio_is_an_error_only_when_checked(tmp_path, wavs):
    rows = [["u1", "1", wavs[0], "s", "A"], ["u2", "1", str(tmp_path / "gone.wav"), "s", "B"]]
    path = _write_csv(tmp_path / "m.csv", MANIFEST_COLUMNS, rows)
    with pytest.raises(ValueError, match=r"m\.csv:3: audio file of 'u2' not found: .*gone\.wav"):
        read_manifest(path)
    assert [u.id for u in read_manifest(path, check_audio=False)] == ["u1", "u2"]


@pytest.mark.parametrize("duration", ["abc", "-1", "nan"])
def test_bad_duration_names_line(tmp_path, duration):
    path = _write_csv(tmp_path / "m.csv", MANIFEST_COLUMNS, [["u1", duration, "x", "s", "A"]])
    with pytest.raises(ValueError, match=r"m\.csv:2: duration"):
        read_manifest(path, check_audio=False)


def test_ragged_row_and_empty_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("ID,duration,wav,spk_id,wrd\nu1,1,x,s,A,extra\n")
    with pytest.raises(ValueError, match=r"m\.csv:2: expected 5 fields"):
        read_manifest(path, check_audio=False)
    path.write_text("")
    with pytest.raises(ValueError, match=r"m\.csv: empty file"):
        read_manifest(path, check_audio=False)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_table(tmp_path / "nope.csv", ["ID"])


def test_write_refuses_duplicates_and_mixed_columns(tmp_path):
    with pytest.raises(ValueError, match="duplicate ID 'u1'"):
        write_manifest(tmp_path / "m.csv", [Utterance("u1", 1, "x", "s", "A"), Utterance("u1", 1, "x", "s", "B")])
    with pytest.raises(ValueError, match="'u2' has columns"):
        mixed = [Utterance("u1", 1, "x", "s", "A", {"k": "1"}), Utterance("u2", 1, "x", "s", "B")]
        write_manifest(tmp_path / "m.csv", mixed)
    assert not (tmp_path / "m.csv").exists()


def test_lexicon_round_trip(tmp_path):
    utts = [Utterance("u1", 1, "x", "s", "THE CAT SAT"), Utterance("u2", 1, "x", "s", "THE DOG")]
    assert lexicon(utts) == ["CAT", "DOG", "SAT", "THE"]
    path = write_lexicon(tmp_path / "lexicon.txt", lexicon(utts))
    assert path.read_text() == "CAT\nDOG\nSAT\nTHE\n"
    assert read_lexicon(path) == ["CAT", "DOG", "SAT", "THE"]
    path.write_text("ONE\nTWO WORDS\n")
    with pytest.raises(ValueError, match=r"lexicon\.txt:2: expected one word per line"):
        read_lexicon(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="empty word list"):
        read_lexicon(path)
