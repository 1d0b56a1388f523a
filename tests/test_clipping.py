"""The reference clip_and_aggregate against hand-computed values and its edge cases."""
import math

import pytest
import torch

from privasr.clipping import aggregate, clip_and_aggregate, clip_factors
from privasr.distributed import CoreAccumulator


def cores(*vectors):
    """One parameter per core, given as plain lists."""
    return [[torch.tensor(v, dtype=torch.float64)] for v in vectors]


# Cores with norms 5, 1 and 2 (3-4-5 triangle, unit, (0, 2)).
THREE = cores([3.0, 4.0], [1.0, 0.0], [0.0, 2.0])


def test_none_is_the_mean():
    (g,) = clip_and_aggregate(THREE, "none")
    assert torch.allclose(g, torch.tensor([4 / 3, 6 / 3], dtype=torch.float64))


def test_pcc_by_hand():
    # b = 2: core 0 scaled by 2/5, cores 1 and 2 untouched.
    (g,) = clip_and_aggregate(THREE, "pcc", bound=2.0)
    expected = (torch.tensor([1.2, 1.6]) + torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 2.0])) / 3
    assert torch.allclose(g, expected.double())


def test_apcc_by_hand():
    # b_t = 1 (the smallest norm): every core rescaled to norm 1.
    (g,) = clip_and_aggregate(THREE, "apcc")
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0])) / 3
    assert torch.allclose(g, expected.double())


def test_global_clips_the_mean_over_all_parameters():
    two_params = [[torch.tensor([3.0]), torch.tensor([4.0])], [torch.tensor([3.0]), torch.tensor([4.0])]]
    g = clip_and_aggregate(two_params, "global", bound=1.0)
    # The mean is (3, 4), norm 5 over BOTH parameters, clipped to norm 1.
    assert torch.allclose(torch.cat(g), torch.tensor([0.6, 0.8]))


def test_sum_is_cores_times_mean():
    for method, bound in [("none", None), ("pcc", 1.5), ("apcc", None), ("global", 2.0)]:
        mean = clip_and_aggregate(THREE, method, bound, "mean")[0]
        total = clip_and_aggregate(THREE, method, bound, "sum")[0]
        if method == "global":  # global clips the aggregate itself, so only the direction matches
            assert torch.allclose(total / total.norm(), mean / mean.norm())
        else:
            assert torch.allclose(total, 3 * mean)


def test_apcc_leaves_every_core_at_the_bound():
    torch.manual_seed(0)
    grads = [[torch.randn(5, 3), torch.randn(7)] for _ in range(6)]
    factors, b_t = clip_factors(torch.tensor([math.sqrt(sum(float(g.pow(2).sum()) for g in c)) for c in grads]),
                                "apcc", None)
    for core, f in zip(grads, factors):
        clipped_norm = math.sqrt(sum(float((f * g).pow(2).sum()) for g in core))
        assert clipped_norm == pytest.approx(b_t, rel=1e-6)  # float32 gradients


def test_pcc_with_one_core_changes_only_the_step_length():
    torch.manual_seed(1)
    grads = [[torch.randn(4, 4), torch.randn(4)]]
    raw = clip_and_aggregate(grads, "none")
    clipped = clip_and_aggregate(grads, "pcc", bound=0.1)
    flat_raw, flat_clipped = torch.cat([g.flatten() for g in raw]), torch.cat([g.flatten() for g in clipped])
    assert flat_clipped.norm() == pytest.approx(0.1, rel=1e-6)
    assert torch.allclose(flat_clipped / flat_clipped.norm(), flat_raw / flat_raw.norm(), atol=1e-6)


def test_zero_norm_core_contributes_zero_and_does_not_set_apcc_bound():
    grads = cores([3.0, 4.0], [0.0, 0.0], [0.0, 2.0])
    g, stats = aggregate(grads, "apcc")
    assert stats.bound == pytest.approx(2.0)
    expected = (torch.tensor([1.2, 1.6]) + torch.tensor([0.0, 2.0])) / 3  # the zero core still counts in the mean
    assert torch.allclose(g[0], expected.double())
    g, stats = aggregate(grads, "pcc", bound=1.0)
    assert torch.isfinite(g[0]).all()


