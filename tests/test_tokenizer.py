"""Tests for privasr.tokenizer: training from a manifest, blank at 0,
round trips, determinism, idempotency, clear errors."""

import csv

import pytest
import torch

from privasr.tokenizer import BLANK_ID, Tokenizer, model_output_size, read_transcripts

TEXTS = [
    "THE CAT SAT ON THE MAT",
    "A DOG RAN IN THE PARK",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "HELLO WORLD THIS IS A TEST OF THE TOKENIZER",
    "SPEECH RECOGNITION MODELS SHOULD NOT MEMORIZE CANARIES",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        for i, text in enumerate(TEXTS):
            writer.writerow([f"utt{i}", 1.0, f"utt{i}.wav", "spk", text])
    return path


@pytest.mark.parametrize("model_type, vocab_size", [("unigram", 40), ("char", 100)])
def test_round_trip_with_blank_reserved(manifest, tmp_path, model_type, vocab_size):
    tok = Tokenizer.train(manifest, tmp_path / "tok", vocab_size, model_type=model_type)
    if model_type == "unigram":
        assert tok.vocab_size == vocab_size
    else:  # the characters of the text (+ word boundary, unk) and the blank
        assert tok.vocab_size == len(set("".join(TEXTS)) - {" "}) + 3
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and min(ids) >= 1 and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
        assert tok.decode([BLANK_ID] + ids + [BLANK_ID]) == text
    assert tok.id_to_piece(0) == "<blank>" and tok.unk_id == 1
    assert torch.equal(tok.encode_as_tensor("THE CAT"), torch.tensor(tok.encode("THE CAT")))
    assert tok.decode(torch.tensor(tok.encode("THE CAT"))) == "THE CAT"


def test_char_tokens_are_characters(manifest, tmp_path):
    tok = Tokenizer.train(manifest, tmp_path / "char", 100, model_type="char")
    pieces = [tok.id_to_piece(i) for i in tok.encode("THE CAT")]
    assert pieces == ["▁", "T", "H", "E", "▁", "C", "A", "T"]


def test_deterministic_and_idempotent(manifest, tmp_path):
    first = Tokenizer.train(manifest, tmp_path / "a", 40)
    second = Tokenizer.train(manifest, tmp_path / "b", 40)
    # (the model files differ only in the training paths they record)
    pieces = [(first.id_to_piece(i), first.processor.get_score(i - 1))
              for i in range(1, first.vocab_size)]
    assert pieces == [(second.id_to_piece(i), second.processor.get_score(i - 1))
                      for i in range(1, second.vocab_size)]
    stamp = (tmp_path / "a" / "tokenizer.model").stat().st_mtime_ns
    again = Tokenizer.train(manifest, tmp_path / "a", 40)
    assert (tmp_path / "a" / "tokenizer.model").stat().st_mtime_ns == stamp
    assert again.encode(TEXTS[2]) == first.encode(TEXTS[2])
    assert Tokenizer.load(tmp_path / "a").encode(TEXTS[2]) == first.encode(TEXTS[2])


def test_clear_errors(manifest, tmp_path):
    Tokenizer.train(manifest, tmp_path / "tok", 40)
    with pytest.raises(ValueError, match="other settings"):
        Tokenizer.train(manifest, tmp_path / "tok", 50)
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(manifest, tmp_path / "x", 40, model_type="word-ish")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(manifest, tmp_path / "x", 2)
    with pytest.raises(ValueError, match="no 'text' column"):
        read_transcripts(manifest, column="text")
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="outside"):
        Tokenizer.load(tmp_path / "tok").decode([10_000])


@pytest.mark.parametrize("model_type, vocab_size", [("char", 100), ("unigram", 40)])
def test_unknown_characters_are_the_ones_that_encode_to_unk(manifest, tmp_path, model_type, vocab_size):
    tok = Tokenizer.train(manifest, tmp_path / "tok", vocab_size, model_type=model_type)
    assert tok.unknown_characters("THE CAT") == []
    assert tok.unknown_characters("O'NEILL SAT, É") == ["'", ",", "É"]
    assert tok.unknown_characters("the cat") == ["a", "c", "e", "h", "t"]  # the training text is upper case
    assert tok.unk_id in tok.encode("CAT'S") and tok.unk_id not in tok.encode("CATS")


def test_model_output_size_is_the_tokenizers_and_its_training_settings_are_kept(manifest, tmp_path):
    tok = Tokenizer.train(manifest, tmp_path / "char", 100, model_type="char")
    assert model_output_size(tok, 100) == tok.vocab_size == len(set("".join(TEXTS)) - {" "}) + 3
    assert model_output_size(None, 100) == 100  # no tokenizer: a model's shape only (e.g. on the meta device)
    loaded = Tokenizer.load(tmp_path / "char")
    assert loaded.config["vocab_size"] == 100 and loaded.config["model_type"] == "char"
