r"""The Gaussian mechanism of DP-SGD: noise once per step, then divide by :math:`qN`.

With per-example gradients clipped to :math:`\|g_i\| \le C`, the privatised gradient of a
step with Poisson batch :math:`B_t` (rate :math:`q`, dataset size :math:`N`) is

.. math::

    \tilde g_t = \frac{1}{qN}\Big(\sum_{i \in B_t} \bar g_i + \mathcal{N}(0, \sigma^2 C^2 I)\Big).

Three details matter for the guarantee and are enforced here:

* The noise is drawn **once per step** for the *global* sum. Under DDP with a SUM
  all-reduce, rank 0 adds the noise and the other ranks add zeros
  (:func:`noise_for_rank`), so it is counted exactly once -- adding independent noise
  on every rank would make its std :math:`\sqrt{W}` too large (over-noised, still
  private) and adding the *same* noise on every rank would make it :math:`W` times too
  large.
* The divisor is the **expected** batch size :math:`qN`, not the realised
  :math:`|B_t|` (which depends on the private data; dividing by it would leak).
* Frozen parameters get **no** noise: they are not among the trained parameters the sums are
  formed over (:class:`privasr.dp.step.DPSGDStep`), and an entry ``None`` stays ``None``.

For a real private run seed the generator from the OS (``make_generator(None)``): the
guarantee assumes the noise is unknown to the adversary. Fixed seeds are for tests and
reproducible debugging.
"""
from __future__ import annotations

import secrets
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

Grads = Sequence[Optional[torch.Tensor]]


