r"""The recorder: one forward under a :class:`~torch.overrides.TorchFunctionMode`, the layer rules, the backward's book.

:class:`_Recorder` sees every torch call of the forward (functional calls too, not only modules).
For a call of a known operation on a trainable parameter it keeps the operation's input
activation ``a`` (the storage autograd saves anyway: a detached view, no copy) and sends the
output through a tap (:mod:`privasr.ghost.tap`) with a *rule* that turns the output gradient ``g``
into per-example pieces (:mod:`privasr.ghost.pieces`). Since the backward is of
:math:`\sum_i \ell_i` and row ``i`` of every recorded tensor belongs to example ``i`` alone
(batch first, no cross-example statistics), row ``i`` of ``g`` is
:math:`\partial \ell_i / \partial \text{out}_i`. The rules:

*Linear* (``F.linear``; inputs batch-first or time-first, SpeechBrain's feed-forward runs on
``[T, N, d]``: the batch axis is the only leading axis of the batch's size):
:math:`\nabla_W \ell_i = \sum_t g_{it} a_{it}^\top`, :math:`\nabla_b \ell_i = \sum_t g_{it}`.

*Convolutions* (``conv1d``/``conv2d``, pointwise, depthwise, grouped, any stride, dilation and zero
padding, ``'same'`` included): a Linear per group over ``im2col`` columns (:mod:`privasr.ghost.conv`);
a pointwise one's columns are its input (views, as for a Linear).

*LayerNorm* ``out = \hat x \odot w + b``: :math:`\nabla_w \ell_i = \sum_t g_{it} \odot \hat x_{it}`,
:math:`\nabla_b \ell_i = \sum_t g_{it}` (``\hat x`` recomputed from the saved input).

*Embedding* (``F.embedding``, indices with one axis of the batch's size): :math:`\nabla_W \ell_i =
\sum_t e_{x_{it}} g_{it}^\top`; a ``padding_idx`` row gets nothing; ``max_norm`` (rows renormalized in
place) and ``scale_grad_by_freq`` (counts over the whole batch) fall back.

*A parameter broadcast-added to a batch tensor* (``query + pos_bias_u.view(1, 1, H, d_k)`` in
RelPosMHAXL): :math:`\nabla_p \ell_i` is ``g`` of example ``i`` summed over the broadcast axes.

*A Linear whose input is shared by every example* (leading axis 1: RelPosMHAXL's ``linear_pos`` on
the positional embeddings ``[1, 2T-1, d]``): its output ``P`` is shared too, and the batch sum in
:math:`\partial \sum_i \ell_i / \partial P` would mix the examples. ``P`` (through views that keep
the leading axis first, :class:`_Shared`) meets the batch in ``batch @ P``; there ``P`` is expanded
to the batch size, which changes no value, so the backward returns
:math:`\partial \ell_i / \partial P` row by row, and the Linear rule applies with the shared input.

Any other use of a parameter (or a view of it) whose result needs a gradient, a known operation
whose input has no single axis of the batch's size, marks that parameter *uncovered*: it falls back
to vmap (:func:`privasr.ghost.passes._fallback_grads`). An in-place write to a recorded output (or a
view of one) is refused before it happens, and the versions of the outputs still alive are checked
at the end of the forward: its gradient could not be read otherwise.

During the backward (:meth:`_Recorder.arrive`) each output gradient becomes its layer's pieces at
once; when every use of a parameter has arrived, its squared norms are formed and only what the
clipped sum needs is kept (``keep_pieces``), or nothing. A materialized convolution is formed one
arrival later, after its own backward has run: its per-unit gradients (the front end's are the
largest kept tensor) are then not alive during that convolution's input-gradient computation,
the largest transient of the backward, while its ``x`` and ``g`` are held by autograd anyway
(mini Conformer, batch 16: the pass's peak 153 -> 142 MiB; the same numbers).
A recorded convolution whose input is larger than ``CONV_CHUNK_BYTES`` and needs a gradient runs
through :func:`privasr.ghost.conv.conv_in_chunks`: the same output, its input gradient formed a few
examples at a time, since torch's CPU kernel holds two input-sized buffers besides it over the whole
batch, the backward's peak with every ghost-form record held (the front end's second convolution:
mini, batch 16, the step's exact tensor peak 131.7 -> 113.7 MiB, ``none`` 104.0; the values bit for bit).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import privasr.ghost.pieces as ghost_pieces
from privasr.ghost.conv import _bind, _pads, _tuple, bind_conv, conv_in_chunks, is_pointwise
from privasr.ghost.pieces import _PIECES, _Conv, _Embed, _in_units, _merge, _Seq, sq_norms_of
from privasr.ghost.tap import _Site, _Tap

_LINEAR = {F.linear}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}
_LAYER_NORM = {F.layer_norm}
_EMBEDDING = {F.embedding}
_ALIASING = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
_ADD = {torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.add}
_SHARED_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.permute, torch.reshape, torch.permute}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


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



def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage (and version counter) ``t`` views."""
    return t if t._base is None else t._base


