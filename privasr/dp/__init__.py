"""DP-SGD building blocks: Poisson sampling, per-layer clipping, the Gaussian mechanism, the step.

* :mod:`privasr.dp.poisson` -- :class:`PoissonBatchSampler`, identical global batches on every rank,
  and its loader (empty local batches included).
* :mod:`privasr.dp.per_layer` -- flat / ``uniform`` / ``dim`` group-wise clipping of per-example gradients.
* :mod:`privasr.dp.noise` -- noise once per step (rank 0 under DDP), normalised by :math:`qN`.
* :mod:`privasr.dp.step` -- :class:`~privasr.dp.step.DPSGDStep`, the DP-SGD step for any training loop.
* :mod:`privasr.dp.brain` -- :class:`~privasr.dp.brain.DPSGDBrain`, that step in a SpeechBrain ``Brain``
  (with the public warm-start and layer freezing); :mod:`privasr.dp.report` its privacy report.

Accounting lives in :mod:`privasr.accounting`, layer freezing in :mod:`privasr.freezing`.
"""
from privasr.dp.noise import (
    NoiseSource,
    all_reduce_sum,
    gaussian_noise,
    make_generator,
    noise_for_rank,
    normalize,
    privatize,
)
from privasr.dp.per_layer import (
    ClipResult,
    PerLayerClipper,
    clip_per_layer,
    group_parameters_by_layer,
    layer_bounds,
)
from privasr.dp.poisson import PoissonBatchSampler

__all__ = [
    "PoissonBatchSampler",
    "ClipResult",
    "PerLayerClipper",
    "clip_per_layer",
    "group_parameters_by_layer",
    "layer_bounds",
    "NoiseSource",
    "all_reduce_sum",
    "gaussian_noise",
    "make_generator",
    "noise_for_rank",
    "normalize",
    "privatize",
]
