"""privasr-canary-gradients: per-example gradient norms of canaries vs normal utterances, and the prediction."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from privasr.core_log import predicted_weight_ratio
from privasr.cli import canary_gradients

from .fault_injection import HAVE_TTS, RECIPE, quick_corpus, recipe_argv, run_python

YAML = str(RECIPE / "hparams" / "conformer_ctc.yaml")


# -- the prediction ------------------------------------------------------------------------
@pytest.mark.parametrize("r, b, expected", [(1.6, 1, 1.6), (1.6, 2, 1.33), (1.6, 4, 1.18), (1.6, 8, 1.09),
                                            (10.0, 4, 5.07), (1.0, 8, 1.0)])
def test_predicted_weight_ratio_against_hand_values(r, b, expected):
    # sqrt(r^2 + B - 1) / sqrt(B): 1.6 -> sqrt(3.56 / 2) = 1.334, sqrt(5.56 / 4) = 1.179, sqrt(9.56 / 8) = 1.093;
    # 10 at B = 4: sqrt(103 / 4) = 5.074; r = 1 (a canary like any utterance): nothing to cut
    assert predicted_weight_ratio(r, b) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("r, b", [(0.0, 2), (-1.0, 2), (math.inf, 2), (math.nan, 2), (1.6, 0), (1.6, 1.5)])
def test_predicted_weight_ratio_refuses_nonsense(r, b):
    with pytest.raises(ValueError):
        predicted_weight_ratio(r, b)


# -- the tool on a trained tiny model --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quick corpus and a 1-epoch tiny run on it (its first 16 training utterances)."""
    if not HAVE_TTS:
        pytest.skip("needs espeak-ng, flite and sox")
    data = quick_corpus(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("canary_gradients") / "run"
    overrides = ["--number_of_epochs", "1", "--batch_size", "4", "--virtual_cores", "2"]
    proc = run_python(*recipe_argv(data, out, *overrides))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return data, out, recipe_argv(data, out, *overrides)[2:]  # the recipe overrides (after the YAML)


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and "torchvision" not in line]


def random_head(head: torch.nn.Linear) -> None:
    """A seeded random CTC head: the tiny 1-epoch model emits "▁" or blank on every frame (an empty
    transcript), this one labels that vary from frame to frame (repeats to merge, blanks to drop)."""
    generator = torch.Generator().manual_seed(0)
    head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
    head.bias.zero_()


def hand_loaded(overrides: list[str], out, wav: str, edit_head=None):
    """``(model, tokenizer, log_probs, out_lens)`` of one utterance: the model built from the YAML, the
    checkpoint's weights loaded by hand (then ``edit_head(model.ctc_head)``), evaluation mode (no dropout,
    no SpecAugment)."""
    import soundfile

    from privasr.cli.hparams import load_hparams, parse_arguments

    hparams_file, _, yaml_overrides = parse_arguments([YAML, *overrides])
    hparams = load_hparams(hparams_file, yaml_overrides)
    model = hparams["model"]
    (checkpoint,) = sorted((out / "save").glob("CKPT*"))
    model.load_state_dict(torch.load(checkpoint / "model.ckpt"))
    model.eval()
    if edit_head is not None:
        with torch.no_grad():
            edit_head(model.ctc_head)
    signal, _ = soundfile.read(wav, dtype="float32")
    feats, feat_lens = model.features(torch.from_numpy(signal)[None], torch.ones(1))
    log_probs, out_lens = model.forward_features(feats, feat_lens)
    return model, hparams["tokenizer"], log_probs, out_lens


def independent_norm(overrides: list[str], out, wav: str, words: str) -> float:
    """The gradient norm of one utterance alone (:func:`hand_loaded`), plain ``torch.autograd.grad``."""
    model, tokenizer, log_probs, out_lens = hand_loaded(overrides, out, wav)
    tokens = tokenizer.encode_as_tensor(words)[None]
    loss = model.loss(log_probs, out_lens, tokens, torch.ones(1), reduction="mean")  # the YAML's loss_reduction
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def independent_transcript(overrides: list[str], out, wav: str, words: str,
                           edit_head=None) -> tuple[str, float]:
    """``(transcript, loss)`` by hand: best-path CTC (the argmax label of every frame, runs merged by
    itertools.groupby, blanks (0) dropped, the SentencePiece pieces joined by the tokenizer) and the
    utterance's summed CTC loss (torch's ``ctc_loss``)."""
    import itertools

    _, tokenizer, log_probs, _ = hand_loaded(overrides, out, wav, edit_head)
    labels = [label for label, _ in itertools.groupby(log_probs[0].argmax(-1).tolist()) if label != 0]
    tokens = tokenizer.encode_as_tensor(words)
    loss = torch.nn.functional.ctc_loss(log_probs[0].log_softmax(-1), tokens, (log_probs.shape[1],),
                                        (len(tokens),), blank=0, reduction="sum", zero_infinity=False)
    return tokenizer.decode(labels), float(loss.detach())


