"""SpeechBrain's run options: honoured on the aggregated update, or refused with one line.

PrivateBrain's step bypasses ``sb.Brain.optimizers_step``; ``max_grad_norm`` and
``skip_nonfinite_grads`` are re-implemented on the aggregated update (checked here by hand
against :func:`privasr.clipping.clip_and_aggregate` of the per-core gradients), ``bf16``
runs on CPU, and what cannot be composed with per-core clipping (``fp16``, DataParallel,
compile/jit, ...) is refused before anything is built or written.
"""
import runpy

import pytest
import torch

from privasr.brain import UnsupportedRunOption, check_run_options, run_option
from privasr.clipping import clip_and_aggregate
from privasr.cli import run_cli
from privasr.cli.hparams import RECIPE_ERRORS, parse_arguments

from .fault_injection import HAVE_TTS, RECIPE, quick_corpus, recipe_argv
from .toy import fit_toy_brain, make_toy_brain, mse_loss_fn, toy_batch, toy_model

LR = 0.1


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def hparams(method="pcc", bound=5.0, virtual_cores=4, mode="loop", **extra):
    return dict(clipping=method, clip_bound=bound, virtual_cores=virtual_cores, core_grad_mode=mode, **extra)


def per_core_grads(model, x, y, cores):
    """Each core's mean gradient, by plain autograd (independent of privasr.per_sample)."""
    out = []
    for cx, cy in zip(x.chunk(cores), y.chunk(cores)):
        model.zero_grad()
        mse_loss_fn(model)(cx, cy).backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


def reference_with_max_norm(method, bound, max_norm, steps=2):
    """SGD on the aggregate scaled by min(1, m / ||aggregate||); returns final params and each step's update norm."""
    model = toy_model()
    x, y = toy_batch(n=8 * steps)
    update_norms = []
    for s in range(steps):
        agg = clip_and_aggregate(per_core_grads(model, x[8 * s: 8 * s + 8], y[8 * s: 8 * s + 8], 4), method, bound)
        norm = float(torch.cat([g.flatten() for g in agg]).norm())  # by hand, not privasr's core_norm
        factor = min(1.0, max_norm / norm) if max_norm is not None and max_norm > 0 else 1.0
        with torch.no_grad():
            for p, g in zip(model.parameters(), agg):
                p -= LR * factor * g
        update_norms.append(factor * norm)
    return flat(model.parameters()), update_norms


def batches(steps=2):
    x, y = toy_batch(n=8 * steps)
    return [(x[i: i + 8], y[i: i + 8]) for i in range(0, 8 * steps, 8)]


# -- max_grad_norm ------------------------------------------------------------------------
class RecordingSGD(torch.optim.SGD):
    """SGD that records the norm of the update it is given (all groups, float64) at every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.update_norms = []

    def step(self, closure=None):
        grads = [p.grad.to(torch.float64).flatten() for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        self.update_norms.append(float(torch.cat(grads).norm()))
        return super().step(closure)


@pytest.mark.parametrize("method, bound", [("none", None), ("pcc", 5.0), ("apcc", None)])
@pytest.mark.parametrize("max_norm", [1e-4, 0.5])
def test_max_grad_norm_bounds_the_aggregated_update(method, bound, max_norm):
    brain = make_toy_brain(hparams(method, bound), lr=LR, run_opts={"max_grad_norm": max_norm})
    brain.opt_class = lambda params: RecordingSGD(params, LR)
    got = fit_toy_brain(brain, batches())
    expected, update_norms = reference_with_max_norm(method, bound, max_norm)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    unclipped, _ = reference_with_max_norm(method, bound, None)
    assert not torch.allclose(got, unclipped, rtol=1e-3)  # the bound acted (measured: no effect before)
    assert update_norms == pytest.approx([max_norm] * 2, rel=1e-9)  # the reference did clip both steps
    assert brain.optimizer.update_norms == pytest.approx([max_norm] * 2, rel=1e-5)
    assert brain.last_update_factor < 1.0


@pytest.mark.parametrize("max_norm", [1e6, -1.0, 0.0])
def test_max_grad_norm_that_never_binds_or_is_off_leaves_the_update(max_norm):
    brain = make_toy_brain(hparams(), lr=LR, run_opts={"max_grad_norm": max_norm})
    assert torch.allclose(fit_toy_brain(brain, batches()), reference_with_max_norm("pcc", 5.0, None)[0],
                          rtol=1e-5, atol=1e-7)
    assert brain.last_update_factor == 1.0


def test_max_grad_norm_default_is_not_applied_but_a_given_value_is(tmp_path):
    """SpeechBrain's implicit 5.0 would add global clipping to every run; only a given value clips."""
    assert make_toy_brain(hparams()).update_max_norm is None
    assert make_toy_brain(hparams(max_grad_norm=2.0)).update_max_norm == 2.0  # a YAML key
    yaml = tmp_path / "h.yaml"
    yaml.write_text("x: 1\n")
    _, defaults, _ = parse_arguments([str(yaml)])
    _, given, _ = parse_arguments([str(yaml), "--max_grad_norm", "1e-4"])
    assert run_option("max_grad_norm", defaults) == (5.0, False)
    assert run_option("max_grad_norm", given) == (1e-4, True)
    assert run_option("max_grad_norm", given, {"max_grad_norm": 3.0}) == (1e-4, True)  # command line wins
    assert run_option("max_grad_norm", defaults, {"max_grad_norm": 3.0}) == (3.0, True)


