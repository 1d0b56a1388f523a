"""Canaries: transcripts, insertion into the training manifest, synthesis speed, the CLI."""
from __future__ import annotations

import collections

import pytest
from scipy import stats

from privasr import canaries as canaries_module
from privasr.canaries import (DEFAULT_VOICE, canary_id_of, char_duration_stats, draw_transcripts, insert_canaries,
                              make_canaries, plan_canaries, repeat_id)
from privasr.data.manifest import Utterance, lexicon, read_manifest
from privasr.tts import Voice, synthesize
from tests.conftest import assert_one_line_error, requires_tts, run_privasr_cli

VOCAB = [f"W{i}" for i in range(10)]


def test_transcripts_are_seven_distinct_words_from_the_vocabulary():
    texts = draw_transcripts(VOCAB, 300, length=7, seed=1, exclude=["W0 W0 W0 W0 W0 W0 W0"])
    assert len(set(texts)) == 300
    assert all(len(t.split()) == 7 and set(t.split()) <= set(VOCAB) for t in texts)
    assert draw_transcripts(VOCAB, 300, seed=1) == draw_transcripts(VOCAB, 300, seed=1)
    assert draw_transcripts(VOCAB, 300, seed=1) != draw_transcripts(VOCAB, 300, seed=2)


def test_words_are_uniform():
    counts = collections.Counter(w for t in draw_transcripts(VOCAB, 3000, seed=0) for w in t.split())
    assert stats.chisquare([counts[w] for w in VOCAB]).pvalue > 1e-3
    assert stats.chisquare([counts[w] if w != "W0" else counts[w] + 400 for w in VOCAB]).pvalue < 1e-3  # power


def test_exclusion_and_too_small_vocabulary():
    texts = draw_transcripts(["A", "B"], 6, length=3, exclude=["A A A", "B B B", "A B C D"])
    assert not {"A A A", "B B B"} & set(texts)
    with pytest.raises(ValueError, match="cannot give 4 distinct"):
        draw_transcripts(["A", "B"], 4, length=2, exclude=["A A"])


def test_plan_counts_ids_and_disjoint_holdout():
    canaries, holdout = plan_canaries(VOCAB, counts=(1, 2, 4, 8, 16), per_count=20, holdout=1000, seed=0)
    assert collections.Counter(c.insertions for c in canaries) == {1: 20, 2: 20, 4: 20, 8: 20, 16: 20}
    assert canaries[0].id == "canary_0000" and holdout[-1].id == "holdout_00999"
    assert all(h.insertions == 0 for h in holdout)
    assert not {c.text for c in canaries} & {h.text for h in holdout}
    with pytest.raises(ValueError, match="distinct integers >= 1"):
        plan_canaries(VOCAB, counts=(1, 1))


def test_insertion_repeats_each_canary_its_number_of_times():
    train = [Utterance(f"t{i}", 1.0, f"/t{i}.wav", "s", "A B") for i in range(5)]
    canaries = [Utterance(f"canary_{i:04d}", 0.5, f"/c{i}.wav", "v", f"C {i}", {"insertions": str(k)})
                for i, k in enumerate([1, 2, 4, 16])]
    rows = insert_canaries(train, canaries)
    assert rows[:5] == train
    repeats = collections.Counter(canary_id_of(r.id) for r in rows[5:])
    assert repeats == {"canary_0000": 1, "canary_0001": 2, "canary_0002": 4, "canary_0003": 16}
    assert len(rows) == 5 + 1 + 2 + 4 + 16 and len({r.id for r in rows}) == len(rows)
    copies = [r for r in rows if canary_id_of(r.id) == "canary_0003"]
    assert {(r.wav, r.wrd) for r in copies} == {("/c3.wav", "C 3")}
    assert canary_id_of("t1") is None and canary_id_of(repeat_id("canary_0003", 2)) == "canary_0003"
    with pytest.raises(ValueError, match="already has an utterance with ID 'canary_0000_r1'"):
        insert_canaries([Utterance("canary_0000_r1", 1, "x", "s", "A")], canaries)