def make_generator(seed: Optional[int] = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A noise generator on ``device``; ``seed=None`` draws a secret seed from the OS."""
    seed = secrets.randbits(63) if seed is None else int(seed)
    return torch.Generator(device=device).manual_seed(seed)


@register_checkpoint_hooks
class NoiseSource:
    """The DP noise generator, checkpointed so that a resumed run re-draws exactly the noise
    of the steps it repeats (the same Poisson batches and the same noise: the same release).

    ``seed=None`` draws a secret seed from the OS (what a real private run must use).
    """

    def __init__(self, seed: Optional[int] = None):
        self.generator = make_generator(seed)

    @mark_as_saver
    def save(self, path) -> None:
        torch.save(self.generator.get_state(), path)

    @mark_as_loader
    def load(self, path, end_of_epoch: bool = False) -> None:
        self.generator.set_state(torch.load(path))


def _check_scale(noise_multiplier: float, max_norm: float) -> float:
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not max_norm > 0.0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    return float(noise_multiplier) * float(max_norm)


def _check_rank(rank) -> None:
    if int(rank) != rank or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, got {rank!r}")


def _check_expected_batch_size(expected_batch_size: float) -> None:
    if not expected_batch_size > 0.0:
        raise ValueError(f"expected_batch_size (q*N) must be > 0, got {expected_batch_size!r}")


def _gaussian_like(t: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else t.device
    noise = torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype)
    return noise.mul_(std).to(t.device)


def gaussian_noise(like: Grads, noise_multiplier: float, max_norm: float,
                   generator: Optional[torch.Generator] = None) -> List[Optional[torch.Tensor]]:
    r"""Fresh :math:`\mathcal{N}(0, \sigma^2 C^2)` tensors shaped like ``like`` (``None`` stays ``None``)."""
    std = _check_scale(noise_multiplier, max_norm)
    return [None if t is None else _gaussian_like(t, std, generator) for t in like]


def noise_for_rank(rank: int, like: Grads, noise_multiplier: float, max_norm: float,
                   generator: Optional[torch.Generator] = None) -> List[Optional[torch.Tensor]]:
    r"""This rank's share of the step's noise: :math:`\mathcal{N}(0,\sigma^2C^2)` on rank 0, zeros elsewhere.

    Adding it to the local sum before a SUM all-reduce adds the noise exactly once. Only
    rank 0 consumes ``generator``, so only rank 0's generator state needs checkpointing.
    """
    _check_rank(rank)
    if rank == 0:
        return gaussian_noise(like, noise_multiplier, max_norm, generator)
    _check_scale(noise_multiplier, max_norm)
    return [None if t is None else torch.zeros_like(t) for t in like]


def normalize(noisy_sums: Grads, expected_batch_size: float) -> List[Optional[torch.Tensor]]:
    r"""Divide by the expected batch size :math:`qN` (never by the realised one)."""
    _check_expected_batch_size(expected_batch_size)
    return [None if g is None else g / expected_batch_size for g in noisy_sums]


def all_reduce_sum(grads: Grads, group=None) -> List[Optional[torch.Tensor]]:
    """SUM the non-``None`` tensors over all processes with a single flattened all-reduce."""
    present = [g for g in grads if g is not None]
    if not present or not dist.is_available() or not dist.is_initialized():
        return list(grads)
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    chunks = iter(flat.split([g.numel() for g in present]))
    return [None if g is None else next(chunks).view_as(g) for g in grads]


def privatize(local_sums: Grads, noise_multiplier: float, max_norm: float, expected_batch_size: float,
              generator: Optional[torch.Generator] = None, rank: Optional[int] = None,
              group=None) -> List[Optional[torch.Tensor]]:
    r"""The whole mechanism on one rank :math:`r`:

    .. math::

        \tilde g = \frac{1}{qN}\,\mathrm{AllReduce}_\Sigma\big(s_r + \mathbb{1}[r=0]\,z\big),
        \qquad z \sim \mathcal{N}(0, \sigma^2 C^2 I).


    Args:
        local_sums: this rank's clipped gradients summed over its shard (``None`` = frozen).
        noise_multiplier, max_norm: :math:`\sigma`, :math:`C`.
        expected_batch_size: :math:`qN` (global, e.g. ``PoissonBatchSampler.expected_batch_size``).
        generator: the noise source; only used on rank 0.
        rank: defaults to the process-group rank (0 when not distributed).

    Computed in one flat buffer (one copy of the sums, then in place: noise, all-reduce, division);
    the values are those of :func:`noise_for_rank` + :func:`all_reduce_sum` + :func:`normalize`
    bit for bit: the noise is drawn parameter by parameter in order, each draw exactly
    ``torch.randn(shape, generator=generator)``, then scaled by :math:`\sigma C` (the per-parameter
    calls cost one dispatch each, the flat ones one pass over the gradient instead of five).
    """
    if rank is None:
        rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    _check_rank(rank)
    std = _check_scale(noise_multiplier, max_norm)
    _check_expected_batch_size(expected_batch_size)
    present = [g for g in local_sums if g is not None]
    if not present:
        return list(local_sums)
    if len({(g.dtype, g.device) for g in present}) > 1:  # one flat buffer would change their dtypes
        noise = noise_for_rank(rank, local_sums, noise_multiplier, max_norm, generator)
        noisy = [None if g is None else g + z for g, z in zip(local_sums, noise)]
        return normalize(all_reduce_sum(noisy, group), expected_batch_size)
    flat = torch.cat([g.reshape(-1) for g in present])
    if rank == 0:
        flat.add_(_flat_gaussian(present, std, generator).to(flat.device))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(expected_batch_size)
    chunks = iter(flat.split([g.numel() for g in present]))
    return [None if g is None else next(chunks).view_as(g) for g in local_sums]


def _flat_gaussian(like: Sequence[torch.Tensor], std: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """:func:`gaussian_noise` of ``like`` (no None) as one flat tensor: the same draws, in order, on the generator's device."""
    device = generator.device if generator is not None else like[0].device
    noise = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=device)
    offset = 0
    for t in like:  # torch.randn(shape) is empty(shape).normal_(): the same numbers into a view
        noise[offset: offset + t.numel()].normal_(generator=generator)
        offset += t.numel()
    return noise.mul_(std)
