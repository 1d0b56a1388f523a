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

*When* (memory): every recorded output passes through an identity :class:`_Tap` whose backward
hands ``g`` to the recorder the moment the backward reaches that layer, so each layer's norm is
formed then and its ``g`` freed, never all layers' at once. What is kept until the clipped sum is
what the clipped sum needs, per layer: the per-unit gradients of materialized layers (LayerNorm,
biases, the depthwise and front-end convolutions), and ``a`` with ``g`` of ghost-form layers (their
weighted sum is one product, :math:`\sum_i f_i g_i^\top a_i`, of the size of an ordinary weight
gradient). ``route="backward"`` keeps nothing: norms only, then a second backward.
Convolutions' per-example gradients come from torch's own weight-gradient kernel with the batch
folded into the groups (no ``im2col`` columns held); ``im2col`` is formed, one layer at a time,
only for a ghost-form convolution with a kernel wider than 1.

The clipped sum :math:`\sum_i f_i \nabla \ell_i` (factors from
:func:`privasr.clipping.clip_factors`) is formed by book-keeping from the kept pieces (output
gradients scaled by :math:`f_i`: one backward in all), or, ``route="backward"``, by a second
backward of :math:`\sum_i f_i \ell_i` (memory of a plain step, the time of one more backward). Non-finite examples are dropped as
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
import math
import weakref
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
_SHARED_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.permute, torch.reshape, torch.permute}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_noted: set = set()  # fallback sets already logged (one note per set, not one per step)