def rows_of(manifest) -> dict[str, dict]:
    with open(manifest, newline="") as f:
        return {row["ID"]: row for row in csv.DictReader(f)}


def test_norms_ratios_and_prediction_on_a_trained_model(trained, tmp_path, capsys):
    data, out, overrides = trained
    report = tmp_path / "r.json"
    status = canary_gradients.main(["--normal", "6", "--seed", "3", "--per-core", "1", "2", "4", "--json",
                                    str(report), YAML, "--", *overrides])
    table = capsys.readouterr().out
    assert status == 0
    got = json.loads(report.read_text())

    canaries, normal = rows_of(data / "canaries" / "canaries.csv"), rows_of(data / "train.csv")
    assert sorted(got["norms"]["canaries"]) == sorted(canaries)  # every canary, and 6 normal utterances
    assert len(got["norms"]["normal"]) == 6 and set(got["norms"]["normal"]) <= set(normal)
    assert got["normal"]["n"] == 6 and got["canaries"]["n"] == len(canaries)

    # per-example norms: each utterance alone, by an independent computation
    for group, rows in (("canaries", canaries), ("normal", normal)):
        for uid in list(got["norms"][group])[:2]:
            expected = independent_norm(overrides, out, rows[uid]["wav"], rows[uid]["wrd"])
            assert got["norms"][group][uid] == pytest.approx(expected, rel=1e-5), (group, uid)

    # the statistics, r and the prediction follow from the norms
    c, n = np.array(list(got["norms"]["canaries"].values())), np.array(list(got["norms"]["normal"].values()))
    assert got["normal"]["p50"] == pytest.approx(np.median(n)) and got["canaries"]["p10"] == pytest.approx(
        np.quantile(c, 0.1))
    r_median, r_mean = np.median(c) / np.median(n), c.mean() / n.mean()
    assert got["canaries"]["r_median"] == pytest.approx(r_median) and got["canaries"]["r_mean"] == pytest.approx(r_mean)
    for b in (1, 2, 4):
        assert got["predicted"][str(b)]["r_median"] == pytest.approx(math.sqrt((r_median ** 2 + b - 1) / b))
    assert got["predicted"]["1"]["r_mean"] == pytest.approx(r_mean)

    # r per insertion count, from the canaries file's insertions column
    counts = {uid: int(row["insertions"]) for uid, row in canaries.items()}
    for count in sorted(set(counts.values())):
        norms = [v for uid, v in got["norms"]["canaries"].items() if counts[uid] == count]
        entry = got["by_insertions"][str(count)]
        assert entry["n"] == len(norms) and entry["r_median"] == pytest.approx(np.median(norms) / np.median(n))
        assert f"| canaries x{count} | {len(norms)} | 0 | " in table

    assert f"| normal | 6 | 0 | 0 | {np.quantile(n, 0.1):.3g} | {np.median(n):.3g} |" in table
    assert f"| 2 | {math.sqrt((r_median ** 2 + 1) / 2):.3g} | {math.sqrt((r_mean ** 2 + 1) / 2):.3g} |" in table
    assert f"| 1 (PEC) | {r_median:.3g} |" in table
    assert list(got["norms"]["normal"]) == canary_gradients.draw_normal(
        type("Manifest", (), {"data_ids": list(normal)}), 6, 3, set(canaries))

    # the transcripts of the same utterances: a hand-written greedy decode, CER by jiwer directly
    import jiwer

    for group, rows in (("canaries", canaries), ("normal", normal)):
        decoded = got["transcripts"][group]
        assert list(decoded) == list(got["norms"][group])
        for uid in list(decoded)[:1]:  # the decode of varied labels: test_transcripts_of_a_random_head_...
            hyp, loss = independent_transcript(overrides, out, rows[uid]["wav"], rows[uid]["wrd"])
            assert decoded[uid]["hyp"] == hyp and decoded[uid]["loss"] == pytest.approx(loss, rel=1e-5), (group, uid)
        for uid, row in decoded.items():
            assert row["ref"] == rows[uid]["wrd"] and row["empty"] == (row["hyp"].strip() == "")
            assert row["cer"] == pytest.approx(jiwer.cer(row["ref"], row["hyp"])), (group, uid)
            assert row["loss"] is None or (math.isfinite(row["loss"]) and row["loss"] >= 0)
        cers = [row["cer"] for row in decoded.values()]
        empty = sum(row["empty"] for row in decoded.values())
        stats = got[group]
        assert stats["cer_p50"] == pytest.approx(np.median(cers)) and stats["cer_mean"] == pytest.approx(np.mean(cers))
        assert stats["cer_corpus"] == pytest.approx(jiwer.cer([r["ref"] for r in decoded.values()],
                                                              [r["hyp"] for r in decoded.values()]))
        assert stats["empty"] == empty and stats["empty_fraction"] == pytest.approx(empty / len(decoded))
        name = "normal" if group == "normal" else "canaries"
        assert (f"| {name} | {len(decoded)} | {np.median(cers):.3g} | {np.mean(cers):.3g} | "
                f"{stats['cer_corpus']:.3g} | {empty / len(decoded):.0%} ({empty}) |") in table
    for count in sorted(set(counts.values())):
        cers = [row["cer"] for uid, row in got["transcripts"]["canaries"].items() if counts[uid] == count]
        assert got["by_insertions"][str(count)]["cer_p50"] == pytest.approx(np.median(cers))