def test_max_grad_norm_composes_with_global_clipping():
    """global clips the aggregate at b, then max_grad_norm at m: the update norm is min(b, m, ||g||)."""
    brain = make_toy_brain(hparams("global", 1.0), lr=LR, run_opts={"max_grad_norm": 0.25})
    got = fit_toy_brain(brain, batches(1))
    start = flat(toy_model().parameters())
    assert float((got - start).norm()) / LR == pytest.approx(0.25, rel=1e-4)
    assert brain.last_stats.global_factor < 1.0 and brain.last_update_factor == pytest.approx(0.25)


# -- skip_nonfinite_grads -------------------------------------------------------------------
def poison_first_parameter(brain):
    """The aggregated gradient of the first parameter gets an Inf (every core stays finite)."""
    new_accumulator = brain._new_accumulator

    def poisoned():
        accumulator = new_accumulator()
        reduce = accumulator.reduce

        def reduce_with_inf(group=None):
            grads, stats = reduce(group)
            grads[0] = grads[0].clone()
            grads[0].view(-1)[0] = float("inf")
            return grads, stats

        accumulator.reduce = reduce_with_inf
        return accumulator

    brain._new_accumulator = poisoned


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_skip_nonfinite_grads_leaves_that_parameter_and_updates_the_others(max_norm):
    run_opts = {"skip_nonfinite_grads": True, **({"max_grad_norm": max_norm} if max_norm else {})}
    brain = make_toy_brain(hparams(), lr=LR, run_opts=run_opts)
    poison_first_parameter(brain)
    after = fit_toy_brain(brain, batches(1))
    # reference: the aggregate without parameter 0, clipped on the norm of the others
    model = toy_model()
    x, y = batches(1)[0]
    agg = clip_and_aggregate(per_core_grads(model, x, y, 4), "pcc", 5.0)[1:]
    norm = float(torch.cat([g.flatten() for g in agg]).norm())
    factor = min(1.0, max_norm / norm) if max_norm else 1.0
    with torch.no_grad():
        for p, g in zip(list(model.parameters())[1:], agg):
            p -= LR * factor * g
    assert torch.allclose(after, flat(model.parameters()), rtol=1e-5, atol=1e-7)
    first = toy_model()[0].weight.numel()  # the poisoned parameter: not updated at all
    assert torch.equal(after[:first], flat(toy_model().parameters())[:first])


def test_without_skip_nonfinite_grads_a_nonfinite_aggregate_reaches_the_model_as_in_speechbrain():
    brain = make_toy_brain(hparams(), lr=LR)
    poison_first_parameter(brain)
    assert not torch.isfinite(fit_toy_brain(brain, batches(1))).all()


# -- precision --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_bf16_step_runs_with_finite_clipping_statistics_close_to_fp32(mode):
    brain = make_toy_brain(hparams(mode=mode), lr=LR, run_opts={"precision": "bf16"})
    with brain.training_ctx:  # the step's forward really runs in bf16
        assert brain.modules.model(batches(1)[0][0]).dtype == torch.bfloat16
    got = fit_toy_brain(brain, batches(1))
    stats = brain.last_stats
    assert stats.num_cores == 4 and not stats.dropped and not stats.skipped
    assert torch.isfinite(stats.core_norms).all() and torch.isfinite(stats.factors).all()
    assert (stats.factors < 1).any()  # pcc at 5.0 clipped some core, as in fp32
    assert torch.isfinite(got).all()
    fp32 = fit_toy_brain(make_toy_brain(hparams(mode=mode), lr=LR), batches(1))
    start = flat(toy_model().parameters())
    update, update32 = got - start, fp32 - start
    assert float((update - update32).norm()) < 0.05 * float(update32.norm())  # bf16: ~3 significant digits


@pytest.mark.parametrize("run_opts, fragment", [
    ({"precision": "fp16"}, "--precision fp16 is not supported"),
    ({"auto_mix_prec": True}, "--auto_mix_prec (= --precision fp16) is not supported"),
])
def test_fp16_is_refused_with_bf16_as_the_alternative(run_opts, fragment):
    with pytest.raises(UnsupportedRunOption, match="use --precision bf16") as err:
        make_toy_brain(hparams(), run_opts=run_opts)
    assert fragment in str(err.value) and "GradScaler" in str(err.value)
    assert isinstance(err.value, ValueError)  # what sb.Brain raises for a bad option


