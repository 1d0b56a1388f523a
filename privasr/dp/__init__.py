"""DP-SGD building blocks: Poisson sampling, per-layer clipping, the Gaussian mechanism.

* :mod:`privasr.dp.poisson` -- :class:`PoissonBatchSampler`, identical global batches on every rank.
* :mod:`privasr.dp.per_layer` -- flat / ``uniform`` / ``dim`` group-wise clipping of per-example gradients.
* :mod:`privasr.dp.noise` -- noise once per step (rank 0 under DDP), normalised by :math:`qN`.

Accounting lives in :mod:`privasr.accounting`, layer freezing in :mod:`privasr.freezing`.
"""
from privasr.dp.noise import (
    add_noise,
    all_reduce_sum,
    gaussian_noise,
    make_generator,
    mask_frozen,
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
    "add_noise",
    "all_reduce_sum",
    "gaussian_noise",
    "make_generator",
    "mask_frozen",
    "noise_for_rank",
    "normalize",
    "privatize",
]
