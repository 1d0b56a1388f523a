"""LibriSpeech preparation on a tiny synthesized tree in the real layout."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile

from privasr.data.librispeech import prepare_librispeech, read_transcripts
from privasr.data.manifest import MANIFEST_COLUMNS, read_manifest
from tests.conftest import assert_one_line_error, run_privasr_cli

# split -> speaker -> chapter -> [(utterance number, samples, transcript)]
TREE = {
    "dev-clean": {"84": {"121123": [(0, 8000, "GO DO YOU HEAR"), (1, 24000, "BUT IN LESS THAN FIVE MINUTES")]},
                  "251": {"136532": [(2, 12345, "I'M TELLING YOU")]}},
    "test-clean": {"1089": {"134686": [(0, 16000, "HE HOPED THERE WOULD BE STEW")]}},
}


def make_tree(root):
    """Write ``TREE`` as ``root/LibriSpeech/<split>/<spk>/<chapter>/`` with FLAC files."""
    rng = np.random.default_rng(0)
    for split, speakers in TREE.items():
        for speaker, chapters in speakers.items():
            for chapter, utts in chapters.items():
                folder = root / "LibriSpeech" / split / speaker / chapter
                folder.mkdir(parents=True)
                lines = []
                for number, samples, text in utts:
                    utt_id = f"{speaker}-{chapter}-{number:04d}"
                    audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)
                    soundfile.write(folder / f"{utt_id}.flac", audio, 16000, format="FLAC")
                    lines.append(f"{utt_id} {text}\n")
                (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return root / "LibriSpeech"


@pytest.fixture
def tiny_librispeech(tmp_path):
    return make_tree(tmp_path / "corpus")


def test_manifests_match_the_tree(tiny_librispeech, tmp_path):
    out = prepare_librispeech(tiny_librispeech, ["dev-clean", "test-clean"], tmp_path / "data", nj=2)
    assert set(out) == {"dev-clean", "test-clean"}
    assert out["dev-clean"].read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    dev = read_manifest(out["dev-clean"])
    expected = [("251-136532-0002", 12345, "251", "I'M TELLING YOU"), ("84-121123-0000", 8000, "84", "GO DO YOU HEAR"),
                ("84-121123-0001", 24000, "84", "BUT IN LESS THAN FIVE MINUTES")]
    assert [(u.id, round(u.duration * 16000), u.spk_id, u.wrd) for u in dev] == expected
    assert all(u.wav.endswith(f"/{u.id}.flac") and u.wav.startswith("/") for u in dev)
    (test,) = read_manifest(out["test-clean"])
    assert (test.id, test.duration) == ("1089-134686-0000", 1.0)


def test_parent_of_librispeech_is_accepted_and_rerun_does_nothing(tiny_librispeech, tmp_path):
    out = prepare_librispeech(tiny_librispeech.parent, ["test-clean"], tmp_path / "data")
    mtime = out["test-clean"].stat().st_mtime_ns
    assert prepare_librispeech(tiny_librispeech.parent, ["test-clean"], tmp_path / "data") == out
    assert out["test-clean"].stat().st_mtime_ns == mtime


def test_missing_split_fails_before_writing_anything(tiny_librispeech, tmp_path):
    with pytest.raises(FileNotFoundError, match="split 'train-clean-100' not found"):
        prepare_librispeech(tiny_librispeech, ["dev-clean", "train-clean-100"], tmp_path / "data")
    assert not (tmp_path / "data" / "dev-clean.csv").exists()
    with pytest.raises(FileNotFoundError, match="LibriSpeech root not found"):
        prepare_librispeech(tmp_path / "nowhere", ["dev-clean"], tmp_path / "data")


def test_missing_flac_and_malformed_line_name_file_and_line(tiny_librispeech):
    chapter = tiny_librispeech / "dev-clean" / "84" / "121123"
    (chapter / "84-121123-0001.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"84-121123\.trans\.txt:2: audio of '84-121123-0001' not found"):
        read_transcripts(tiny_librispeech / "dev-clean")
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n99-1-0001 WRONG SPEAKER\n")
    with pytest.raises(ValueError, match=r"84-121123\.trans\.txt:2: expected '84-121123-<n> TRANSCRIPT'"):
        read_transcripts(tiny_librispeech / "dev-clean")


def test_cli_missing_corpus_is_one_line_exit_2(tiny_librispeech, tmp_path):
    proc = run_privasr_cli("privasr.data.librispeech", "--root", tiny_librispeech, "--splits", "dev-other",
                           "--out", tmp_path / "data")
    assert_one_line_error(proc, "split 'dev-other' not found")
    proc = run_privasr_cli("privasr.data.librispeech", "--root", tmp_path / "absent", "--out", tmp_path / "data")
    assert_one_line_error(proc, "LibriSpeech root not found")


def test_cli_success(tiny_librispeech, tmp_path):
    proc = run_privasr_cli("privasr.data.librispeech", "--root", tiny_librispeech, "--splits", "dev-clean",
                           "--out", tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert len(read_manifest(tmp_path / "data" / "dev-clean.csv")) == 3
