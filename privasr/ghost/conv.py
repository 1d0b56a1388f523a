r"""Convolution arguments and ``im2col``: a convolution as a Linear per group over its input columns.

A ``conv1d``/``conv2d`` with weight ``[C_out, C_in/G, *k]`` in ``G`` groups, stride ``s``,
dilation ``d`` and zero padding computes, at every output position ``l``,

.. math::
    \text{out}[i, c, l] = W_c \cdot \text{col}_{g(c)}[i, :, l] + b_c ,

with :math:`\text{col}[i, :, l]` the ``C_in/G * prod(k)`` input values under the kernel at ``l``
(``F.unfold``), in the weight's ``(c, k...)`` order. Per group the weight gradient is therefore a
Linear's, :math:`\sum_l g_{il} \,\text{col}_{il}^\top`, with ``d_in = (C_in/G) prod(k)``,
``d_out = C_out/G`` and ``L`` output positions (:class:`privasr.ghost.pieces._Seq`).

Padding: ``'valid'`` is none; ``'same'`` follows torch's rule (total ``d (k - 1)`` per dimension,
the odd element at the end, so it can be asymmetric; the recorder then pads the saved input
itself); an int or tuple is symmetric. A *pointwise* convolution (kernel 1, stride 1, no padding)
has its input itself as columns: no ``im2col`` at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bind(args, kwargs, names, defaults):
    """A call's arguments in ``names`` order: positional, then keyword, then ``defaults``."""
    values = dict(zip(names, defaults))
    values.update(zip(names, args))
    values.update(kwargs)
    return [values[n] for n in names]


def _tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def bind_conv(args, kwargs) -> list:
    """``conv1d``/``conv2d`` arguments as ``[input, weight, bias, stride, padding, dilation, groups]``."""
    return _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                 (None, None, None, 1, 0, 1, 1))


def is_pointwise(kernel: tuple, stride, padding, dilation) -> bool:
    """Whether a convolution's ``im2col`` columns are its input itself (kernel 1, stride 1, no padding)."""
    dims = len(kernel)
    return (all(k == 1 for k in kernel) and all(s == 1 for s in _tuple(stride, dims))
            and not any(sum(_pads(padding, tuple(kernel), _tuple(dilation, dims)), ())))


def _pads(padding, kernel: tuple, dilation: tuple) -> tuple:
    """A convolution's zero padding as ``((left, right), ...)`` per spatial dimension."""
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding == "same":  # torch's rule: the odd element of the total padding goes to the end
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def _im2col(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple, padding: tuple) -> torch.Tensor:
    """``[N, C, *spatial]`` -> columns ``[N, C*prod(kernel), L]`` in the weight's ``(c, k...)`` order.

    ``padding``: symmetric, per dimension.
    """
    if len(kernel) == 1:
        x, kernel, stride, dilation, padding = (x.unsqueeze(2), (1,) + tuple(kernel), (1,) + tuple(stride),
                                                (1,) + tuple(dilation), (0,) + tuple(padding))
    return F.unfold(x, tuple(kernel), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