def test_a_model_whose_blank_dominates_transcribes_nothing(trained):
    """A CTC head whose blank logit outweighs every other label decodes every utterance to "": all empty,
    every CER 1 (each reference character deleted), and the group's empty fraction 1."""
    from privasr.asr import make_dataset
    from privasr.cli.norm_quantiles import load_brain

    data, _, overrides = trained
    brain, _, hparams = load_brain(YAML, overrides)
    with torch.no_grad():
        brain.modules.model.ctc_head.bias[0] += 1e4  # blank is id 0
    dataset = make_dataset(str(data / "canaries" / "canaries.csv"), hparams["tokenizer"], hparams["sample_rate"])
    ids = list(dataset.data_ids)[:3]
    rows = canary_gradients.transcribe_examples(brain, dataset, ids)
    assert list(rows) == ids and all(row["hyp"] == "" and row["empty"] and row["cer"] == 1.0 for row in rows.values())
    stats = canary_gradients.transcript_stats(list(rows.values()))
    assert stats["empty"] == 3 and stats["empty_fraction"] == 1.0 and stats["cer_p50"] == stats["cer_corpus"] == 1.0


def test_transcripts_of_a_random_head_match_a_hand_decode_and_jiwer(trained):
    """A random CTC head (:func:`random_head`) emits varying labels: non-empty transcripts, CERs that are
    neither 0 nor 1; each the hand-written decode's string, its loss torch's, its CER jiwer's on that string."""
    import jiwer

    from privasr.asr import make_dataset
    from privasr.cli.norm_quantiles import load_brain

    data, out, overrides = trained
    brain, _, hparams = load_brain(YAML, overrides)
    with torch.no_grad():
        random_head(brain.modules.model.ctc_head)
    manifest = data / "canaries" / "canaries.csv"
    dataset = make_dataset(str(manifest), hparams["tokenizer"], hparams["sample_rate"])
    ids = list(dataset.data_ids)[:2]
    rows, manifest_rows = canary_gradients.transcribe_examples(brain, dataset, ids), rows_of(manifest)
    for uid, row in rows.items():
        hyp, loss = independent_transcript(overrides, out, manifest_rows[uid]["wav"], row["ref"], random_head)
        assert row["hyp"] == hyp and hyp.strip() and not row["empty"], uid
        assert row["loss"] == pytest.approx(loss, rel=1e-5), uid
        assert row["cer"] == pytest.approx(jiwer.cer(row["ref"], hyp)) and row["cer"] not in (0.0, 1.0), uid
    stats = canary_gradients.transcript_stats(list(rows.values()))
    assert stats["empty"] == 0 and stats["cer_corpus"] == pytest.approx(
        jiwer.cer([r["ref"] for r in rows.values()], [r["hyp"] for r in rows.values()]))