def test_nan_core_is_dropped_and_mean_is_over_the_rest():
    grads = cores([3.0, 4.0], [float("nan"), 1.0], [0.0, 2.0])
    for method, bound in [("none", None), ("pcc", 2.0), ("apcc", None), ("global", 100.0)]:
        g, stats = aggregate(grads, method, bound)
        assert stats.dropped == [1] and not stats.skipped
        assert torch.isfinite(g[0]).all()
        clean = clip_and_aggregate(cores([3.0, 4.0], [0.0, 2.0]), method, bound)
        assert torch.allclose(g[0], clean[0])


def test_inf_core_is_dropped():
    grads = cores([3.0, 4.0], [float("inf"), 1.0])
    g, stats = aggregate(grads, "pcc", 1.0)
    assert stats.dropped == [1]
    assert torch.allclose(g[0], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_all_cores_nan_skips_the_step():
    grads = cores([float("nan"), 0.0], [0.0, float("inf")])
    g, stats = aggregate(grads, "apcc")
    assert stats.skipped and stats.dropped == [0, 1]
    assert torch.equal(g[0], torch.zeros(2, dtype=torch.float64))


def test_parameters_without_gradient_stay_none_and_unused_on_some_cores_count_as_zero():
    grads = [[torch.tensor([2.0]), None, torch.tensor([1.0])], [torch.tensor([4.0]), None, None]]
    g = clip_and_aggregate(grads, "none")
    assert g[1] is None
    assert torch.allclose(g[0], torch.tensor([3.0])) and torch.allclose(g[2], torch.tensor([0.5]))


def test_several_parameter_groups_share_one_norm():
    # A core's norm runs over every parameter, whatever optimizer group it sits in.
    grads = [[torch.tensor([3.0]), torch.tensor([4.0])]]
    g = clip_and_aggregate(grads, "pcc", bound=1.0)
    assert torch.allclose(torch.cat(g), torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="bogus"), "accepted: none, global, pcc, apcc"),
        (dict(method="pcc"), "needs a clipping bound"),
        (dict(method="pcc", bound=0.0), "positive"),
        (dict(method="global", bound=-1.0), "positive"),
        (dict(method="none", reduction="median"), "accepted: mean, sum"),
    ],
)
def test_bad_arguments_name_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        clip_and_aggregate(THREE, **kwargs)


def test_mismatched_cores_are_refused():
    with pytest.raises(ValueError, match="shape"):
        clip_and_aggregate([[torch.zeros(2)], [torch.zeros(3)]], "none")
    with pytest.raises(ValueError, match="same parameters"):
        clip_and_aggregate([[torch.zeros(2)], [torch.zeros(2), torch.zeros(1)]], "none")
    with pytest.raises(ValueError, match="empty"):
        clip_and_aggregate([], "none")


@pytest.mark.parametrize("method, bound", [("none", None), ("global", 0.5), ("pcc", 0.7), ("apcc", None)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulator_matches_reference_with_faults(method, bound, reduction):
    """The one-buffer fast path equals the reference, NaN and zero cores included."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))]
    per_core = [[torch.randn(3, 2), torch.randn(4), None] for _ in range(5)]
    per_core[1] = [torch.zeros(3, 2), torch.zeros(4), None]
    per_core[3][0][0, 0] = float("nan")
    reference, ref_stats = aggregate(per_core, method, bound, reduction)
    acc = CoreAccumulator(params, method, bound, reduction)
    acc.add_cores([torch.stack([c[0] for c in per_core[:2]]), torch.stack([c[1] for c in per_core[:2]]), None])
    for core in per_core[2:]:
        acc.add_core(core)
    fast, stats = acc.reduce()
    assert fast[2] is None and reference[2] is None
    for a, b in zip(fast[:2], reference[:2]):
        assert torch.allclose(a, b.float(), rtol=1e-5, atol=1e-7)
    assert stats.dropped == ref_stats.dropped == [3]
    assert torch.allclose(stats.factors, ref_stats.factors)
