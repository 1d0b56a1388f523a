r"""Privacy accounting for DP-SGD with Poisson sampling: a thin wrapper over Opacus.

One DP-SGD step with Poisson sampling rate :math:`q`, clipping bound :math:`C` and
Gaussian noise of standard deviation :math:`\sigma C` on the summed clipped gradient is
the *sampled Gaussian mechanism* :math:`\mathcal{M}_{q,\sigma}`. A run is the adaptive
composition of its steps; its history is a list of ``(sigma, q, steps)`` segments and
its privacy loss is that of

.. math::

    \mathcal{M} = \bigotimes_{i} \mathcal{M}_{q_i,\sigma_i}^{\otimes T_i},

reported as the smallest :math:`\varepsilon` such that :math:`\mathcal{M}` is
:math:`(\varepsilon, \delta)`-DP (add/remove-one neighbouring relation).

Two accountants are offered, both Opacus's, never re-implemented here:

* ``"rdp"`` -- Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019) with the
  RDP→(ε, δ) conversion of Balle et al. 2020. An upper bound; the paper's
  "updated moments accountant".
* ``"prv"`` -- numerical composition of privacy loss random variables (Gopi, Lee,
  Wutschitz 2021). Tighter; returns the upper end of its error interval.

The number of steps of one epoch with Poisson rate :math:`q` is :math:`\mathrm{round}(1/q)`
(see :mod:`privasr.dp.poisson`).
"""
from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

ACCOUNTANTS = ("rdp", "prv")

#: Opacus's default orders extended with large ones (as in Google's dp_accounting),
#: so that small δ (the paper uses 1e-9 and below) never hits the edge of the grid.
RDP_ORDERS: Tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS) + (128, 256, 512, 1024)

#: One segment of a privacy history: (noise multiplier σ, sample rate q, steps T).
Segment = Tuple[float, float, int]


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_segment(noise_multiplier: float, sample_rate: float, steps: int) -> Segment:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return float(noise_multiplier), float(sample_rate), int(steps)