def test_char_duration_stats_hand_computed():
    utts = [Utterance("a", 0.2, "x", "s", "AB CD"), Utterance("b", 0.3, "x", "s", "ABCDE F"),
            Utterance("c", 0.06, "x", "s", "ABC")]  # 40, ~42.86, 20 ms per char
    got = char_duration_stats(utts, threshold_ms=41)
    assert got["n"] == 3 and got["below"] == 2
    assert (got["min_ms"], got["median_ms"], got["max_ms"]) == pytest.approx((20.0, 40.0, 300 / 7))


@requires_tts
def test_speed_four_is_a_quarter_of_the_duration():
    text = "purple hydrant seventeen orbit marble swallow thunder"
    slow, fast = synthesize(text, DEFAULT_VOICE, 1.0), synthesize(text, DEFAULT_VOICE, 4.0)
    assert len(fast) / len(slow) == pytest.approx(0.25, rel=0.03)
    quick_voice = Voice("espeak-ng", "en-us", rate=175)  # the CTC trap the default avoids
    assert 1000 * len(synthesize(text, quick_voice, 4.0)) / 16000 / len(text) < 40


@requires_tts
def test_make_canaries_end_to_end(tiny_mini_tts, tmp_path, monkeypatch):
    out = make_canaries(tmp_path / "can", train_in=tiny_mini_tts["train"], counts=(1, 3), per_count=2, holdout=4,
                        nj=2, seed=0)
    canaries, holdout = read_manifest(out["canaries"]), read_manifest(out["holdout"])
    train, with_canaries = read_manifest(tiny_mini_tts["train"]), read_manifest(out["train"])
    assert [int(c.extra["insertions"]) for c in canaries] == [1, 1, 3, 3]
    vocab = set(lexicon(train))
    assert all(len(u.wrd.split()) == 7 and set(u.wrd.split()) <= vocab for u in canaries + holdout)
    assert len(with_canaries) == len(train) + 8
    repeats = collections.Counter(canary_id_of(u.id) for u in with_canaries if canary_id_of(u.id))
    assert repeats == {c.id: int(c.extra["insertions"]) for c in canaries}
    assert char_duration_stats(canaries + holdout)["min_ms"] > 45  # default voice keeps CTC feasible
    assert {u.spk_id for u in canaries + holdout} == {DEFAULT_VOICE.id}

    monkeypatch.setattr(canaries_module, "synthesize_many", lambda *a, **k: pytest.fail("synthesized again"))
    assert make_canaries(tmp_path / "can", train_in=tiny_mini_tts["train"], counts=(1, 3), per_count=2, holdout=4,
                         nj=2, seed=0) == out


@requires_tts
def test_cli_writes_outputs_and_reports_ms_per_char(tiny_mini_tts, tmp_path):
    proc = run_privasr_cli("privasr.cli.make_canaries", "--out", tmp_path / "c", "--train-in", tiny_mini_tts["train"],
                           "--train-out", tmp_path / "train_wc.csv", "--counts", "2", "--per-count", "1",
                           "--holdout", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "canaries: 1 utts, ms/char min" in proc.stdout and "under 40 ms/char" in proc.stdout
    assert len(read_manifest(tmp_path / "train_wc.csv")) == 16 + 2


def test_cli_errors_are_one_line_exit_2(tmp_path):
    assert_one_line_error(run_privasr_cli("privasr.cli.make_canaries", "--out", tmp_path), "need a vocabulary")
    assert_one_line_error(run_privasr_cli("privasr.cli.make_canaries", "--out", tmp_path, "--vocab", tmp_path / "no.txt"),
                          "no.txt: file not found")
    (tmp_path / "v.txt").write_text("A\nB\nC\n")
    assert_one_line_error(run_privasr_cli("privasr.cli.make_canaries", "--out", tmp_path, "--vocab", tmp_path / "v.txt",
                                          "--counts", "0"), "--counts: expected an integer >= 1, got 0")
    assert_one_line_error(run_privasr_cli("privasr.cli.make_canaries", "--out", tmp_path, "--per-count", "x"), "--per-count")
