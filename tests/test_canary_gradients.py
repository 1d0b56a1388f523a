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


def independent_norm(overrides: list[str], out, wav: str, words: str) -> float:
    """The gradient norm of one utterance alone: the model built from the YAML, the checkpoint's weights
    loaded by hand, evaluation mode (no dropout, no SpecAugment), plain ``torch.autograd.grad``."""
    import soundfile

    from privasr.cli.hparams import load_hparams, parse_arguments

    hparams_file, _, yaml_overrides = parse_arguments([YAML, *overrides])
    hparams = load_hparams(hparams_file, yaml_overrides)
    model = hparams["model"]
    (checkpoint,) = sorted((out / "save").glob("CKPT*"))
    model.load_state_dict(torch.load(checkpoint / "model.ckpt"))
    model.eval()
    signal, _ = soundfile.read(wav, dtype="float32")
    feats, feat_lens = model.features(torch.from_numpy(signal)[None], torch.ones(1))
    log_probs, out_lens = model.forward_features(feats, feat_lens)
    tokens = hparams["tokenizer"].encode_as_tensor(words)[None]
    loss = model.loss(log_probs, out_lens, tokens, torch.ones(1), reduction="mean")  # the YAML's loss_reduction
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


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
