r"""The pieces of one unit's gradient of one parameter: norms and book-keeping weighted sums.

A recorded layer leaves, once its output gradient ``g`` arrives, one *piece* per parameter:

*Linear on sequences* (:class:`_Seq`), ``out[i,t] = W a[i,t] + b``, and every convolution after
``im2col``, per group ``k``:

.. math::
    \lVert \nabla_W \ell_i \rVert^2 = \Big\lVert \sum_t g_{it} a_{it}^\top \Big\rVert^2
    = \sum_{t,t'} (a_{it} \cdot a_{it'})\,(g_{it} \cdot g_{it'}) .

The right-hand ("ghost") form costs :math:`L^2 (d_{in}+d_{out})` per unit and forms no
:math:`d_{out}\times d_{in}` matrix; the left-hand ("materialized") one costs :math:`L d_{in}
d_{out}`. Each layer takes the cheaper: materialized when :math:`d_{in} d_{out} < L^2` (mixed ghost
clipping, Li et al. 2022).

*Convolutions* (:class:`_Conv`): materialized per-unit gradients come from torch's own
weight-gradient kernel (``convolution_backward``) with the units folded into the groups
(:func:`_fold`), so no ``im2col`` columns are held; the ghost form forms the columns
(:func:`privasr.ghost.conv._im2col`) one layer at a time.

*Embedding* (:class:`_Embed`), ``out[i,t] = W[x_{it}]``: :math:`\nabla_W \ell_i = \sum_t e_{x_{it}} g_{it}^\top`,
so :math:`\lVert \nabla_W \ell_i \rVert^2 = \sum_{t,t'} [x_{it} = x_{it'}]\,(g_{it} \cdot g_{it'})` (ghost form,
when :math:`V d \ge L^2`), else the per-unit rows scattered into ``[K, V, d]``; the clipped sum scatters
:math:`f_i g_{it}` into row :math:`x_{it}`.

*Everything else* (biases :math:`\sum_t g_{it}`, LayerNorm's :math:`\sum_t g_{it} \odot \hat x_{it}`,
broadcast-added parameters) is a plain per-unit gradient tensor ``[K, numel]``.

*Units* (:func:`_to_units`): with ``K`` units of ``N/K`` consecutive examples, a unit's Linear
gradient is the same sum over the concatenated positions of its examples, so ``[N, G, L, d]``
becomes ``[K, G, (N/K) L, d]``; a per-example tensor is summed over the unit's rows.

*Shared weights* (:func:`_merge`): uses of one layout are concatenated along the positions (the
gradient is a sum over them, so the ghost form stays exact); other mixes are materialized and
added. Norms are of sums, never sums of norms.

*Book-keeping* (Bu et al. 2023): the clipped sum :math:`\sum_{k} f_k \nabla_W \ell_k` of a
ghost-form piece is one product of the kept ``a`` with ``g`` scaled by :math:`f_k`,
:math:`\sum_k f_k g_k^\top a_k`, of the size of an ordinary weight gradient; of a materialized
piece, ``f @ grads``. Dropped (non-finite) units are zeroed by :func:`_keep_rows` (``where``, never
``0 * NaN``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from privasr.clipping import parameter_norms
from privasr.ghost.conv import _im2col


class _Seq:
    """A weight gradient of the form ``sum_t g[i,k,t]^T a[i,k,t]`` per group ``k``.

    ``a``: ``[N, G, L, d_in]``, ``g``: ``[N, G, L, d_out]`` (views of the recorded tensors where the
    layout allows: no copy); the parameter is ``[G*d_out, d_in]`` (reshaped to its own shape), which
    is how Linear (``G = 1``) and grouped convolutions lay out their weights. In the materialized
    form the per-unit gradients are formed once and serve both the norms and the clipped sum; then
    :meth:`compact` lets ``a`` and ``g`` go.
    """

    def __init__(self, a: torch.Tensor, g: torch.Tensor):
        self.a, self.g = a, g
        self.units, self.groups, self.length, self.d_in = a.shape
        self.d_out = g.shape[3]
        self._grads: Optional[torch.Tensor] = None

    def layout(self) -> tuple:
        return self.groups, self.d_in, self.d_out

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its weighted sum (that of the per-unit gradients, or of ``g``)."""
        return (self.g if self._grads is None else self._grads).dtype

    @property
    def ghost(self) -> bool:
        """Whether the ghost form is the cheaper one: ``d_in d_out >= L^2`` (mixed ghost clipping)."""
        return self.d_in * self.d_out >= self.length ** 2

    def materialize(self) -> torch.Tensor:
        """Per-unit gradients ``[K, G*d_out*d_in]``."""
        if self._grads is None:
            self._grads = torch.einsum("ngli,nglo->ngoi", self.a, self.g).reshape(self.units, -1)
        return self._grads

    def sq_norms(self) -> torch.Tensor:
        """``[K]`` squared norms: ghost form when :attr:`ghost`, else materialized."""
        if not self.ghost:
            return sq_norms_of(self.materialize())
        a = self.a[:1] if self.a.stride(0) == 0 else self.a  # an input shared by every unit: its Gram once
        gram_a = a @ a.transpose(-1, -2)  # [K, G, L, L] (or [1, G, L, L], broadcast below)
        gram_g = self.g @ self.g.transpose(-1, -2)
        return (gram_a * gram_g).sum((1, 2, 3))

    def compact(self) -> "_Seq":
        """Keep only what the clipped sum needs: the per-unit gradients, or ``a`` and ``g`` (ghost form)."""
        if not self.ghost:
            self.materialize()
            self.a = self.g = None
        return self

    def output_grads(self) -> list:
        return [] if self.g is None else [self.g]

    def weighted_sum(self, weights: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        r"""``sum_{k kept} w_k grad_k`` (flat): book-keeping, :math:`\sum_{k,l} g_{kl}^\top (w_k a_{kl})` or
        :math:`\sum_{k,l} (w_k g_{kl})^\top a_{kl}`.

        ``keep`` None: every unit kept. The weights scale the narrower of ``a`` and ``g`` (fewer
        elements written), and the product is written in the row order the other is stored in
        (time-first layers store position-major), so with one group the sum over units and
        positions is one matrix product and nothing but the product is copied.
        """
        if self._grads is not None:
            return weights.to(self._grads.dtype) @ _keep_rows(self._grads, keep)
        g = _keep_rows(self.g, keep)
        if self.a.stride(0) == 0 and self.groups == 1:
            # An input shared by every unit (a_kl = a_l): sum_k w_k sum_l g_kl^T a_l
            # = sum_l (sum_k w_k g_kl)^T a_l, one [L, d_out] weighted sum of g, never the expanded a.
            summed = (weights.to(g.dtype) @ g.reshape(self.units, -1)).view(self.length, self.d_out)
            return (summed.T @ self.a[0, 0]).reshape(-1)
        a = _keep_rows(self.a, keep)
        scale = weights.to(g.dtype).view(-1, 1, 1, 1)
        if self.groups > 1:
            return torch.einsum("ngli,nglo->goi", a, g * scale).reshape(-1)
        if self.d_in < self.d_out:
            a_rows, g_rows = _scaled_rows(a[:, 0], scale[:, 0], g[:, 0])
        else:
            g_rows, a_rows = _scaled_rows(g[:, 0], scale[:, 0], a[:, 0])
        return (g_rows.T @ a_rows).reshape(-1)


class _Conv:
    r"""A convolution's per-unit weight gradient from its input ``x [N, C_in, *S]`` and output gradient ``g``.

    Materialized (``d_in d_out < L^2``; ``d_in = (C_in/G) \prod k``, ``d_out = C_out/G``, ``L`` the
    output positions): torch's weight-gradient kernel (``convolution_backward``) with the units
    folded into the groups, ``[B, K C_in, *S]`` and ``[B, K C_out, *L]`` in ``K G`` groups, gives
    every unit's gradient at once and forms no ``im2col`` columns. Ghost form: the Gram matrices of
    the ``im2col`` columns (formed here, one layer at a time) and of ``g``; the clipped sum is then
    the same kernel on the whole batch with ``g`` scaled by each unit's factor.
    ``x`` is already zero-padded where the padding is not symmetric; ``padding`` is per dimension.
    """

    def __init__(self, x: torch.Tensor, g: torch.Tensor, units: int, weight_shape: tuple, stride: tuple,
                 padding: tuple, dilation: tuple, groups: int):
        self.x, self.g, self.units = x, g, units
        self.weight_shape, self.stride, self.padding, self.dilation, self.groups = (
            tuple(weight_shape), stride, padding, dilation, groups)
        self.length = math.prod(g.shape[2:])
        self.d_in = weight_shape[1] * math.prod(weight_shape[2:])
        self.d_out = weight_shape[0] // groups
        self._grads: Optional[torch.Tensor] = None

    def layout(self) -> tuple:
        return ("conv",) + self.weight_shape + (self.stride, self.padding, self.dilation, self.groups)

    ghost = _Seq.ghost
    dtype = _Seq.dtype

    def _weight_grad(self, x: torch.Tensor, g: torch.Tensor, copies: int) -> torch.Tensor:
        """``convolution_backward``'s weight gradient for ``copies`` stacked weights (groups ``copies * G``)."""
        shape = (copies * self.weight_shape[0],) + self.weight_shape[1:]
        weight = g.new_empty(1).expand(shape)  # only its shape is read
        dims = len(self.stride)
        return torch.ops.aten.convolution_backward(
            g, x, weight, None, list(self.stride), list(self.padding), list(self.dilation), False, [0] * dims,
            copies * self.groups, (False, True, False))[1]

    def materialize(self) -> torch.Tensor:
        """Per-unit gradients ``[K, numel]``: unit ``k``'s examples are the batch of copy ``k`` of the weight.

        A few units per call (:data:`CONV_CHUNK_BYTES` of input and output gradient), written into
        one buffer: the kernel's workspace grows with the units per call, its speed hardly does.
        """
        if self._grads is None:
            per = self.x.shape[0] // self.units
            unit_bytes = (self.x[:per].numel() + self.g[:per].numel()) * self.x.element_size()
            step = max(1, min(self.units, CONV_CHUNK_BYTES // max(unit_bytes, 1)))
            for first in range(0, self.units, step):
                count = min(step, self.units - first)
                rows = slice(first * per, (first + count) * per)
                part = self._weight_grad(_fold(self.x[rows], count), _fold(self.g[rows], count), count)
                if count == self.units:
                    self._grads = part.reshape(count, -1)
                    break
                if self._grads is None:
                    self._grads = part.new_empty(self.units, part.numel() // count)
                self._grads[first:first + count] = part.reshape(count, -1)
        return self._grads

    def sq_norms(self) -> torch.Tensor:
        if not self.ghost:
            return sq_norms_of(self.materialize())
        n, channels_out = self.g.shape[:2]
        kernel = self.weight_shape[2:]
        cols = _im2col(self.x, kernel, self.stride, self.dilation, self.padding)  # [N, C_in*prod(k), L]
        cols = cols.reshape(n, self.groups, -1, cols.shape[-1]).transpose(2, 3)
        g = self.g.reshape(n, self.groups, channels_out // self.groups, -1).transpose(2, 3)
        return _Seq(_to_units(cols, self.units, True), _to_units(g, self.units, True)).sq_norms()

    def compact(self) -> "_Conv":
        if not self.ghost:
            self.materialize()
            self.x = self.g = None
        return self

    output_grads = _Seq.output_grads

    def weighted_sum(self, weights: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        if self._grads is not None:
            return weights.to(self._grads.dtype) @ _keep_rows(self._grads, keep)
        per = self.x.shape[0] // self.units
        weights = weights.repeat_interleave(per)  # per example
        keep = None if keep is None else keep.repeat_interleave(per)
        g = _keep_rows(self.g, keep) * weights.to(self.g.dtype).view(-1, *([1] * (self.g.dim() - 1)))
        return self._weight_grad(_keep_rows(self.x, keep), g, 1).reshape(-1)


class _Embed:
    """An embedding's per-unit weight gradient from its indices ``idx [K, L]`` and output gradient ``g [K, L, d]``."""

    def __init__(self, idx: torch.Tensor, g: torch.Tensor, vocab: int):
        self.idx, self.g, self.vocab = idx, g, vocab
        self.units, self.length, self.d_out = g.shape
        self.d_in = vocab  # the rule of mixed ghost clipping with d_in = V (a one-hot input)
        self._grads: Optional[torch.Tensor] = None

    def layout(self) -> tuple:
        return ("embedding", self.vocab, self.d_out)

    ghost = _Seq.ghost
    dtype = _Seq.dtype
    output_grads = _Seq.output_grads

    def materialize(self) -> torch.Tensor:
        """Per-unit gradients ``[K, V*d]``: unit ``k``'s rows ``g_kt`` added into row ``k V + x_kt``."""
        if self._grads is None:
            offsets = torch.arange(self.units, device=self.idx.device).unsqueeze(1) * self.vocab
            rows = (self.idx + offsets).reshape(-1)
            self._grads = self.g.new_zeros(self.units * self.vocab, self.d_out).index_add_(
                0, rows, self.g.reshape(-1, self.d_out)).reshape(self.units, -1)
        return self._grads

    def sq_norms(self) -> torch.Tensor:
        if not self.ghost:
            return sq_norms_of(self.materialize())
        same = (self.idx.unsqueeze(2) == self.idx.unsqueeze(1)).to(self.g.dtype)  # [K, L, L]
        return (same * (self.g @ self.g.transpose(1, 2))).sum((1, 2))

    def compact(self) -> "_Embed":
        if not self.ghost:
            self.materialize()
            self.idx = self.g = None
        return self

    def weighted_sum(self, weights: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        if self._grads is not None:
            return weights.to(self._grads.dtype) @ _keep_rows(self._grads, keep)
        g = _keep_rows(self.g, keep) * weights.to(self.g.dtype).view(-1, 1, 1)
        return g.new_zeros(self.vocab, self.d_out).index_add_(0, self.idx.reshape(-1), g.reshape(-1, self.d_out)
                                                              ).reshape(-1)


_PIECES = (_Seq, _Conv, _Embed)


def sq_norms_of(grads: torch.Tensor) -> torch.Tensor:
    """``[K]`` float64 squared norms of per-unit gradients ``[K, ...]``, in :func:`~privasr.clipping.core_norms`' precision.

    :func:`~privasr.clipping.parameter_norms` squared: one parameter's term of ``core_norms`` without
    its ``stack``, ``sum``, ``sqrt`` and the square taken back after them (mini Conformer, batch 16:
    ~100 parameters a step); equal to ``core_norms([grads]) ** 2`` up to float64 rounding.
    """
    return parameter_norms(grads).pow(2)

#: Input plus output-gradient bytes of the units in one call of :meth:`_Conv.materialize`.
CONV_CHUNK_BYTES = 4 * 2 ** 20


def _fold(t: torch.Tensor, units: int) -> torch.Tensor:
    """``[K*per, C, *S] -> [per, K*C, *S]``: unit ``k``'s examples meet copy ``k`` of the weight (a view if per == 1)."""
    per = t.shape[0] // units
    return t.reshape(units, per, *t.shape[1:]).transpose(0, 1).reshape(per, units * t.shape[1], *t.shape[2:])


def _to_units(x: torch.Tensor, num_units: int, seq: bool) -> torch.Tensor:
    """Regroup rows ``[N, ...]`` into ``num_units`` consecutive groups.

    ``seq``: ``[N, G, L, d] -> [K, G, (N/K) L, d]`` (positions of a group's examples concatenated);
    else ``[N, D] -> [K, D]`` summed within each group.
    """
    n = x.shape[0]
    per = n // num_units
    if per == 1:
        return x
    if seq:
        _, groups, length, dim = x.shape
        return x.reshape(num_units, per, groups, length, dim).transpose(1, 2).reshape(
            num_units, groups, per * length, dim)
    return x.reshape(num_units, per, -1).sum(1)


def _in_units(piece, num_units: int):
    """A piece of ``N`` example rows -> the same piece of ``num_units`` unit rows."""
    if isinstance(piece, _Seq):
        return _Seq(_to_units(piece.a, num_units, True), _to_units(piece.g, num_units, True))
    if isinstance(piece, _Conv):
        piece.units = num_units
        return piece
    if isinstance(piece, _Embed):
        per = piece.units // num_units
        return piece if per == 1 else _Embed(piece.idx.reshape(num_units, -1),
                                              piece.g.reshape(num_units, per * piece.length, -1), piece.vocab)
    return _to_units(piece, num_units, False)


def _scaled_rows(x: torch.Tensor, scale: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * scale, other)`` as rows ``[N L, d]`` in one ``(n, l)`` order: ``x``, ``other`` ``[N, L, d]``.

    The order is the one ``other`` is stored in (batch- or position-major), so its rows are a view;
    the product is written straight into that order. ``other`` is copied only when it is neither.
    """
    n, length, dim = x.shape
    for position_major in (False, True):
        view = other.transpose(0, 1) if position_major else other
        if _merges(view):
            out = x.new_empty((length, n, dim) if position_major else (n, length, dim))
            torch.mul(x.transpose(0, 1) if position_major else x, scale.transpose(0, 1) if position_major else scale,
                      out=out)
            return out.reshape(-1, dim), view.reshape(-1, view.shape[-1])
    return (x * scale).reshape(-1, dim), other.reshape(-1, other.shape[-1])


def _merges(x: torch.Tensor) -> bool:
    """Whether axes 0 and 1 of ``x`` merge into one as a view."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _keep_rows(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of dropped units replaced by zeros (``where``, so NaN/Inf cannot leak through ``0 *``).

    ``keep`` None (or all True): ``x`` itself.
    """
    if keep is None or bool(keep.all()):
        return x
    mask = keep.view(-1, *([1] * (x.dim() - 1))).to(x.device)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _merge(parts: list) -> list:
    """Pieces of one parameter from several uses -> pieces whose sum is its per-unit gradient.

    Uses of one Linear/convolution layout are concatenated along the positions (the gradient is a
    sum over them, so the ghost form stays exact); anything else is materialized and added.
    """
    if len(parts) == 1:
        return parts
    seqs = [p for p in parts if isinstance(p, _Seq)]
    if len(seqs) == len(parts) and len({p.layout() for p in seqs}) == 1:
        return [_Seq(torch.cat([p.a for p in seqs], 2), torch.cat([p.g for p in seqs], 2))]
    if all(isinstance(p, _Embed) for p in parts):  # one table looked up several times: positions concatenated
        return [_Embed(torch.cat([p.idx for p in parts], 1), torch.cat([p.g for p in parts], 1), parts[0].vocab)]
    return [sum(p.materialize() if isinstance(p, _PIECES) else p for p in parts)]
