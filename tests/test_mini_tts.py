"""mini_tts: the text source, the speaker bank and the synthesized corpus."""
from __future__ import annotations

import re

import pytest
import soundfile

from privasr import tts
from privasr.data import mini_tts as mini_tts_module
from privasr.data.manifest import read_lexicon, read_manifest
from privasr.data.mini_tts import SPLITS, prepare_mini_tts, speakers
from privasr.data.text_source import SentenceGenerator, split_sentences, word_inventory
from privasr.tts import check_voices
from tests.conftest import TINY_SIZES, assert_one_line_error, requires_tts, run_privasr_cli


# ------------------------------------------------------------------ text
def test_default_size_text_is_disjoint_varied_and_moderate():
    splits = split_sentences(3000, 200, 200, seed=0)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [3000, 200, 200]
    sets = {s: set(v) for s, v in splits.items()}
    assert len(sets["train"]) == 3000 and len(sets["dev"]) == 200 and len(sets["test"]) == 200
    assert not sets["train"] & sets["dev"] and not sets["train"] & sets["test"] and not sets["dev"] & sets["test"]
    train_vocab = {w for s in splits["train"] for w in s.split()}
    assert len(train_vocab) >= 1000
    assert train_vocab <= set(word_inventory())
    lengths = [len(s.split()) for split in splits.values() for s in split]
    assert min(lengths) >= 5 and max(lengths) <= 15
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", s) for split in splits.values() for s in split)


def test_splits_are_prefix_stable_and_seeded():
    big, small = split_sentences(500, 40, 30, seed=3), split_sentences(100, 10, 5, seed=3)
    for split, sentences in small.items():
        assert big[split][: len(sentences)] == sentences
    assert split_sentences(50, 5, 5, seed=3) == split_sentences(50, 5, 5, seed=3)
    assert split_sentences(50, 5, 5, seed=4)["train"] != split_sentences(50, 5, 5, seed=3)["train"]


def test_articles_agree_with_the_next_word():
    generator = SentenceGenerator(seed=1)
    for _ in range(2000):
        words = generator.sentence().split()
        for article, nxt in zip(words, words[1:]):
            if article == "a":
                assert nxt[0] not in "aeio", words
            if article == "an":
                assert nxt[0] in "aeiou", words


def test_negative_size_is_rejected():
    with pytest.raises(ValueError, match="num_dev must be >= 0"):
        split_sentences(10, -1, 1)


# ------------------------------------------------------------------ speakers
@requires_tts
def test_speaker_bank_has_at_least_eight_installed_voices():
    bank = speakers(use_flite=True)
    assert len({v.name for v in bank}) >= 8
    assert len({v.id for v in bank}) == len(bank)
    assert {v.engine for v in bank} == {"espeak-ng", "flite"}
    assert len({v.rate for v in bank}) > 5 and len({v.pitch for v in bank}) > 5
    check_voices(bank)  # espeak-ng would silently ignore an unknown variant


# ------------------------------------------------------------------ corpus
def _rows(path):
    return [(u.id, u.duration, u.spk_id, u.wrd) for u in read_manifest(path)]


@requires_tts
def test_tiny_corpus_manifests_audio_and_lexicon(tiny_mini_tts):
    expected_text = split_sentences(TINY_SIZES["num_train"], TINY_SIZES["num_dev"], TINY_SIZES["num_test"], seed=0)
    bank_ids = {v.id for v in speakers()}
    for split in SPLITS:
        utts = read_manifest(tiny_mini_tts[split])
        assert [u.wrd for u in utts] == [s.upper() for s in expected_text[split]]
        for utt in utts:
            info = soundfile.info(utt.wav)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert utt.duration == pytest.approx(info.frames / 16000, abs=1e-7)
            assert 0.5 < utt.duration < 10
            assert utt.spk_id in bank_ids
    train = read_manifest(tiny_mini_tts["train"])
    assert read_lexicon(tiny_mini_tts["lexicon"]) == sorted({w for u in train for w in u.wrd.split()})


@requires_tts
def test_same_seed_same_bytes_other_seed_differs(tiny_mini_tts, tmp_path):
    again = prepare_mini_tts(tmp_path / "again", nj=1, seed=0, **TINY_SIZES)
    other = prepare_mini_tts(tmp_path / "other", nj=2, seed=1, num_train=4, num_dev=1, num_test=1)
    for split in SPLITS:
        first, second = read_manifest(tiny_mini_tts[split]), read_manifest(again[split])
        assert _rows(tiny_mini_tts[split]) == _rows(again[split])
        for a, b in zip(first, second):
            with open(a.wav, "rb") as fa, open(b.wav, "rb") as fb:
                assert fa.read() == fb.read(), a.id
    assert [u.wrd for u in read_manifest(other["train"])] != [u.wrd for u in read_manifest(tiny_mini_tts["train"])][:4]


@requires_tts
def test_second_run_does_nothing_and_interrupted_run_resumes(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    paths = prepare_mini_tts(out, num_train=3, num_dev=1, num_test=1, seed=5)
    victim = read_manifest(paths["train"])[1].wav
    original = open(victim, "rb").read()

    def no_synthesis(*args, **kwargs):
        raise AssertionError("synthesized again")

    monkeypatch.setattr(mini_tts_module, "synthesize_many", no_synthesis)
    assert prepare_mini_tts(out, num_train=3, num_dev=1, num_test=1, seed=5) == paths
    monkeypatch.undo()

    (out / ".mini_tts.done").unlink()  # as if killed after writing some files
    (out / "wav" / "train" / "train_000001.wav").unlink()
    synthesized = []
    real = tts.synthesize_to_file
    monkeypatch.setattr(tts, "synthesize_to_file", lambda job, *a: synthesized.append(job.path) or real(job, *a))
    prepare_mini_tts(out, num_train=3, num_dev=1, num_test=1, seed=5)
    assert synthesized == [victim]
    assert open(victim, "rb").read() == original
    assert (out / ".mini_tts.done").is_file()


@requires_tts
def test_changing_the_seed_replaces_stale_audio(tmp_path):
    out = tmp_path / "corpus"
    first = read_manifest(prepare_mini_tts(out, num_train=2, num_dev=0, num_test=0, seed=0)["train"])
    stale = open(first[0].wav, "rb").read()
    second = read_manifest(prepare_mini_tts(out, num_train=2, num_dev=0, num_test=0, seed=1)["train"])
    assert first[0].wrd != second[0].wrd
    assert open(second[0].wav, "rb").read() != stale
    assert second[0].duration == pytest.approx(soundfile.info(second[0].wav).frames / 16000, abs=1e-7)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    assert_one_line_error(run_privasr_cli("privasr.data.mini_tts", "--out", tmp_path, "--nj", "0"), "nj must be >= 1")
    assert_one_line_error(run_privasr_cli("privasr.data.mini_tts", "--nj", "2"), "--out")
    proc = run_privasr_cli("privasr.data.mini_tts", "--out", tmp_path, "--num-train", "x")
    assert_one_line_error(proc, "--num-train")