def _leaves(x) -> tuple:
    """The leaves of ``x`` as ``tree_flatten`` gives them; a flat tuple or list (``torch.Size``, a
    ``chunk``'s tensors, the positional arguments of most calls) and a lone object without it.

    ``tree_flatten`` costs ~30 us a call in Python, and ``_other_use`` meets ~115 such values a
    mini Conformer step (dropout's keyword arguments, sizes, chunks).
    """
    if isinstance(x, (tuple, list)):
        if not any(isinstance(t, (tuple, list, dict)) for t in x):
            return x
    elif not isinstance(x, dict):
        return (x,)
    return tree_flatten(x)[0]


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
        self.kinds: dict = {}  # name -> the layer types of its recorded uses ("Linear weight", ...), in order
        self.forms: dict = {}  # name -> "ghost form" | "materialized" (weights of Linear / convolutions)
        # set by start_backward:
        self.collecting = False
        self.skip: set = set()
        self.num_units = batch
        self.keep_pieces = True
        self.pending: dict = {}  # name -> pieces arrived so far
        self.deferred: list = []  # names whose pieces are all in, finished at the next arrival
        self.sq_norms: dict = {}  # name -> [K] float64
        self.pieces: dict = {}  # name -> compacted pieces, for the clipped sum

    # -- the forward
    def _name(self, t) -> Optional[str]:
        # By id alone: the tracked parameters are alive, so no other live object has their id
        # (isinstance(t, Parameter) runs Parameter's Python __instancecheck__: ~2600 calls a step).
        return self.names.get(id(t))

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
        if func in _EMBEDDING:
            return self._embedding(func, args, kwargs)
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
        elif not any(isinstance(t, torch.Tensor) and t.requires_grad for t in _leaves(out)):
            return  # .size(), torch.equal, ... read a parameter without differentiating through it
        flat = _leaves(args) if not kwargs else (*_leaves(args), *_leaves(tuple(kwargs.values())))
        for t in flat:
            if not (id(t) in self.names or id(t) in self.aliases or id(t) in self.shared):
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

    def _record(self, out, slots, rule, label: str):
        """Register a call: ``out`` goes on through a :class:`_Tap` (what the model receives instead).

        ``label`` names the layer type (``"Linear"``, ``"Conv1d depthwise"``, ...) for
        :attr:`privasr.ghost.GhostPass.kinds`; each parameter gets ``"<label> <role>"``.
        """
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return out
        for role, name in slots.items():
            self.uses[name] = self.uses.get(name, 0) + 1
            kinds = self.kinds.setdefault(name, [])
            kind = label if role == "param" else f"{label} {role}"
            if kind not in kinds:
                kinds.append(kind)
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

        return self._record(out, names, rule, "Linear" if axis == 0 else "Linear (time-first)")

    def _check_misplaced(self, func, inputs, out) -> None:
        """A parameter (or a view of one) fed where an activation is expected falls back."""
        for t in inputs:
            if self._tracked(t) is not None:
                self._other_use(func, (t,), {}, out)

    def _conv(self, func, args, kwargs):
        dims = _CONV[func]
        x, weight, bias, stride, padding, dilation, groups = bind_conv(args, kwargs)
        if self._name(weight) and isinstance(x, torch.Tensor) and x.dim() == dims + 2 and x.shape[0] == self.batch:
            # The same output; its input gradient formed a few examples at a time (the backward's peak)
            chunked = conv_in_chunks(x, weight, bias, stride, padding, dilation, groups, ghost_pieces.CONV_CHUNK_BYTES,
                                     lambda: not self.collecting)  # the ghost backward takes no weight gradient
            if chunked is not None:
                args, kwargs, func = (chunked,), {}, _identity
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

        kind = ("pointwise" if pointwise else "depthwise" if groups > 1 and shape[1] == 1
                else "grouped" if groups > 1 else "")
        return self._record(out, names, rule, f"Conv{dims}d {kind}".rstrip())

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

        return self._record(out, names, rule, "LayerNorm")

    def _embedding(self, func, args, kwargs):
        idx, weight, padding_idx, max_norm, _, scale_grad_by_freq, _ = _bind(
            args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
            (None, None, None, None, 2.0, False, False))
        names, out = self._call(func, args, kwargs, None, weight, None)
        if not names:
            return out
        name = names["weight"]
        if max_norm is not None or scale_grad_by_freq:
            # max_norm rescales rows in place during the forward; scale_grad_by_freq divides by counts over
            # the whole batch (a cross-example statistic): neither is a sum of per-example row gradients.
            self._uncover(name, "embedding with max_norm or scale_grad_by_freq")
            return out
        candidates = [d for d in range(idx.dim()) if idx.shape[d] == self.batch] if isinstance(idx, torch.Tensor) else []
        if len(candidates) != 1:
            self._uncover(name, f"embedding indices of shape {tuple(getattr(idx, 'shape', ()))} have "
                                f"{'no' if not candidates else 'more than one'} axis of the batch's size {self.batch}")
            return out
        axis, vocab, batch = candidates[0], weight.shape[0], self.batch
        rows = idx.movedim(axis, 0).reshape(batch, -1)
        if padding_idx is not None:  # its row gets no gradient: the lookups of it are left out
            padding_idx = padding_idx % vocab

        def rule(g):
            g = g.movedim(axis, 0).reshape(batch, rows.shape[1], -1)
            if padding_idx is not None:
                g = g.masked_fill((rows == padding_idx).unsqueeze(2), 0.0)
            return {name: _Embed(rows, g, vocab)}

        return self._record(out, names, rule, "Embedding")  # sparse=True: the same values, summed densely

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

        expanded = self._record(shared.expand(self.batch, *shared.shape[1:]), names, rule,
                                "Linear (input shared by the batch)")
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

        return self._record(out, {"param": name}, rule, "parameter broadcast-added to the batch")

    # -- the backward
    def start_backward(self, skip: set, num_units: int, keep_pieces: bool) -> None:
        self.collecting, self.skip, self.num_units, self.keep_pieces = True, set(skip), num_units, keep_pieces

    def arrive(self, site: _Site, grad: torch.Tensor) -> None:
        """A layer's output gradient, as the backward reaches it: its pieces now, a norm once all uses are in."""
        if not self.collecting or site.rule is None:
            return  # a second backward (route="backward") passes through
        rule, site.rule = site.rule, None  # the recorded input goes with it, unless a piece keeps it
        with torch.no_grad():
            self._finish_deferred()
            for name, piece in rule(grad.detach()).items():
                if name in self.skip:
                    continue
                parts = self.pending.setdefault(name, [])
                parts.append(_in_units(piece, self.num_units))
                if len(parts) == self.uses[name]:
                    if any(isinstance(p, _Conv) and not p.ghost for p in parts):
                        # Its per-unit gradients are formed at the next arrival, after the
                        # convolution's own backward: not alive during that input-gradient
                        # computation (a front end's largest transient), whose x and g autograd
                        # holds anyway.
                        self.deferred.append(name)
                    else:
                        self._finish(name)

    def _finish_deferred(self) -> None:
        while self.deferred:
            self._finish(self.deferred.pop())

    def _finish(self, name: str) -> None:
        raw = self.pending.pop(name)
        parts = _merge(raw)
        sq = None
        for p in parts:  # (not sum(): its 0 start is one more tensor op per parameter)
            part = p.sq_norms() if isinstance(p, _PIECES) else sq_norms_of(p)
            sq = part if sq is None else sq + part
        self.sq_norms[name] = sq.to(torch.float64)
        if any(isinstance(p, _PIECES) for p in raw):  # a Linear's / convolution's weight: which form
            ghost = len(parts) == 1 and isinstance(parts[0], _PIECES) and parts[0].ghost
            self.forms[name] = "ghost form" if ghost else "materialized"
        if self.keep_pieces:
            self.pieces[name] = [p.compact() if isinstance(p, _PIECES) else p for p in parts]

    def finish_backward(self) -> None:
        """Parameters some of whose uses got no gradient: those uses contribute zero."""
        self.collecting = False
        self.deferred.clear()  # still pending: finished below
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