def test_transcript_stats_against_hand_values():
    rows = [{"ref": "abcd", "hyp": "", "cer": 1.0, "empty": True, "loss": math.inf},  # CTC cannot align
            {"ref": "abcd", "hyp": " ", "cer": 1.0, "empty": True, "loss": 9.0},
            {"ref": "abcd", "hyp": "abxd", "cer": 0.25, "empty": False, "loss": 3.0},
            {"ref": "ab", "hyp": "ab", "cer": 0.0, "empty": False, "loss": 1.0}]
    stats = canary_gradients.transcript_stats(rows)
    # medians of (0, 0.25, 1, 1) and of the finite losses (1, 3, 9); corpus: (4 + 4 + 1 + 0) / (4 + 4 + 4 + 2)
    assert stats == {"cer_p50": 0.625, "cer_mean": 0.5625, "cer_corpus": pytest.approx(9 / 14), "empty": 2,
                     "empty_fraction": 0.5, "loss_p50": 3.0}
    table = canary_gradients.markdown(
        canary_gradients.report({"c1": 3.0}, {f"n{i}": 1.0 for i in range(4)}, None, [1],
                                {"canaries": {"c1": rows[2]}, "normal": {f"n{i}": r for i, r in enumerate(rows)}}), [1])
    assert "| normal | 4 | 0.625 | 0.562 | 0.643 | 50% (2) | 3 |" in table
    assert "| canaries | 1 | 0.25 | 0.25 | 0.25 | 0% (0) | 3 |" in table


def test_decoding_is_on_by_default():
    assert canary_gradients.parse_args([YAML]).decode is True
    assert canary_gradients.parse_args(["--no-decode", YAML]).decode is False


def test_normal_utterances_are_a_seeded_draw_without_canaries():
    manifest = type("Manifest", (), {"data_ids": ["a", "canary_01_r1", "b", "canary_02", "c", "d", "e"]})
    draw = canary_gradients.draw_normal(manifest, 3, 7, {"canary_01", "canary_02"})
    assert len(draw) == 3 and set(draw) <= set("abcde")
    assert draw == canary_gradients.draw_normal(manifest, 3, 7, {"canary_01", "canary_02"})  # the seed decides
    assert sorted(draw, key="abcde".index) == draw  # in manifest order
    assert canary_gradients.draw_normal(manifest, 10, 7, {"canary_01", "canary_02"}) == list("abcde")


def test_a_folder_without_checkpoint_is_refused(trained, tmp_path, capsys):
    data, _, _ = trained
    empty = tmp_path / "untrained"
    empty.mkdir()
    report = tmp_path / "r.json"
    status = canary_gradients.main(["--json", str(report), YAML, "--", *recipe_argv(data, empty)[2:]])
    lines = stderr_lines(capsys)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("privasr-canary-gradients: error: no trained model: no checkpoint in"), lines
    assert not report.exists() and list(empty.iterdir()) == []


@pytest.mark.parametrize("options, fragment", [
    (["--canaries", "MISSING"], "MISSING"),
    (["--normal", "0"], "argument --normal: expected an integer >= 1"),
    (["--per-core", "0"], "argument --per-core"),
])
def test_bad_input_is_one_line_and_writes_nothing(options, fragment, trained, tmp_path, capsys):
    _, _, overrides = trained
    options = [str(tmp_path / "nowhere.csv") if o == "MISSING" else o for o in options]
    fragment = str(tmp_path / "nowhere.csv") if fragment == "MISSING" else fragment
    report = tmp_path / "r.json"
    status = canary_gradients.main([*options, "--json", str(report), YAML, "--", *overrides])
    lines = stderr_lines(capsys)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("privasr-canary-gradients: error: ") and fragment in lines[0], lines
    assert not report.exists()


def test_canaries_ctc_cannot_align_are_counted_apart_and_all_of_them_refused():
    """A zero norm (CTC's infinite loss, zeroed: too many characters for the frames) is no gradient at all:
    counted in its own column and left out of r; canaries that are all like that are refused in one line."""
    from privasr.cli.canary_gradients import markdown, report
    from privasr.errors import UserError

    result = report({"c1": 0.0, "c2": 3.0, "c3": 3.0}, {"n1": 1.0, "n2": 2.0, "n3": 1.5}, None, [1])
    assert result["canaries"]["zero"] == 1 and result["canaries"]["n"] == 3
    assert result["canaries"]["r_median"] == pytest.approx(3.0 / 1.5)
    assert "| canaries | 3 | 0 | 1 |" in markdown(result, [1])
    with pytest.raises(UserError, match="of 2: 0 non-finite, 2 zero.*CTC cannot align them"):
        report({"c1": 0.0, "c2": 0.0}, {"n1": 1.0}, None, [1])
