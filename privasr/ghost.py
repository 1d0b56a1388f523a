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
rows:

*Linear on sequences* ``out[i,t] = W a[i,t] + b`` (and every convolution after ``unfold``, per
group):

.. math::
    \lVert \nabla_W \ell_i \rVert^2 = \Big\lVert \sum_t g_{it} a_{it}^\top \Big\rVert^2
    = \sum_{t,t'} (a_{it} \cdot a_{it'})\,(g_{it} \cdot g_{it'}) ,\qquad
    \nabla_b \ell_i = \sum_t g_{it} .

The right-hand ("ghost") form costs :math:`T^2 (d_{in}+d_{out})` per example and forms no
:math:`d_{out}\times d_{in}` matrix; the left-hand ("materialized") one costs :math:`T d_{in}
d_{out}`. Each layer takes the cheaper: materialized when :math:`d_{in} d_{out} < T^2` (mixed ghost
clipping). Convolutions (``conv1d``/``conv2d``, pointwise, depthwise and grouped, any stride,
dilation and zero padding, ``'same'`` included) become a Linear per group over ``im2col`` columns.

*LayerNorm* ``out = \hat x \odot w + b``: :math:`\nabla_w \ell_i = \sum_t g_{it} \odot \hat x_{it}`,
:math:`\nabla_b \ell_i = \sum_t g_{it}` (materialized: ``d`` numbers per example).

*A parameter broadcast-added to a batch tensor* (``query + pos_bias_u.view(1, 1, H, d_k)`` in
RelPosMHAXL): :math:`\nabla_p \ell_i` is ``g`` of example ``i`` summed over the broadcast axes.

*A Linear whose input is shared by every example* (leading axis 1: RelPosMHAXL's ``linear_pos`` on
the positional embeddings ``[1, 2T-1, d]``): its output ``P`` is shared too, and the batch sum in
:math:`\partial \sum_i \ell_i / \partial P` would mix the examples. ``P`` (through views that keep
the leading axis first) meets the batch in ``batch @ P``; there ``P`` is expanded to the batch size,
which changes no value, so the backward returns :math:`\partial \ell_i / \partial P` row by row, and
the Linear rule applies with the shared input.

Linear inputs may be time-first (SpeechBrain's feed-forward runs on ``[T, N, d]``): the batch axis
is the only leading axis of the batch's size.

A parameter used more than once in a forward (shared weights) gets the per-example gradient of the
*sum* of its uses: the uses of one Linear/convolution layout are concatenated along ``t`` (the sum
over ``t`` then runs over every use, so the ghost form stays exact), other mixes are materialized
and added. Norms are of sums, never sums of norms.

Everything else falls back, for the parameters concerned only, to exact per-example gradients by
``vmap`` (:func:`privasr.per_sample.shard_grads_vmap` with the other parameters frozen), with one
logged note naming them: a parameter (or a view of it) seen by any other operation whose result
needs a gradient, one fed to a known operation whose input has no single axis of the batch's size
(e.g. ``T == N`` for a time-first input), and a trainable parameter never seen at all. On privasr's
Conformer-CTC nothing falls back (``tests/test_ghost.py``).

The clipped sum :math:`\sum_i f_i \nabla \ell_i` (factors from
:func:`privasr.clipping.clip_factors`) is formed by book-keeping from the same ``a`` and ``g``
(output gradients scaled by :math:`f_i`: one backward in all), or, ``route="backward"``, by a
second backward of :math:`\sum_i f_i \ell_i`. Non-finite examples are dropped as
:func:`~privasr.clipping.clip_factors` says: their rows are replaced by zeros (``torch.where``, never
``0 * NaN``).

*Units*: with ``num_units=K`` the batch of ``N`` examples is ``K`` consecutive groups of ``N/K``
(the cores of :func:`privasr.per_sample.split_into_shards`) and every norm is of a group's gradient,
so PCC with ``B > 1`` examples per core is covered too: a core's Linear gradient is the same sum
over the concatenated positions of its examples. ``loss_fn`` must then return the sum over cores of
each core's loss (see :func:`summed_shard_loss`).

Assumptions (checked where cheap, otherwise tested on the Conformer): batch first; an operation's
output is not modified in place before the backward (checked: a clear error); dropout draws one
mask per example of the batch, so in training mode the gradients are those of the batch's masks,
not of vmap's (``randomness="different"``) draws.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from privasr.clipping import clip_factors, core_norms
from privasr.per_sample import shard_grads_vmap, trainable_parameters

logger = logging.getLogger(__name__)

LossFn = Callable[..., torch.Tensor]
ROUTES = ("bookkeeping", "backward")

_LINEAR = {F.linear}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}
_LAYER_NORM = {F.layer_norm}
_ALIASING = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
_ADD = {torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.add}
_SHARED_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute, torch.permute}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_noted: set = set()  # fallback sets already logged (one note per set, not one per step)


# -- the pieces of one example's gradient ------------------------------------------------------------
class _Seq:
    """A weight gradient of the form ``sum_t g[i,k,t]^T a[i,k,t]`` per group ``k``.

    ``a``: ``[N, G, L, d_in]``, ``g``: ``[N, G, L, d_out]``; the parameter is ``[G*d_out, d_in]``
    (reshaped to its own shape), which is how Linear (``G = 1``) and grouped convolutions lay out
    their weights. In the materialized form the per-unit gradients are formed once and serve both
    the norms and the clipped sum.
    """

    def __init__(self, a: torch.Tensor, g: torch.Tensor):
        self.a, self.g = a, g
        self._grads: Optional[torch.Tensor] = None

    def layout(self) -> tuple:
        return self.a.shape[1], self.a.shape[3], self.g.shape[3]

    @property
    def ghost(self) -> bool:
        """Whether the ghost form is the cheaper one: ``d_in d_out >= L^2`` (mixed ghost clipping)."""
        _, d_in, d_out = self.layout()
        return d_in * d_out >= self.a.shape[2] ** 2

    def materialize(self) -> torch.Tensor:
        """Per-unit gradients ``[N, G*d_out*d_in]``."""
        if self._grads is None:
            self._grads = torch.einsum("ngli,nglo->ngoi", self.a, self.g).reshape(self.a.shape[0], -1)
        return self._grads

    def sq_norms(self) -> torch.Tensor:
        """``[N]`` squared norms: ghost form when :attr:`ghost`, else materialized."""
        if not self.ghost:
            return core_norms([self.materialize()]).pow(2)
        gram_a = self.a @ self.a.transpose(-1, -2)  # [N, G, L, L]
        gram_g = self.g @ self.g.transpose(-1, -2)
        return (gram_a * gram_g).sum((1, 2, 3))

    def weighted_sum(self, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``sum_{i kept} w_i grad_i`` (flat): book-keeping, output gradients scaled by ``w``."""
        if self._grads is not None:
            return weights.to(self._grads.dtype) @ _keep_rows(self._grads, keep)
        g = _keep_rows(self.g, keep) * weights.to(self.g.dtype).view(-1, 1, 1, 1)
        return torch.einsum("ngli,nglo->goi", _keep_rows(self.a, keep), g).reshape(-1)


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


def _keep_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of dropped units replaced by zeros (``where``, so NaN/Inf cannot leak through ``0 *``)."""
    if bool(keep.all()):
        return x
    mask = keep.view(-1, *([1] * (x.dim() - 1))).to(x.device)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# -- recording one forward ----------------------------------------------------------------------------
class _Site:
    """One recorded call: its output (whose gradient the backward returns) and how to read it."""

    def __init__(self, out: torch.Tensor, slots: dict, rule: Callable):
        self.out, self.version, self.slots, self.rule = out, out._version, slots, rule
        self.grad: Optional[torch.Tensor] = None

    def pieces(self) -> dict:
        """``{parameter name: _Seq or [N, numel] tensor}`` from the recorded input and ``self.grad``."""
        return self.rule(self.grad)


@dataclass
class _Shared:
    """A Linear output computed from an input shared by every example (leading axis 1), or a view of it.

    ``chain``: the views from the Linear's output to this tensor, ``("reshape", shape_before[1:])``
    or ``("permute", dims)``, undone in reverse on per-example gradients.
    """

    tensor: torch.Tensor
    names: dict
    a: torch.Tensor  # the shared input, [1, 1, L, d_in]
    chain: list


def _bind(args, kwargs, names, defaults):
    values = dict(zip(names, defaults))
    values.update(zip(names, args))
    values.update(kwargs)
    return [values[n] for n in names]


class _Recorder(TorchFunctionMode):
    """Records the calls of known operations on the tracked parameters; marks every other use."""

    def __init__(self, names: dict, batch: int):
        super().__init__()
        self.names = names  # id(parameter) -> name
        self.batch = batch
        self.aliases: dict = {}  # id(view of a parameter) -> (name, the view, kept alive)
        self.shared: dict = {}  # id(tensor shared by all examples) -> _Shared
        self.sites: list[_Site] = []
        self.uncovered: dict = {}  # name -> why it falls back
        self.seen: set = set()

    def _name(self, t) -> Optional[str]:
        return self.names.get(id(t)) if isinstance(t, torch.nn.Parameter) else None

    def _uncover(self, name: str, why: str) -> None:
        self.uncovered.setdefault(name, why)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            return self._linear(func, args, kwargs)
        if func in _CONV:
            return self._conv(func, args, kwargs)
        if func in _LAYER_NORM:
            return self._layer_norm(func, args, kwargs)
        if func in _ALIASING and self._name(args[0] if args else None):
            out = func(*args, **kwargs)
            self.aliases[id(out)] = (self._name(args[0]), out)
            self.seen.add(self._name(args[0]))
            return out
        if func in _SHARED_VIEWS and args and id(args[0]) in self.shared and self.shared[id(args[0])].tensor is args[0]:
            return self._shared_view(func, args, kwargs)
        if func in _MATMUL and len(args) == 2 and not kwargs:
            handled = self._shared_matmul(func, args)
            if handled is not None:
                return handled
        if func in _ADD and len(args) == 2 and not kwargs:
            handled = self._broadcast_add(func, args)
            if handled is not None:
                return handled
        out = func(*args, **kwargs)
        self._other_use(func, args, kwargs, out)
        return out

    # Every use the rules below do not cover makes its parameter fall back.
    def _tracked(self, t) -> Optional[str]:
        if not isinstance(t, torch.Tensor):
            return None
        name = self._name(t)
        if name is None and id(t) in self.aliases and self.aliases[id(t)][1] is t:
            name = self.aliases[id(t)][0]
        if name is None and id(t) in self.shared and self.shared[id(t)].tensor is t:
            name = self.shared[id(t)].names[0]
        return name

    def _tracked_all(self, t) -> list:
        if isinstance(t, torch.Tensor) and id(t) in self.shared and self.shared[id(t)].tensor is t:
            return list(self.shared[id(t)].names)
        name = self._tracked(t)
        return [] if name is None else [name]

    def _other_use(self, func, args, kwargs, out) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not any(t.requires_grad for t in outs):
            return  # .size(), torch.equal, ... read a parameter without differentiating through it
        for t in tree_flatten((args, kwargs))[0]:
            for name in self._tracked_all(t):
                self.seen.add(name)
                self._uncover(name, f"used by {getattr(func, '__name__', func)}")

    def _batch_axis(self, x, leading: int, names, what) -> Optional[int]:
        """The axis among the first ``leading`` of ``x`` that is the batch: the only one of the batch's size.

        SpeechBrain's feed-forward runs time-first (``[T, N, d]``), so a Linear's batch axis is
        looked for; none, or more than one candidate (``T == N``), and the parameters fall back.
        """
        candidates = [d for d in range(leading) if x.shape[d] == self.batch] \
            if isinstance(x, torch.Tensor) and x.dim() > leading and self._tracked(x) is None else []
        if len(candidates) == 1:
            return candidates[0]
        for name in names:
            self._uncover(name, f"{what} input of shape {tuple(x.shape) if isinstance(x, torch.Tensor) else x} "
                                f"has {'no' if not candidates else 'more than one'} axis of the batch's size "
                                f"{self.batch}")
        return None

    def _record(self, out, slots, rule):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            self.sites.append(_Site(out, slots, rule))

    def _call(self, func, args, kwargs, x, weight, bias) -> tuple[dict, torch.Tensor]:
        """Run a layer op; ``({"weight"/"bias": name} of its tracked parameters, output)``."""
        names = {k: self._name(t) for k, t in (("weight", weight), ("bias", bias)) if self._name(t)}
        out = func(*args, **kwargs)
        self._check_misplaced(func, (x,), out)
        self.seen.update(names.values())
        return names, out

    def _linear(self, func, args, kwargs):
        x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"), (None, None, None))
        names, out = self._call(func, args, kwargs, x, weight, bias)
        if not names:
            return out
        if (self.batch > 1 and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1
                and self._tracked(x) is None and not x.requires_grad and out.requires_grad):
            # The same input for every example (RelPosMHAXL's positional embeddings): the examples'
            # gradients separate where the output meets them (see _shared_matmul).
            self.shared[id(out)] = _Shared(out, names, x.detach().reshape(1, 1, -1, x.shape[-1]), [])
            return out
        axis = self._batch_axis(x, x.dim() - 1 if isinstance(x, torch.Tensor) else 0, names.values(), "linear")
        if axis is None:
            return out
        a = x.detach().movedim(axis, 0).reshape(self.batch, 1, -1, x.shape[-1])

        def rule(g):
            g = g.movedim(axis, 0).reshape(self.batch, 1, -1, g.shape[-1])
            pieces = {}
            if "weight" in names:
                pieces[names["weight"]] = _Seq(a, g)
            if "bias" in names:
                pieces[names["bias"]] = g.sum((1, 2))
            return pieces

        self._record(out, names, rule)
        return out

    def _check_misplaced(self, func, inputs, out) -> None:
        """A parameter (or a view of one) fed where an activation is expected falls back."""
        for t in inputs:
            if self._tracked(t) is not None:
                self._other_use(func, (t,), {}, out)

    def _conv(self, func, args, kwargs):
        dims = _CONV[func]
        x, weight, bias, stride, padding, dilation, groups = _bind(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            (None, None, None, 1, 0, 1, 1))
        names, out = self._call(func, args, kwargs, x, weight, bias)
        if not names:
            return out
        if x.dim() != dims + 2 or self._batch_axis(x, 1, names.values(), f"conv{dims}d") != 0:
            return out
        saved = x.detach()
        kernel = tuple(weight.shape[2:])

        def rule(g):
            n, channels_out = g.shape[:2]
            g = g.reshape(n, groups, channels_out // groups, -1).transpose(2, 3)  # [N, G, L, d_out]
            pieces = {}
            if "weight" in names:
                cols = _im2col(saved, kernel, _tuple(stride, dims), _tuple(dilation, dims), padding)
                cols = cols.reshape(n, groups, -1, cols.shape[-1]).transpose(2, 3)  # [N, G, L, d_in]
                pieces[names["weight"]] = _Seq(cols, g)
            if "bias" in names:
                pieces[names["bias"]] = g.sum(2).reshape(n, -1)
            return pieces

        self._record(out, names, rule)
        return out

    def _layer_norm(self, func, args, kwargs):
        x, shape, weight, bias, eps = _bind(
            args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, None, None, 1e-5))
        names, out = self._call(func, args, kwargs, x, weight, bias)
        if not names:
            return out
        shape = tuple(shape)
        axis = self._batch_axis(x, x.dim() - len(shape), names.values(), "layer_norm")
        if axis is None:
            return out
        saved = x.detach()
        dims = tuple(range(1, x.dim() - len(shape)))  # the positions, once the batch axis is moved first

        def rule(g):
            g = g.movedim(axis, 0)
            pieces = {}
            if "weight" in names:
                normalized = F.layer_norm(saved, shape, None, None, eps).movedim(axis, 0)
                pieces[names["weight"]] = (g * normalized).sum(dims).reshape(g.shape[0], -1) if dims \
                    else (g * normalized).reshape(g.shape[0], -1)
            if "bias" in names:
                pieces[names["bias"]] = (g.sum(dims) if dims else g).reshape(g.shape[0], -1)
            return pieces

        self._record(out, names, rule)
        return out

    def _shared_view(self, func, args, kwargs):
        """A view of a shared output that keeps its leading axis of size 1 first stays shared."""
        record = self.shared[id(args[0])]
        out = func(*args, **kwargs)
        if func in (torch.Tensor.permute, torch.permute):
            dims = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
            dims = tuple(d % out.dim() for d in dims)
            ok, step = dims[:1] == (0,), ("permute", dims)
        else:
            ok, step = out.dim() >= 1 and out.shape[0] == 1, ("reshape", tuple(args[0].shape[1:]))
        if not ok or kwargs:
            self._other_use(func, args, kwargs, out)
            return out
        self.shared[id(out)] = _Shared(out, record.names, record.a, record.chain + [step])
        return out

    def _shared_matmul(self, func, args):
        """``batch @ shared`` (or ``shared @ batch``): the shared operand expanded to the batch, so the
        backward returns each example's gradient of it; the views back to the Linear's output
        undo themselves on those rows."""
        left, right = (isinstance(t, torch.Tensor) and id(t) in self.shared and self.shared[id(t)].tensor is t
                       for t in args)
        if left == right:
            return None
        index = 0 if left else 1
        shared, other = args[index], args[1 - index]
        if not (isinstance(other, torch.Tensor) and other.dim() == shared.dim() >= 3 and other.shape[0] == self.batch
                and self._tracked(other) is None):
            return None  # left to _other_use: falls back
        record = self.shared[id(shared)]
        expanded = shared.expand(self.batch, *shared.shape[1:])
        operands = (expanded, other) if index == 0 else (other, expanded)
        out = func(*operands)
        self.seen.update(record.names.values())
        names = record.names

        def rule(g):  # g: [N, *shared.shape[1:]] -> the Linear output's rows -> _Seq with the shared input
            for kind, value in reversed(record.chain):
                if kind == "permute":
                    g = g.permute(*[value.index(d) for d in range(len(value))])
                else:
                    g = g.reshape(self.batch, *value)
            g = g.reshape(self.batch, 1, -1, g.shape[-1])
            pieces = {}
            if "weight" in names:
                pieces[names["weight"]] = _Seq(record.a.expand(self.batch, -1, -1, -1), g)
            if "bias" in names:
                pieces[names["bias"]] = g.sum((1, 2))
            return pieces

        self._record(expanded, names, rule)
        return out

    def _broadcast_add(self, func, args):
        """``x + p`` with ``p`` a parameter (or a view of one) broadcast over the batch axis."""
        left, right = self._tracked(args[0]), self._tracked(args[1])
        if (left is None) == (right is None):
            return None
        name, param_view, other = (left, args[0], args[1]) if left else (right, args[1], args[0])
        out = func(*args)
        self.seen.add(name)
        if not out.requires_grad:
            return out
        shape = (1,) * (out.dim() - param_view.dim()) + tuple(param_view.shape)
        if not (isinstance(other, torch.Tensor) and other.dim() >= 1 and other.shape[0] == self.batch
                and out.shape[0] == self.batch and shape[0] == 1 and self._tracked(other) is None):
            self._uncover(name, f"added to a tensor of shape {tuple(getattr(other, 'shape', ()))} "
                                "that is not batch-first")
            return out
        dims = tuple(d for d in range(1, out.dim()) if shape[d] == 1 and out.shape[d] != 1)

        def rule(g):
            return {name: (g.sum(dims, keepdim=True) if dims else g).reshape(g.shape[0], -1)}

        self._record(out, {"param": name}, rule)
        return out


def _tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _im2col(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple, padding) -> torch.Tensor:
    """``[N, C, *spatial]`` -> columns ``[N, C*prod(kernel), L]`` in the weight's ``(c, k...)`` order."""
    dims = len(kernel)
    if padding == "valid":
        padding = (0,) * dims
    if padding == "same":  # torch's rule: the odd element of the total padding goes to the end
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in _tuple(padding, dims)]
    flat = [v for left_right in reversed(pads) for v in left_right]  # F.pad: last dim first
    x = F.pad(x, flat)
    if dims == 1:
        x, kernel, stride, dilation = x.unsqueeze(2), (1,) + kernel, (1,) + stride, (1,) + dilation
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


# -- one pass: forward under the recorder, one backward ---------------------------------------------
@dataclass
class GhostPass:
    """The recorded forward and backward of one batch: per-unit squared norms and clipped sums.

    Attributes:
        names: trainable parameter names, in :func:`privasr.per_sample.trainable_parameters` order.
        sq_norms: ``name -> [K]`` float64 squared norm of each unit's gradient of that parameter.
        losses: what ``loss_fn`` returned (detached).
        fallback: ``name -> reason`` of the parameters whose per-unit gradients were materialized
            by vmap.
    """

    names: list
    sq_norms: dict
    losses: torch.Tensor
    fallback: dict
    pieces: dict = field(repr=False, default_factory=dict)  # name -> list of _Seq / [K, numel]
    fallback_grads: dict = field(repr=False, default_factory=dict)  # name -> [K, *shape]
    graph: Optional[tuple] = field(repr=False, default=None)  # (losses, params) for route="backward"

    @property
    def norms(self) -> torch.Tensor:
        """``[K]`` float64: per-parameter squared norms combined in float64 (as core_norms does)."""
        return torch.stack([self.sq_norms[n] for n in self.names]).sum(0).sqrt()

    def weighted_sum(self, weights: torch.Tensor, keep: torch.Tensor, shapes: Sequence[torch.Size]
                     ) -> list[Optional[torch.Tensor]]:
        r"""Book-keeping: :math:`\sum_{i \in \text{keep}} w_i \nabla \ell_i` per parameter (None if unused)."""
        out = []
        for name, shape in zip(self.names, shapes):
            if name in self.fallback_grads:
                per_unit = _keep_rows(self.fallback_grads[name].reshape(len(weights), -1), keep)
                total = weights.to(per_unit.dtype) @ per_unit
            elif self.pieces.get(name):
                total = None
                for piece in self.pieces[name]:
                    if isinstance(piece, _Seq):
                        part = piece.weighted_sum(weights, keep)
                    else:
                        part = weights.to(piece.dtype) @ _keep_rows(piece, keep)
                    total = part if total is None else total + part
            else:
                out.append(None)
                continue
            out.append(total.reshape(shape))
        return out


def ghost_pass(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
               num_units: Optional[int] = None, keep_graph: bool = False) -> GhostPass:
    """Run ``loss_fn(*tensors)`` once under the recorder and take one backward (see the module doc).

    Args:
        loss_fn: per-example losses ``[N]`` (summed here), or a scalar equal to the sum over units of
            each unit's loss (whose gradient is therefore the sum of the units' gradients).
        num_units: ``K`` (default ``N``: one unit per example); must divide ``N``.
        keep_graph: keep the autograd graph (for ``route="backward"``).
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameter")
    batch = int(tensors[0].shape[0])
    num_units = batch if num_units is None else int(num_units)
    if num_units < 1 or batch % num_units:
        raise ValueError(f"num_units must divide the batch ({batch} examples), got {num_units}")
    for t in tensors:
        if t.shape[0] != batch:
            raise ValueError("every batch tensor must have the same first (batch) dimension")
    names = {id(p): n for n, p in named}
    recorder = _Recorder(names, batch)
    with recorder:
        losses = loss_fn(*tensors)
    if not isinstance(losses, torch.Tensor) or losses.dim() > 1 or (losses.dim() == 1 and losses.shape[0] != batch):
        raise ValueError(f"loss_fn must return per-example losses [{batch}] or their sum (a scalar), got "
                         f"{getattr(losses, 'shape', type(losses))}")
    if losses.dim() == 1 and num_units != batch:
        raise ValueError("with num_units < N, loss_fn must return the sum of the units' losses (a scalar)")
    total = losses.sum()
    if not total.requires_grad:
        raise ValueError("loss_fn's result does not depend on any trainable parameter")
    sites = recorder.sites
    for site in sites:
        if site.out._version != site.version:
            raise RuntimeError(
                f"an output of a layer using {sorted(site.slots.values())} was modified in place after it was "
                "computed, so its gradient cannot be read; make that operation out of place "
                "(e.g. masked_fill instead of masked_fill_)")
    grads = torch.autograd.grad(total, [s.out for s in sites], allow_unused=True, retain_graph=keep_graph) \
        if sites else ()
    fallback = dict(recorder.uncovered)
    for name in names.values():
        if name not in recorder.seen:
            fallback.setdefault(name, "not seen by any recorded operation")
    pieces: dict = {}
    with torch.no_grad():
        for site, g in zip(sites, grads):
            site.grad = torch.zeros_like(site.out) if g is None else g
            for name, piece in site.pieces().items():
                if name not in fallback:
                    seq = isinstance(piece, _Seq)
                    piece = _Seq(_to_units(piece.a, num_units, True), _to_units(piece.g, num_units, True)) if seq \
                        else _to_units(piece, num_units, False)
                    pieces.setdefault(name, []).append(piece)
            site.grad = site.out = None  # free as we go
        pieces = {name: _merge(parts) for name, parts in pieces.items()}
        sq_norms = {}
        for name, parts in pieces.items():
            sq = sum(p.sq_norms() if isinstance(p, _Seq) else core_norms([p]).pow(2) for p in parts)
            sq_norms[name] = sq.to(torch.float64)
    fallback_grads = _fallback_grads(model, loss_fn, tensors, num_units, fallback) if fallback else {}
    for name, g in fallback_grads.items():
        sq_norms[name] = core_norms([g]).pow(2)
    order = [n for n, _ in named]
    for name in order:
        sq_norms.setdefault(name, torch.zeros(num_units, dtype=torch.float64))
    graph = (losses, [p for _, p in named]) if keep_graph else None
    return GhostPass(order, {n: sq_norms[n] for n in order}, losses.detach(), fallback, pieces, fallback_grads, graph)


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
    return [sum(p.materialize() if isinstance(p, _Seq) else p for p in parts)]


def _fallback_grads(model, loss_fn, tensors, num_units, fallback: dict) -> dict:
    """Exact per-unit gradients of the fallback parameters only, by vmap with the others frozen."""
    key = (type(model).__name__, tuple(sorted(fallback)))
    if key not in _noted:
        _noted.add(key)
        logger.warning("ghost norms: %d parameter(s) fall back to vmap per-example gradients: %s",
                       len(fallback), "; ".join(f"{n} ({why})" for n, why in sorted(fallback.items())))
    frozen = [p for n, p in trainable_parameters(model) if n not in fallback]
    for p in frozen:
        p.requires_grad_(False)
    try:
        grads, _ = shard_grads_vmap(model, lambda *shard: loss_fn(*shard).sum(), tensors, num_units)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    names = [n for n, _ in trainable_parameters(model) if n in fallback]
    return dict(zip(names, grads))


# -- the public functions ---------------------------------------------------------------------------
def per_example_norms(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
                      num_units: Optional[int] = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """``(norms [K] float64, per-parameter squared norms {name: [K]}, losses)`` (see :func:`ghost_pass`).

    Group the per-parameter squared norms by layer (e.g. ``model.param_groups()``) and sum them for
    per-layer clipping.
    """
    result = ghost_pass(model, loss_fn, tensors, num_units)
    return result.norms, result.sq_norms, result.losses


def clipped_sum(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor], bound: float,
                method: str = "pcc", route: str = "bookkeeping", num_units: Optional[int] = None,
                ) -> tuple[list[Optional[torch.Tensor]], torch.Tensor, torch.Tensor]:
    r"""``(grads, norms, factors)``: :math:`\sum_i f_i \nabla\ell_i` per trainable parameter.

    ``factors`` come from :func:`privasr.clipping.clip_factors` (``method`` ``pcc`` for PEC/DP-SGD;
    non-finite units get 0 and are left out). ``route``: ``bookkeeping`` (from the recorded
    activations, one backward) or ``backward`` (a second backward of :math:`\sum_i f_i \ell_i`;
    needs per-example losses; dropped examples are left out by a fresh forward of the others).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; accepted: {', '.join(ROUTES)}")
    result = ghost_pass(model, loss_fn, tensors, num_units, keep_graph=route == "backward")
    norms = result.norms
    factors, _ = clip_factors(norms, method, bound)
    return _clipped(result, model, loss_fn, tensors, factors, route), norms, factors


def _clipped(result: GhostPass, model, loss_fn, tensors, factors: torch.Tensor, route: str):
    params = [p for _, p in trainable_parameters(model)]
    keep = torch.isfinite(result.norms)
    if route == "bookkeeping":
        return result.weighted_sum(factors, keep, [p.shape for p in params])
    losses, graph_params = result.graph
    if losses.dim() != 1:
        raise ValueError('route="backward" needs loss_fn to return per-example losses [N]')
    if not bool(keep.all()):  # 0 * NaN would poison the sum: forward the kept examples again
        index = torch.nonzero(keep).flatten()
        if index.numel() == 0:
            return [torch.zeros_like(p) for p in params]
        losses = loss_fn(*[t[index.to(t.device)] for t in tensors])
        factors = factors[index]
    weighted = (losses * factors.to(losses.dtype).to(losses.device)).sum()
    grads = torch.autograd.grad(weighted, graph_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def summed_shard_loss(shard_loss: LossFn, per_unit: int = 1, over_examples: str = "mean") -> LossFn:
    r"""A PrivateBrain shard loss -> the sum over the units (cores of ``per_unit`` examples) of their losses.

    privasr's shard losses are the mean (``loss_reduction: mean``, the toy) or the sum
    (``loss_reduction: sum``) over the shard's examples of a per-example term. For ``n`` examples
    in units of ``B = per_unit``, :math:`\sum_c L(\text{unit}_c)` is then ``(n / B) L(batch)`` (mean) or
    ``L(batch)`` (sum): one forward of the whole batch. A single unit gets its own loss, which is
    what the vmap fallback differentiates.
    """
    if over_examples not in ("mean", "sum"):
        raise ValueError(f"over_examples must be 'mean' or 'sum', got {over_examples!r}")
    if int(per_unit) < 1:
        raise ValueError(f"per_unit must be >= 1, got {per_unit}")

    def summed(*tensors):
        loss = shard_loss(*tensors)
        return loss * (tensors[0].shape[0] / int(per_unit)) if over_examples == "mean" else loss

    return summed


def accumulate(accumulator, model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
               num_units: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add this micro-batch's units (cores) to a :class:`privasr.distributed.CoreAccumulator` by ghost norms.

    Equal to ``accumulator.add_cores(per-unit vmap gradients)``: one recorded forward and backward
    give the units' norms, and :meth:`~privasr.distributed.CoreAccumulator.add_clipped_sum` takes
    them with the book-keeping weighted sum, for the factors the accumulator chooses (pcc's clip,
    apcc's 1/norm before :math:`b_t`, 1 for none/global; non-finite units dropped).
    Returns ``(norms, losses)``.
    """
    params = accumulator.params
    if [tuple(p.shape) for p in params] != [tuple(p.shape) for _, p in trainable_parameters(model)]:
        raise ValueError("the accumulator's parameters are not the model's trainable parameters in order; "
                         "build both from privasr.per_sample.trainable_parameters of the same module")
    result = ghost_pass(model, loss_fn, tensors, num_units)
    shapes = [p.shape for p in params]
    norms = accumulator.add_clipped_sum(result.norms, lambda factors, keep: result.weighted_sum(factors, keep, shapes))
    return norms, result.losses


__all__ = ["GhostPass", "ghost_pass", "per_example_norms", "clipped_sum", "summed_shard_loss", "accumulate",
           "ROUTES"]