# -- the pieces of one example's gradient ------------------------------------------------------------
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
            return core_norms([self.materialize()]).pow(2)
        gram_a = self.a @ self.a.transpose(-1, -2)  # [K, G, L, L]
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

    def weighted_sum(self, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``sum_{k kept} w_k grad_k`` (flat): book-keeping, output gradients scaled by ``w``."""
        if self._grads is not None:
            return weights.to(self._grads.dtype) @ _keep_rows(self._grads, keep)
        g = _keep_rows(self.g, keep) * weights.to(self.g.dtype).view(-1, 1, 1, 1)
        return torch.einsum("ngli,nglo->goi", _keep_rows(self.a, keep), g).reshape(-1)


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
            return core_norms([self.materialize()]).pow(2)
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

    def weighted_sum(self, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self._grads is not None:
            return weights.to(self._grads.dtype) @ _keep_rows(self._grads, keep)
        per = self.x.shape[0] // self.units
        weights, keep = weights.repeat_interleave(per), keep.repeat_interleave(per)  # per example
        g = _keep_rows(self.g, keep) * weights.to(self.g.dtype).view(-1, *([1] * (self.g.dim() - 1)))
        return self._weight_grad(_keep_rows(self.x, keep), g, 1).reshape(-1)


_PIECES = (_Seq, _Conv)

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
    return _to_units(piece, num_units, False)


def _keep_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of dropped units replaced by zeros (``where``, so NaN/Inf cannot leak through ``0 *``)."""
    if bool(keep.all()):
        return x
    mask = keep.view(-1, *([1] * (x.dim() - 1))).to(x.device)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# -- recording one forward, collecting during the backward -------------------------------------------
class _Tap(torch.autograd.Function):
    """Identity on a recorded output; its backward hands the output's gradient to the site first.

    ``anchor`` (a scalar leaf of the pass) puts every tap on a path to the one tensor the backward
    is taken for, so the backward runs as far as the earliest tap and forms no parameter gradient.
    """

    @staticmethod
    def forward(ctx, out, anchor, site):  # noqa: D102 (autograd.Function API)
        ctx.site = site
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ctx.site.arrive(grad)
        return grad, None, None


class _Site:
    """One recorded call: ``rule(g)`` turns its output gradient into ``{parameter name: piece}``."""

    def __init__(self, recorder: "_Recorder", slots: dict, rule: Callable):
        self.recorder, self.slots, self.rule = recorder, slots, rule

    def arrive(self, grad: torch.Tensor) -> None:
        self.recorder.arrive(self, grad)


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


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage (and version counter) ``t`` views."""
    return t if t._base is None else t._base


_IN_PLACE: dict = {}  # func -> whether its name says it writes its first argument (looked up once per func)


def _writes_in_place(func, kwargs) -> bool:
    if "out" in kwargs:
        return True
    flag = _IN_PLACE.get(func)
    if flag is None:
        name = getattr(func, "__name__", "")
        flag = _IN_PLACE[func] = (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
                                  or (name.startswith("__i") and name.endswith("__")))
    return flag


class _Recorder(TorchFunctionMode):
    """Records the calls of known operations on the tracked parameters; marks every other use.

    During the backward (:meth:`arrive`) it turns each output gradient into its layer's pieces,
    and once every use of a parameter has arrived, its squared norms; it then keeps only what the
    clipped sum needs (``keep_pieces``) or nothing.
    """

    def __init__(self, names: dict, batch: int, anchor: torch.Tensor):
        super().__init__()
        self.names = names  # id(parameter) -> name
        self.batch = batch
        self.anchor = anchor
        self.aliases: dict = {}  # id(view of a parameter) -> (name, the view, kept alive)
        self.shared: dict = {}  # id(tensor shared by all examples) -> _Shared
        self.outputs: dict = {}  # id(root of a recorded output) -> (weakref, version, parameter names)
        self.uses: dict = {}  # name -> recorded calls using it
        self.uncovered: dict = {}  # name -> why it falls back
        self.seen: set = set()
        # set by start_backward:
        self.collecting = False
        self.skip: set = set()
        self.num_units = batch
        self.keep_pieces = True
        self.pending: dict = {}  # name -> pieces arrived so far
        self.sq_norms: dict = {}  # name -> [K] float64
        self.pieces: dict = {}  # name -> compacted pieces, for the clipped sum

    # -- the forward
    def _name(self, t) -> Optional[str]:
        return self.names.get(id(t)) if isinstance(t, torch.nn.Parameter) else None

    def _uncover(self, name: str, why: str) -> None:
        self.uncovered.setdefault(name, why)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.outputs and _writes_in_place(func, kwargs):
            self._refuse_in_place(func, args, kwargs)
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

    def _refuse_in_place(self, func, args, kwargs) -> None:
        """An in-place write to a recorded output (or a view of one) is refused before it happens."""
        for t in ((args[0],) if args else ()) + tuple(tree_flatten(kwargs.get("out"))[0]):
            if isinstance(t, torch.Tensor):
                self._check_output(_root(t))

    def _check_output(self, root: torch.Tensor, version: Optional[int] = None) -> None:
        """Raise if ``root`` is a recorded output and is being (``version`` None) or was written in place."""
        entry = self.outputs.get(id(root))
        if entry is None or entry[0]() is not root:
            return
        if version is None or version != entry[1]:
            raise RuntimeError(
                f"an output of a layer using {sorted(entry[2])} was modified in place after it was computed, "
                "so its gradient cannot be read; make that operation out of place "
                "(e.g. masked_fill instead of masked_fill_)")

    def check_versions(self) -> None:
        """The recorded outputs still alive at the end of the forward have not been written in place."""
        for ref, version, _ in list(self.outputs.values()):
            root = ref()
            if root is not None:
                self._check_output(root, version=root._version)
        self.outputs.clear()

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
        # Called on (nearly) every operation of the forward: the common cases first, cheaply.
        if isinstance(out, torch.Tensor):
            if not out.requires_grad:
                return
        elif not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(out)[0]):
            return  # .size(), torch.equal, ... read a parameter without differentiating through it
        flat = args if not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args) \
            else tree_flatten((args, kwargs))[0]
        for t in flat:
            if not (isinstance(t, torch.nn.Parameter) or id(t) in self.aliases or id(t) in self.shared):
                continue
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
        """Register a call: ``out`` goes on through a :class:`_Tap` (what the model receives instead)."""
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return out
        for name in slots.values():
            self.uses[name] = self.uses.get(name, 0) + 1
        root = _root(out)
        self.outputs[id(root)] = (weakref.ref(root), root._version, list(slots.values()))
        return _Tap.apply(out, self.anchor, _Site(self, slots, rule))

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
        saved, batch = x.detach(), self.batch  # the storage autograd saves anyway: no copy

        def rule(g):  # views in the Conformer's layouts ([N, T, d] and time-first [T, N, d])
            pieces = {}
            if "weight" in names:
                pieces[names["weight"]] = _Seq(saved.movedim(axis, 0).reshape(batch, 1, -1, saved.shape[-1]),
                                               g.movedim(axis, 0).reshape(batch, 1, -1, g.shape[-1]))
            if "bias" in names:
                pieces[names["bias"]] = g.movedim(axis, 0).reshape(batch, -1, g.shape[-1]).sum(1)
            return pieces

        return self._record(out, names, rule)

    def _check_misplaced(self, func, inputs, out) -> None:
        """A parameter (or a view of one) fed where an activation is expected falls back."""
        for t in inputs:
            if self._tracked(t) is not None:
                self._other_use(func, (t,), {}, out)

    def _conv(self, func, args, kwargs):
        dims = _CONV[func]
        x, weight, bias, stride, padding, dilation, groups = bind_conv(args, kwargs)
        names, out = self._call(func, args, kwargs, x, weight, bias)
        if not names:
            return out
        if x.dim() != dims + 2 or self._batch_axis(x, 1, names.values(), f"conv{dims}d") != 0:
            return out
        saved, shape = x.detach(), tuple(weight.shape)
        pointwise = is_pointwise(shape[2:], stride, padding, dilation)
        stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
        pads = _pads(padding, shape[2:], dilation)

        def rule(g):
            n, channels_out = g.shape[:2]
            pieces = {}
            if "weight" in names:
                if pointwise:  # the columns are the input itself: views, as for a Linear
                    a = saved.reshape(n, groups, shape[1], -1).transpose(2, 3)
                    pieces[names["weight"]] = _Seq(a, g.reshape(n, groups, channels_out // groups, -1).transpose(2, 3))
                else:
                    symmetric = all(left == right for left, right in pads)
                    xp = saved if symmetric else F.pad(saved, [v for lr in reversed(pads) for v in lr])
                    padding_ = tuple(left for left, _ in pads) if symmetric else (0,) * dims
                    pieces[names["weight"]] = _Conv(xp, g, n, shape, stride, padding_, dilation, groups)
            if "bias" in names:
                pieces[names["bias"]] = g.reshape(n, channels_out, -1).sum(2)
            return pieces

        return self._record(out, names, rule)

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

        return self._record(out, names, rule)

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
        names = record.names
        self.seen.update(names.values())

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

        expanded = self._record(shared.expand(self.batch, *shared.shape[1:]), names, rule)
        return func(*((expanded, other) if index == 0 else (other, expanded)))

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

        return self._record(out, {"param": name}, rule)

    # -- the backward
    def start_backward(self, skip: set, num_units: int, keep_pieces: bool) -> None:
        self.collecting, self.skip, self.num_units, self.keep_pieces = True, set(skip), num_units, keep_pieces

    def arrive(self, site: _Site, grad: torch.Tensor) -> None:
        """A layer's output gradient, as the backward reaches it: its pieces now, a norm once all uses are in."""
        if not self.collecting or site.rule is None:
            return  # a second backward (route="backward") passes through
        rule, site.rule = site.rule, None  # the recorded input goes with it, unless a piece keeps it
        with torch.no_grad():
            for name, piece in rule(grad.detach()).items():
                if name in self.skip:
                    continue
                parts = self.pending.setdefault(name, [])
                parts.append(_in_units(piece, self.num_units))
                if len(parts) == self.uses[name]:
                    self._finish(name)

    def _finish(self, name: str) -> None:
        parts = _merge(self.pending.pop(name))
        sq = sum(p.sq_norms() if isinstance(p, _PIECES) else core_norms([p]).pow(2) for p in parts)
        self.sq_norms[name] = sq.to(torch.float64)
        if self.keep_pieces:
            self.pieces[name] = [p.compact() if isinstance(p, _PIECES) else p for p in parts]

    def finish_backward(self) -> None:
        """Parameters some of whose uses got no gradient: those uses contribute zero."""
        self.collecting = False
        with torch.no_grad():
            for name in list(self.pending):
                self._finish(name)

    def held_output_grads(self) -> list:
        """The output gradients this recorder references now (pending or kept for the clipped sum)."""
        held = []
        for parts in list(self.pending.values()) + list(self.pieces.values()):
            for p in parts:
                if isinstance(p, _PIECES):
                    held += p.output_grads()
        return held


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
        pieces: ``name -> [piece]``, what the clipped sum needs (empty with ``keep_pieces=False``):
            per-unit gradients ``[K, numel]`` (or a materialized :class:`_Seq` / :class:`_Conv`), or
            a ghost-form layer's recorded input and output gradient.
        recorded: ``name -> parameter`` of the parameters a recorded call used (a use whose output
            got no gradient adds zero).
    """

    names: list
    sq_norms: dict
    losses: torch.Tensor
    fallback: dict
    pieces: dict = field(repr=False, default_factory=dict)  # name -> list of _Seq / [K, numel]
    fallback_grads: dict = field(repr=False, default_factory=dict)  # name -> [K, *shape]
    graph: Optional[tuple] = field(repr=False, default=None)  # (losses, params) for route="backward"
    recorded: dict = field(repr=False, default_factory=dict)

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
                    if isinstance(piece, _PIECES):
                        part = piece.weighted_sum(weights, keep)
                    else:
                        part = weights.to(piece.dtype) @ _keep_rows(piece, keep)
                    total = part if total is None else total + part
            elif name in self.recorded:  # its recorded uses got no gradient
                total = torch.zeros_like(self.recorded[name])
            else:
                out.append(None)
                continue
            out.append(total.reshape(shape))
        return out


def ghost_pass(model: torch.nn.Module, loss_fn: LossFn, tensors: Sequence[torch.Tensor],
               num_units: Optional[int] = None, keep_graph: bool = False, keep_pieces: bool = True) -> GhostPass:
    """Run ``loss_fn(*tensors)`` once under the recorder and take one backward (see the module doc).

    Each layer's norm is formed as the backward reaches it; only what the clipped sum needs is kept.

    Args:
        loss_fn: per-example losses ``[N]`` (summed here), or a scalar equal to the sum over units of
            each unit's loss (whose gradient is therefore the sum of the units' gradients).
        num_units: ``K`` (default ``N``: one unit per example); must divide ``N``.
        keep_graph: keep the autograd graph (for ``route="backward"``).
        keep_pieces: keep what :meth:`GhostPass.weighted_sum` needs; False: norms only (nothing of
            the pass is held once it returns).
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
    anchor = torch.zeros((), requires_grad=True)  # every tap leads here: the backward stops at the earliest one
    recorder = _Recorder(names, batch, anchor)
    with recorder:
        losses = loss_fn(*tensors)
    recorder.check_versions()
    if not isinstance(losses, torch.Tensor) or losses.dim() > 1 or (losses.dim() == 1 and losses.shape[0] != batch):
        raise ValueError(f"loss_fn must return per-example losses [{batch}] or their sum (a scalar), got "
                         f"{getattr(losses, 'shape', type(losses))}")
    if losses.dim() == 1 and num_units != batch:
        raise ValueError("with num_units < N, loss_fn must return the sum of the units' losses (a scalar)")
    total = losses.sum()
    if not total.requires_grad:
        raise ValueError("loss_fn's result does not depend on any trainable parameter")
    fallback = dict(recorder.uncovered)
    for name in names.values():
        if name not in recorder.seen:
            fallback.setdefault(name, "not seen by any recorded operation")
    recorder.start_backward(set(fallback), num_units, keep_pieces)
    try:
        if recorder.uses:
            torch.autograd.grad(total, [anchor], allow_unused=True, retain_graph=keep_graph)
    finally:
        recorder.finish_backward()
    sq_norms = dict(recorder.sq_norms)
    fallback_grads = _fallback_grads(model, loss_fn, tensors, num_units, fallback) if fallback else {}
    for name, g in fallback_grads.items():
        sq_norms[name] = core_norms([g]).pow(2)
    if not keep_pieces:
        fallback_grads = {}
    order = [n for n, _ in named]
    for name in order:
        sq_norms.setdefault(name, torch.zeros(num_units, dtype=torch.float64))
    graph = (losses, [p for _, p in named]) if keep_graph else None
    recorded = {n: p for n, p in named if n in recorder.uses and n not in fallback}
    return GhostPass(order, {n: sq_norms[n] for n in order}, losses.detach(), fallback, recorder.pieces,
                     fallback_grads, graph, recorded)


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
    return [sum(p.materialize() if isinstance(p, _PIECES) else p for p in parts)]


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
    result = ghost_pass(model, loss_fn, tensors, num_units, keep_pieces=False)
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
    two_pass = route == "backward"
    result = ghost_pass(model, loss_fn, tensors, num_units, keep_graph=two_pass, keep_pieces=not two_pass)
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
           "ROUTES", "CONV_CHUNK_BYTES", "bind_conv", "is_pointwise"]
