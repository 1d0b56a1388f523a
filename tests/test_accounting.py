"""privasr.accounting against Google's independent dp_accounting, and the CLI."""
import json
import math
import subprocess
import sys

import dp_accounting
import pytest

from privasr.accounting import PrivacyLedger, epsilon, max_steps_within, noise_multiplier_for, steps_per_epoch

# (q, sigma, T, delta): CIFAR-like, the paper's small delta, a large-T long run, full batch.
CASES = [
    (0.01, 1.1, 1000, 1e-5),
    (0.001, 0.8, 10000, 1e-9),
    (0.05, 2.0, 500, 1e-6),
    (0.004, 1.0, 25000, 7.9e-11),
    (1.0, 5.0, 10, 1e-5),
]


def google_rdp_epsilon(q, sigma, steps, delta):
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acct.get_epsilon(delta)


@pytest.mark.parametrize("q,sigma,steps,delta", CASES)
def test_rdp_epsilon_matches_dp_accounting(q, sigma, steps, delta):
    ours, theirs = epsilon(q, sigma, steps, delta), google_rdp_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize("q,sigma,steps,delta", CASES[:3])
def test_prv_epsilon_matches_dp_accounting_pld(q, sigma, steps, delta):
    """Opacus's PRV accountant against Google's privacy-loss-distribution accountant (both near-exact)."""
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert epsilon(q, sigma, steps, delta, accountant="prv") == pytest.approx(pld.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize("q,sigma,steps,delta", CASES[:3])
def test_prv_is_tighter_than_rdp_but_close(q, sigma, steps, delta):
    rdp, prv = epsilon(q, sigma, steps, delta), epsilon(q, sigma, steps, delta, accountant="prv")
    assert 0.5 * rdp < prv <= rdp * 1.001


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_for_round_trips(accountant):
    sigma = noise_multiplier_for(3.0, 0.01, 2000, 1e-6, accountant)
    eps = epsilon(0.01, sigma, 2000, 1e-6, accountant)
    assert 3.0 - 0.011 <= eps <= 3.0
    assert epsilon(0.01, 0.98 * sigma, 2000, 1e-6, accountant) > eps


def test_edge_values():
    assert epsilon(0.01, 1.0, 0, 1e-5) == 0.0
    assert math.isinf(epsilon(0.01, 0.0, 10, 1e-5))
    assert steps_per_epoch(0.003) == 333 and steps_per_epoch(1.0) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(sample_rate=0.0), "sample_rate"), (dict(sample_rate=1.5), "sample_rate"),
    (dict(delta=1.0), "delta"), (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"), (dict(accountant="gdp"), "accountant"),
])
def test_bad_arguments_name_what_is_accepted(kwargs, match):
    args = dict(sample_rate=0.01, noise_multiplier=1.0, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=match):
        epsilon(**args)


def test_ledger_merges_steps_and_matches_one_shot():
    ledger = PrivacyLedger(delta=1e-5)
    for _ in range(300):
        ledger.step(noise_multiplier=1.1, sample_rate=0.01)
    ledger.step(noise_multiplier=1.1, sample_rate=0.01, steps=700)
    assert ledger.history == [(1.1, 0.01, 1000)] and ledger.steps == 1000
    assert ledger.epsilon() == pytest.approx(epsilon(0.01, 1.1, 1000, 1e-5))


def test_ledger_heterogeneous_history_matches_dp_accounting():
    ledger = PrivacyLedger(delta=1e-6)
    ledger.step(2.0, 0.01, steps=200)
    ledger.step(1.0, 0.02, steps=100)
    google = dp_accounting.rdp.RdpAccountant()
    google.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(2.0)), 200)
    google.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert ledger.epsilon() == pytest.approx(google.get_epsilon(1e-6), rel=0.01)


def test_ledger_resume_never_undercounts(tmp_path):
    run = PrivacyLedger(delta=1e-5, target_epsilon=4.0)
    run.step(1.0, 0.01, steps=500)
    run.save(tmp_path / "ledger.json")
    json.loads((tmp_path / "ledger.json").read_text())  # plain JSON
    resumed = PrivacyLedger(delta=1e-5, target_epsilon=4.0)
    resumed.load(tmp_path / "ledger.json", end_of_epoch=True)
    resumed.step(1.0, 0.01, steps=500)
    assert resumed.steps == 1000
    assert resumed.epsilon() == pytest.approx(epsilon(0.01, 1.0, 1000, 1e-5))
    copy = PrivacyLedger(delta=1e-5)
    copy.load_state_dict(resumed.state_dict())
    assert copy.history == resumed.history


def test_ledger_would_exceed_next_epoch():
    ledger = PrivacyLedger(delta=1e-5, target_epsilon=2.0)
    ledger.step(1.1, 0.01, steps=1000)  # eps ~ 1.71; one more epoch (100 steps) ~ 1.80
    assert not ledger.would_exceed(1.1, 0.01)
    assert ledger.would_exceed(1.1, 0.01, steps=1000)
    assert ledger.epsilon_after(1.1, 0.01, 100) > ledger.epsilon()
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyLedger(delta=1e-5).would_exceed(1.1, 0.01)
    with pytest.raises(ValueError, match="history"):
        ledger.load_state_dict({"steps": 3})


def cli(*args):
    cmd = [sys.executable, "-m", "privasr.cli.accountant", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def clis(*commands):
    """:func:`cli` for each ARGS tuple, the processes side by side (each pays the interpreter's and Opacus's
    start-up): their CompletedProcess in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "privasr.cli.accountant", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    try:
        outputs = [proc.communicate(timeout=60) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *out) for proc, out in zip(procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_cli_prints_epsilon_and_sigma():
    out, target = clis(("--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5"),
                       ("-q", "0.01", "--target-epsilon", "2", "--steps", "1000", "--delta", "1e-5", "--accountant", "prv"))
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(epsilon(0.01, 1.1, 1000, 1e-5), rel=1e-5)
    out = target
    assert out.returncode == 0, out.stderr
    assert epsilon(0.01, float(out.stdout), 1000, 1e-5, "prv") <= 2.0 + 1e-3


@pytest.mark.parametrize("args", [
    ["-q", "1.5", "-s", "1", "--steps", "10", "--delta", "1e-5"],           # library ValueError
    ["-q", "abc", "-s", "1", "--steps", "10", "--delta", "1e-5"],           # argparse type error
    ["-q", "0.1", "--steps", "10", "--delta", "1e-5"],                      # neither sigma nor target
    ["-q", "0.1", "-s", "1", "--target-epsilon", "1", "--steps", "10", "--delta", "1e-5"],  # both
])
def test_cli_bad_input_is_one_line_exit_2(args):
    out = cli(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "error" in out.stderr
    assert "Traceback" not in out.stderr


def test_max_steps_within_matches_a_linear_search():
    sigma, q = 1.3, 0.1
    ledger = PrivacyLedger(1e-5)
    ledger.step(sigma, q, 5)
    target = ledger.epsilon_after(sigma, q, 12) + 1e-9
    linear = next(t for t in range(40) if ledger.epsilon_after(sigma, q, t + 1) > target)
    assert max_steps_within(ledger, sigma, q, target) == linear == 12
    assert max_steps_within(ledger, 0.0, q, 1.0) == 0  # sigma = 0: not even one step fits
    assert max_steps_within(PrivacyLedger(1e-5), 50.0, q, 1e3, limit=64) == 64  # capped at the limit
