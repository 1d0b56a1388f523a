r"""Per-shard (virtual-core) and per-example gradients with torch.func.

A process that emulates ``K`` cores splits its batch of ``N`` examples into ``K`` shards
and needs each shard's mean gradient :math:`\bar g_k = \nabla_\theta L(\theta; \text{shard}_k)`.
Per-example gradients are the special case ``K = N``: either function below with
``num_shards`` equal to the batch size (PEC, DP-SGD).

Two modes compute the same numbers:

``vmap``
    ``vmap(grad(functional_call))`` over the shard axis: one vectorised
    forward/backward, but ``K`` gradient copies live in memory at once.
``loop``
    one forward/backward per shard with ``torch.autograd.grad``; the caller consumes
    each shard's gradient before the next is computed, so memory stays at one copy.

Padding: each example keeps the padded length of the whole batch, and the model must
mask padding with the (relative) lengths it receives, so nothing leaks between the
examples of a batch (tested on SpeechBrain's Conformer with RelPosMHAXL).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.func import functional_call, grad, vmap

ShardLoss = Callable[..., torch.Tensor]


class _LossModule(torch.nn.Module):
    """Makes ``loss_fn(*tensors)`` the forward of a module owning ``model``.

    ``functional_call`` swaps the parameters of ``model`` in place for the duration of
    the call, so ``loss_fn`` may reach the model through any reference it holds.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: ShardLoss):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *tensors):
        return self.loss_fn(*tensors)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the parameters that require a gradient, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def split_into_shards(tensors: Sequence[torch.Tensor], num_shards: int) -> list[tuple[torch.Tensor, ...]]:
    """Split every tensor along dim 0 into ``num_shards`` contiguous shards.

    Shard sizes differ by at most one when the batch does not divide evenly.
    """
    batch = tensors[0].shape[0]
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if batch < num_shards:
        raise ValueError(f"a batch of {batch} examples cannot feed {num_shards} cores (need >= 1 example each)")
    for t in tensors:
        if t.shape[0] != batch:
            raise ValueError("every batch tensor must have the same first (batch) dimension")
    parts = [torch.tensor_split(t, num_shards, dim=0) for t in tensors]
    return [tuple(p[k] for p in parts) for k in range(num_shards)]


def shard_grads_loop(
    model: torch.nn.Module, loss_fn: ShardLoss, tensors: Sequence[torch.Tensor], num_shards: int,
    trim: Optional[Callable[..., tuple]] = None,
) -> Iterator[tuple[list[Optional[torch.Tensor]], torch.Tensor]]:
    """Yield ``(grads, loss)`` per shard, one backward each; ``grads[p]`` is None if unused.

    ``trim(*shard) -> shard`` may drop the padding a shard does not need (its examples'
    longest length instead of the batch's): with a model whose padding is inert the
    gradients are unchanged and the shard costs only its own frames.
    """
    params = [p for _, p in trainable_parameters(model)]
    for shard in split_into_shards(tensors, num_shards):
        if trim is not None:
            shard = trim(*shard)
        loss = loss_fn(*shard)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        yield list(grads), loss.detach()


def shard_grads_vmap(
    model: torch.nn.Module,
    loss_fn: ShardLoss,
    tensors: Sequence[torch.Tensor],
    num_shards: int,
    randomness: str = "different",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All shards at once: returns ``(grads, losses)`` with ``grads[p]`` of shape ``[K, *shape]``.

    The batch must divide evenly into ``num_shards`` (vmap needs equal shards).
    ``randomness="different"`` gives each shard its own dropout mask, like separate cores.
    """
    batch = tensors[0].shape[0]
    if batch % num_shards != 0:
        raise ValueError(f"vmap mode needs the batch ({batch}) to divide evenly into {num_shards} shards")
    wrapper = _LossModule(model, loss_fn)
    named = trainable_parameters(model)
    trainable = {f"model.{n}": p.detach() for n, p in named}

    def shard_loss(params, *shard):
        return functional_call(wrapper, params, shard, strict=False)

    def shard_loss_and_aux(params, *shard):
        loss = shard_loss(params, *shard)
        return loss, loss.detach()

    shaped = [t.reshape(num_shards, batch // num_shards, *t.shape[1:]) for t in tensors]
    in_dims = (None,) + (0,) * len(shaped)
    grads, losses = vmap(grad(shard_loss_and_aux, has_aux=True), in_dims=in_dims, randomness=randomness)(
        trainable, *shaped
    )
    return [grads[f"model.{n}"] for n, _ in named], losses

