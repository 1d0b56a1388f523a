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

:func:`conv_in_chunks`: the recorder's convolution whose input gradient is formed a few examples
at a time (:class:`_InputGradInChunks`; the backward's memory peak, the same values).
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


class _InputGradInChunks(torch.autograd.Function):
    r"""A ``conv1d``/``conv2d`` (symmetric zero padding) whose input gradient is formed a few examples at a time.

    The input gradient :math:`\partial / \partial x_i` of a convolution is example ``i``'s alone, so
    computing it over chunks of the batch gives the same values. torch's CPU kernel (oneDNN) holds two
    more buffers of the input's size while it computes it over the whole batch: the largest transient
    of a Conformer's backward (its front end's second convolution; mini, batch 16: 3 x 17.6 MiB),
    which a ghost pass meets with every ghost-form layer's records held. By chunks those two buffers
    are a chunk's. The forward is the same call. The weight and bias gradients are formed (the whole
    batch's, as autograd's) only when ``params_needed()`` says so: a ghost pass's backward (to its
    anchor) takes none, a second backward (``route="backward"``) does; ``ctx.needs_input_grad``
    says only that they require a gradient, not that this backward asks for it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, per_chunk, params_needed):  # noqa: D102
        dims = x.dim() - 2
        ctx.save_for_backward(x, weight)
        ctx.conv = (list(stride), list(padding), list(dilation), groups, dims, per_chunk,
                    None if bias is None else list(bias.shape))
        ctx.params_needed = params_needed
        return (F.conv1d if dims == 1 else F.conv2d)(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, dims, per_chunk, bias_sizes = ctx.conv

        def conv_backward(grad, inp, mask):
            return torch.ops.aten.convolution_backward(grad, inp, weight, bias_sizes, stride, padding, dilation,
                                                       False, [0] * dims, groups, mask)

        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)
            for first in range(0, x.shape[0], per_chunk):
                rows = slice(first, first + per_chunk)
                gx[rows] = conv_backward(g[rows], x[rows], (True, False, False))[0]
        if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and ctx.params_needed():
            _, gw, gb = conv_backward(g, x, (False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]))
        return gx, gw, gb, None, None, None, None, None, None


def conv_in_chunks(x, weight, bias, stride, padding, dilation, groups, chunk_bytes: int,
                   params_needed=lambda: True):
    """The convolution's output, its input gradient to be formed in chunks of ``chunk_bytes`` of input
    (:class:`_InputGradInChunks`), or None where that does not apply (no input gradient, one chunk, or
    padding that is not a symmetric zero padding, autocast or mixed dtypes). ``params_needed()``: whether a backward wants the
    weight and bias gradients."""
    dims = x.dim() - 2
    kernel = tuple(weight.shape[2:])
    pads = _pads(padding, kernel, _tuple(dilation, dims))
    per_example = x[0].numel() * x.element_size()
    per_chunk = max(1, chunk_bytes // max(per_example, 1))
    if (not x.requires_grad or per_chunk >= x.shape[0] or any(left != right for left, right in pads)
            or torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype):
        return None  # (autocast would cast inside the forward, not in what the backward saved)
    return _InputGradInChunks.apply(x, weight, bias, _tuple(stride, dims), tuple(left for left, _ in pads),
                                    _tuple(dilation, dims), int(groups), per_chunk, params_needed)