# -- the other refusals: one line each, from the command line -------------------------------------
REFUSED = [
    (["--precision", "fp16"], "--precision fp16 is not supported"),
    (["--auto_mix_prec"], "--auto_mix_prec"),
    (["--eval_precision", "fp16", "--device", "cpu"], "--eval_precision fp16 needs a CUDA device"),
    (["--data_parallel_backend"], "--data_parallel_backend is not supported"),
    (["--compile"], "--compile is not supported"),
    (["--compile_module_keys", "model"], "--compile_module_keys is not supported"),
    (["--jit"], "--jit is not supported"),
    (["--jit_module_keys", "model"], "--jit_module_keys is not supported"),
    (["--log_config", "log.yaml"], "--log_config is not supported"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
    (["--grad_accumulation_factor", "0"], "--grad_accumulation_factor must be >= 1"),
    (["--nonfinite_patience", "-1"], "--nonfinite_patience must be >= 0"),
    (["--optimizer_step_limit", "0"], "--optimizer_step_limit must be an integer >= 1"),
    (["--optimizer_step_limit", "2.5"], "--optimizer_step_limit must be an integer >= 1"),
]


@pytest.mark.parametrize("argv, fragment", REFUSED, ids=[a[0] for a, _ in REFUSED])
def test_refused_option_is_one_line_and_exit_2(argv, fragment, tmp_path, capsys):
    """What train.py's main does first: parse, check; a refusal writes nothing."""
    yaml, out = tmp_path / "h.yaml", tmp_path / "out"
    yaml.write_text("x: 1\n")

    def main(args):
        _, run_opts, _ = parse_arguments(args)
        check_run_options(run_opts)
        out.mkdir()

    status = run_cli(main, [str(yaml), *argv], prog="train.py", user_errors=RECIPE_ERRORS)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"train.py: error: {fragment}"), lines
    assert not out.exists()


def test_torchrun_with_nccl_and_no_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UnsupportedRunOption, match="use --distributed_backend gloo on CPU"):
        check_run_options({"distributed_backend": "nccl"})
    check_run_options({"distributed_backend": "gloo"})


def test_honoured_defaults_and_options_pass():
    check_run_options(None)
    check_run_options({"precision": "bf16", "eval_precision": "bf16", "max_grad_norm": -1.0,
                       "skip_nonfinite_grads": True, "grad_accumulation_factor": 2, "optimizer_step_limit": 1,
                       "noprogressbar": True, "tqdm_colored_bar": True, "find_unused_parameters": True})


# -- honoured by SpeechBrain's loop -----------------------------------------------------------
@pytest.mark.parametrize("limit", [1, "1"])  # "1": SpeechBrain's parser gives this option as a string
def test_optimizer_step_limit_stops_after_that_many_steps(limit):
    brain = make_toy_brain(hparams(), lr=LR, run_opts={"optimizer_step_limit": limit})
    got = fit_toy_brain(brain, batches(1) * 2)  # two batches, the second never used
    assert brain.optimizer_step == 1
    assert torch.allclose(got, reference_with_max_norm("pcc", 5.0, None, steps=1)[0], rtol=1e-5, atol=1e-7)


def test_remove_vector_weight_decay_splits_groups_and_clips_them_as_one():
    brain = make_toy_brain(hparams(), lr=LR, run_opts={"remove_vector_weight_decay": True})
    got = fit_toy_brain(brain, batches())
    assert len(brain.optimizer.param_groups) == 2  # biases in their own group
    assert torch.allclose(got, reference_with_max_norm("pcc", 5.0, None)[0], rtol=1e-5, atol=1e-7)


# -- the recipe: refused before anything is written ------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not HAVE_TTS:
        pytest.skip("needs espeak-ng, flite and sox")
    return quick_corpus(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("argv, fragment", [
    (["--precision", "fp16"], "--precision fp16 is not supported"),
    (["--data_parallel_backend"], "--data_parallel_backend is not supported"),
    (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number"),
], ids=["fp16", "data_parallel", "max_grad_norm_inf"])
def test_recipe_refuses_before_writing(argv, fragment, data, tmp_path, capsys):
    recipe_main = runpy.run_path(str(RECIPE / "train.py"))["main"]
    out = tmp_path / "exp"
    status = run_cli(recipe_main, recipe_argv(data, out)[1:] + argv, prog="train.py", user_errors=RECIPE_ERRORS)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"train.py: error: {fragment}"), lines
    assert not out.exists(), "a refused run must write nothing"
