r"""Per-example gradient norms and the per-example-clipped gradient sum without per-example gradients.

"Ghost" norms (Goodfellow 2015; Li et al. 2022, *mixed ghost clipping*; Bu et al. 2023,
*book-keeping*), written for privasr's Conformer. One forward runs under a
:class:`torch.overrides.TorchFunctionMode` that records, for every call of a known operation on a
trainable parameter, the operation's input activation ``a``; one backward of
:math:`\sum_i \ell_i` returns the gradients ``g`` of the recorded outputs (not of the parameters:
the weight-gradient products of an ordinary backward are never formed). Since
:math:`\sum_i \ell_i` sums over examples and row ``i`` of every recorded tensor belongs to example
``i`` alone (batch-first model, no cross-example statistics: privasr's encoder), row ``i`` of ``g``
is :math:`\partial \ell_i / \partial \text{out}_i`, and each example's gradient follows from its own
rows, e.g. for a Linear on sequences

.. math::
    \lVert \nabla_W \ell_i \rVert^2 = \Big\lVert \sum_t g_{it} a_{it}^\top \Big\rVert^2
    = \sum_{t,t'} (a_{it} \cdot a_{it'})\,(g_{it} \cdot g_{it'}) .

One concept per module, each with its part of the maths:

- :mod:`privasr.ghost.pieces` — one unit's gradient of one parameter (:class:`_Seq` for Linear
  and convolutions over columns, :class:`_Conv`, plain per-unit tensors): ghost or materialized
  norms (mixed ghost clipping), units, shared weights, the book-keeping weighted sum.
- :mod:`privasr.ghost.conv` — convolution arguments, padding and ``im2col``.
- :mod:`privasr.ghost.tap` — the identity taps whose backward hands each layer's output gradient
  over as the backward reaches it (each layer's ``g`` freed then, never all at once).
- :mod:`privasr.ghost.recorder` — the ``TorchFunctionMode``: the rules per operation (Linear,
  time-first inputs, convolutions, LayerNorm, broadcast-added parameters, a Linear on an input
  shared by all examples), what falls back and why, the in-place checks, the backward's book.
- :mod:`privasr.ghost.passes` — :func:`ghost_pass` / :class:`GhostPass`: one recorded forward and
  backward, the norms, the vmap fallback.
- :mod:`privasr.ghost.front` — :func:`per_example_norms`, :func:`clipped_sum` (book-keeping or a
  second backward), :func:`accumulate` (into a :class:`privasr.distributed.CoreAccumulator`) and
  :func:`summed_shard_loss`.

On privasr's Conformer-CTC nothing falls back (``tests/test_ghost.py``).

Assumptions (checked where cheap, otherwise tested on the Conformer): batch first; an operation's
output is not modified in place before the backward (checked: a clear error); dropout draws one
mask per example of the batch, so in training mode the gradients are those of the batch's masks,
not of vmap's (``randomness="different"``) draws.

``CONV_CHUNK_BYTES`` is re-exported for reading; to change it, set
``privasr.ghost.pieces.CONV_CHUNK_BYTES`` (where :meth:`_Conv.materialize` reads it).
"""
from privasr.ghost.conv import bind_conv, is_pointwise
from privasr.ghost.front import ROUTES, accumulate, clipped_sum, per_example_norms, summed_shard_loss
from privasr.ghost.passes import GhostPass, ghost_pass
from privasr.ghost.pieces import CONV_CHUNK_BYTES

__all__ = ["GhostPass", "ghost_pass", "per_example_norms", "clipped_sum", "summed_shard_loss", "accumulate",
           "ROUTES", "CONV_CHUNK_BYTES", "bind_conv", "is_pointwise"]