@contextmanager
def _quiet():
    """Silence the numerical chatter of the analyses (edge-of-grid and log(0) warnings)."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        yield


def _opacus_epsilon(history: Sequence[Segment], delta: float, accountant: str) -> float:
    """ε of a whole history with one Opacus accountant; 0 for an empty history, ∞ with σ=0."""
    history = [seg for seg in history if seg[2] > 0]
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    acct = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acct.history = [tuple(seg) for seg in history]
    with _quiet():
        if accountant == "rdp":
            return float(acct.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
        return float(acct.get_epsilon(delta=delta))


def epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    r"""ε spent by ``steps`` DP-SGD steps of Poisson rate ``sample_rate`` and noise ``σ``.

    Args:
        sample_rate: Poisson inclusion probability :math:`q \in (0, 1]`.
        noise_multiplier: :math:`\sigma \ge 0`, noise std in units of the clipping bound.
        steps: number of steps :math:`T \ge 0`.
        delta: target :math:`\delta \in (0, 1)`.
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        :math:`\varepsilon` (0 for ``steps == 0``, ``inf`` for ``σ == 0``).
    """
    segment = _check_segment(noise_multiplier, sample_rate, steps)
    return _opacus_epsilon([segment], _check_delta(delta), _check_accountant(accountant))


def noise_multiplier_for(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    r"""Smallest σ (up to a bisection tolerance) with ``epsilon(q, σ, T, δ) <= target_epsilon``.

    Opacus's :func:`~opacus.accountants.utils.get_noise_multiplier` bisects σ until
    :math:`\varepsilon(\sigma) \in [\varepsilon^* - \text{tol}, \varepsilon^*]`, so the
    returned σ never overshoots the budget.
    """
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not epsilon_tolerance > 0.0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    _, q, steps = _check_segment(1.0, sample_rate, steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier, got 0")
    kwargs = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
    with _quiet():
        return float(
            get_noise_multiplier(
                target_epsilon=float(target_epsilon),
                target_delta=_check_delta(delta),
                sample_rate=q,
                steps=steps,
                accountant=_check_accountant(accountant),
                epsilon_tolerance=epsilon_tolerance,
                **kwargs,
            )
        )


def steps_per_epoch(sample_rate: float) -> int:
    r"""Steps of one Poisson epoch, :math:`\mathrm{round}(1/q)` (at least 1)."""
    _check_segment(0.0, sample_rate, 0)
    return max(1, round(1.0 / sample_rate))


@register_checkpoint_hooks
class PrivacyLedger:
    """The privacy spent by one training run, safe across resumes.

    Records every DP step as ``(σ, q)``; consecutive identical steps are merged into one
    ``(σ, q, T)`` segment. ε is always recomputed from the *whole* history, so a resumed
    run that restores the ledger (``load_state_dict``, or SpeechBrain's ``Checkpointer``
    via the registered hooks) never under-counts what the interrupted run spent.

    Args:
        delta: the δ at which ε is reported.
        accountant: ``"rdp"`` or ``"prv"``.
        target_epsilon: optional budget checked by :meth:`would_exceed`.

    Example:
        >>> ledger = PrivacyLedger(delta=1e-5, target_epsilon=8.0)
        >>> ledger.step(noise_multiplier=1.1, sample_rate=0.01, steps=100)
        >>> ledger.steps, round(ledger.epsilon(), 2) > 0
        (100, True)
    """

    def __init__(
        self,
        delta: float,
        accountant: str = "rdp",
        target_epsilon: Optional[float] = None,
    ):
        self.delta = _check_delta(delta)
        self.accountant = _check_accountant(accountant)
        if target_epsilon is not None and not target_epsilon > 0.0:
            raise ValueError(f"target_epsilon must be > 0 or None, got {target_epsilon!r}")
        self.target_epsilon = target_epsilon
        self._history: List[Segment] = []

    # -- recording -----------------------------------------------------------------
    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP steps with noise ``σ`` and Poisson rate ``q``."""
        sigma, q, steps = _check_segment(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + steps)
        else:
            self._history.append((sigma, q, steps))

    @property
    def history(self) -> List[Segment]:
        """A copy of the ``(σ, q, T)`` segments, oldest first."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total DP steps recorded."""
        return sum(seg[2] for seg in self._history)

    # -- queries -------------------------------------------------------------------
    def epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (default: the ledger's δ)."""
        delta = self.delta if delta is None else _check_delta(delta)
        return _opacus_epsilon(self._history, delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the run would have spent after ``steps`` more steps of ``(σ, q)``."""
        extra = _check_segment(noise_multiplier, sample_rate, steps)
        return _opacus_epsilon(self._history + [extra], self.delta, self.accountant)

    def would_exceed(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: Optional[int] = None,
        target_epsilon: Optional[float] = None,
    ) -> bool:
        """Whether ``steps`` more steps (default: one epoch, round(1/q)) would exceed the budget.

        Args:
            target_epsilon: budget to check against; defaults to the ledger's.
        """
        target = self.target_epsilon if target_epsilon is None else target_epsilon
        if target is None:
            raise ValueError("would_exceed needs a target_epsilon (ledger has none), got None")
        steps = steps_per_epoch(sample_rate) if steps is None else steps
        return self.epsilon_after(noise_multiplier, sample_rate, steps) > target

    # -- persistence ---------------------------------------------------------------
    def state_dict(self) -> Dict:
        """A JSON-serialisable dict: history, δ, accountant, target ε."""
        return {
            "history": [list(seg) for seg in self._history],
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore the recorded history (replacing the current one).

        δ, accountant and target ε keep the values given to the constructor: they say how
        the history is *measured*, while the history is the fact being restored.
        """
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError("state must be a dict with a 'history' list of [sigma, q, steps]")
        history = []
        for seg in state["history"]:
            if len(seg) != 3:
                raise ValueError(f"history entries must be [sigma, q, steps], got {seg!r}")
            history.append(_check_segment(*seg))
        self._history = history

    @mark_as_saver
    def save(self, path) -> None:
        """Write :meth:`state_dict` as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.state_dict(), f, indent=2)

    @mark_as_loader
    def load(self, path, end_of_epoch: bool = False) -> None:
        """Read a ledger saved by :meth:`save` (``end_of_epoch`` is ignored)."""
        with open(path, encoding="utf-8") as f:
            self.load_state_dict(json.load(f))

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(steps={self.steps}, epsilon={self.epsilon():.4g}, "
            f"delta={self.delta:g}, accountant={self.accountant!r})"
        )


def max_steps_within(ledger: PrivacyLedger, noise_multiplier: float, sample_rate: float,
                     target_epsilon: float, limit: int = 10**9) -> int:
    r"""The largest :math:`T` with :math:`\varepsilon(\text{history} + T \text{ steps}) \le \varepsilon^*`.

    Exponential search then bisection on :meth:`PrivacyLedger.epsilon_after` (ε grows with T),
    so :math:`O(\log T)` accountant calls; at most ``limit``.
    """
    fits = lambda t: ledger.epsilon_after(noise_multiplier, sample_rate, t) <= target_epsilon  # noqa: E731
    if not fits(0):
        return 0
    low, high = 0, 1
    while high < limit and fits(high):
        low, high = high, min(2 * high, limit)
    if high == limit and fits(high):
        return limit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
