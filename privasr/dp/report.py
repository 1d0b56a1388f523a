r"""Privacy reporting of a DP-SGD run: what a reader needs to state its guarantee, and where it goes.

:func:`privacy_summary` gathers the :math:`(\varepsilon, \delta)` spent (from the
:class:`~privasr.accounting.PrivacyLedger`'s whole history), the mechanism's settings
(:math:`\sigma`, :math:`C`, :math:`q`, :math:`qN`, :math:`N`, the clipping mode), the target and
whether the run stopped at it, and what was trained (frozen layers, warm-start steps,
parameters). :func:`report_privacy` logs it (file logger, SpeechBrain's train logger,
TensorBoard) and writes it as JSON (``privacy.json``, read by :mod:`privasr.ssl.results`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

from privasr.per_sample import trainable_parameters

logger = logging.getLogger(__name__)


def privacy_summary(ledger, config, sampler, modules, freezer, stopped_at_target: bool) -> dict:
    """The JSON-serialisable record of a run's guarantee.

    Args:
        ledger: the run's :class:`~privasr.accounting.PrivacyLedger`.
        config: its :class:`~privasr.dp.brain.DPConfig` (δ, accountant, σ, C, clipping mode, target ε).
        sampler: its :class:`~privasr.dp.poisson.PoissonBatchSampler` (q, qN, N).
        modules: the trained modules; freezer: their :class:`~privasr.freezing.LayerFreezer`.
    """
    return {
        "epsilon": ledger.epsilon(), "delta": config.delta, "accountant": config.accountant,
        "steps": ledger.steps, "noise_multiplier": config.noise_multiplier,
        "sample_rate": sampler.sample_rate, "expected_batch_size": sampler.expected_batch_size,
        "dataset_size": sampler.num_samples, "clip_bound": config.clip_bound,
        "clip_mode": config.clip_mode, "target_epsilon": config.target_epsilon,
        "stopped_at_target": stopped_at_target, "history": ledger.history,
        "frozen_layers": list(freezer.frozen), "warm_start_steps": freezer.steps,
        "trained_parameters": sum(p.numel() for _, p in trainable_parameters(modules)),
        "total_parameters": sum(p.numel() for p in modules.parameters()),
    }


def report_privacy(summary: dict, epoch=None, path: Optional[str] = None, train_logger=None, writer=None) -> dict:
    """Log ε of ``summary`` (the file logger, ``train_logger``, TensorBoard ``writer``) and write it to ``path``.

    Call on the main process only. ε is added to TensorBoard only when finite (σ = 0 gives ∞).
    """
    logger.info("epoch %s: epsilon = %.4g at delta = %g after %d DP steps", epoch, summary["epsilon"],
                summary["delta"], summary["steps"])
    if train_logger is not None:
        train_logger.log_stats({"epoch": epoch, "dp_steps": summary["steps"]},
                               train_stats={"epsilon": summary["epsilon"]})
    if writer is not None and math.isfinite(summary["epsilon"]):
        writer.add_scalar("privacy/epsilon", summary["epsilon"], epoch or 0)
        writer.flush()
    if path is not None:
        write_json(path, summary)
    return summary


def write_json(path: str, data: dict) -> None:
    """Atomic JSON write (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
