"""The exactness table per layer type (privasr.ghost.report): ghost against vmap on privasr's own models."""
import pytest

from privasr.ghost import report

RTOL = 1e-5  # the target: ghost norms and clipped sums equal vmap's to 1e-5 relative, fp32

#: Every layer type of the Conformer-CTC and BEST-RQ (tiny, padded batches). A new layer type in either model
#: (a new label, or a parameter falling back) fails test_every_parameter_of_the_models_is_under_a_known_layer_type.
MODEL_TYPES = {
    "Linear weight, ghost form", "Linear weight, materialized", "Linear bias",
    "Linear (time-first) weight, ghost form", "Linear (time-first) bias",
    "Linear (input shared by the batch) weight, ghost form", "Linear (input shared by the batch) weight, materialized",
    "Conv1d pointwise weight, ghost form", "Conv1d pointwise bias",
    "Conv1d depthwise weight, materialized", "Conv1d depthwise bias",
    "Conv2d weight, materialized", "Conv2d bias",
    "LayerNorm weight", "LayerNorm bias",
    "parameter broadcast-added to the batch",
}


@pytest.fixture(scope="module")
def model_rows():
    """Conformer-CTC at 1.2 s (linear_pos in the ghost form) and BEST-RQ at 1.5 s (materialized: 75^2 > 64^2)."""
    ctc, ctc_whole = report.run(["ctc"], seconds=1.2)
    bestrq, bestrq_whole = report.run(["bestrq"], seconds=1.5)
    return ctc + bestrq, {**ctc_whole, **bestrq_whole}


def test_ghost_equals_vmap_to_1e5_on_every_layer_type_of_the_models(model_rows):
    rows, whole = model_rows
    table = report.by_layer_type(rows)
    assert {e["kind"] for e in table} == MODEL_TYPES  # every type, both forms of Linear, measured
    for entry in table:
        assert entry["norm_error"] <= RTOL and entry["sum_error"] <= RTOL, entry
    assert set(whole) == {"Conformer-CTC", "BEST-RQ"} and max(whole.values()) <= RTOL
    assert any(r.sum_error > 0 for r in rows)  # a real comparison, not the same numbers twice


def test_every_parameter_of_the_models_is_under_a_known_layer_type(model_rows):
    """Each trainable parameter is in the table exactly once, none falls back, none has an unlisted type."""
    from privasr.ghost.report import CASES

    rows, _ = model_rows
    for title, build in (("Conformer-CTC", CASES["ctc"][1]), ("BEST-RQ", CASES["bestrq"][1])):
        model, _, _ = build(type("Args", (), {"size": "tiny", "seconds": 1.0}))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert sorted(r.name for r in rows if r.case == title) == sorted(names)
    assert {r.kind for r in rows} <= MODEL_TYPES and not report.fallbacks(rows)


def test_patterns_fall_back_with_their_reason_and_stay_exact():
    rows, whole = report.run(["patterns"])
    kinds = {r.name: r.kind for r in rows}
    assert kinds["grouped.weight"] == "Conv1d grouped weight, ghost form"
    assert kinds["conv2d.weight"] == "Conv2d weight, ghost form"
    assert kinds["twice.weight"] == "Linear weight, ghost form"  # two calls: the norm of the summed gradient
    assert report.fallbacks(rows) == [("patterns (toy)", "scale", "used by mul"),
                                      ("patterns (toy)", "read.weight", "used by sum")]
    assert all(r.norm_error <= RTOL and r.sum_error <= RTOL for r in rows) and whole["patterns (toy)"] <= RTOL
    table = report.markdown(rows, whole)
    assert "| Conv1d grouped weight, ghost form | 1 (54) | `grouped.weight` |" in table
    assert "- patterns (toy): `scale` (used by mul)" in table


def test_the_command_prints_the_table_and_refuses_an_unknown_case(capsys):
    assert report.main(["--cases", "patterns"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| layer type | parameters (elements) |") and "Falls back to exact vmap" in out
    assert report.main(["--cases", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
