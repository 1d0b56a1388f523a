r"""What per-example clipping holds in memory for one chunk of examples: vmap's gradients vs ghost's records.

Estimated from the **layer shapes** of one traced forward (a
:class:`~torch.overrides.TorchFunctionMode` that sees every ``linear`` / ``conv1d`` / ``conv2d`` /
``layer_norm`` call on a trained parameter, functional calls included), not measured. The trace
runs wherever the model is: on the ``meta`` device it costs nothing (the paper-scale YAML,
:func:`bestrq_estimate`), on a real one it is one forward without gradients.

With :math:`n` examples per chunk (``dp_micro_batch``), :math:`P` trained parameters and
:math:`s` bytes per element:

* **per-example gradients** (``vmap``): :math:`n P s` per chunk, :math:`B P s` for a batch of
  :math:`B` if it were vectorised at once;
* **ghost** (:mod:`privasr.ghost`, book-keeping), per recorded call of a layer with :math:`L`
  positions per example, :math:`G` groups of :math:`d_{in} \to d_{out}`. Each layer's output
  gradient reaches ghost when the backward does (a tap, not the end of the backward); its norm is
  formed then and only what the clipped sum needs stays:

  - *activations*: the layer's input, :math:`n L d_{in}` (a Linear on an input shared by the
    examples: once). Autograd saves these for any backward of the chunk -- vmap's and a plain one's
    too -- so they are the common baseline, not ghost's extra. Ghost keeps those of the ghost-form
    layers (*kept inputs*, a part of them: they share storage) until the clipped sum;
  - *output gradients* kept: :math:`n L G d_{out}` of every **ghost-form** weight
    (:math:`d_{in} d_{out} \ge L^2`, mixed ghost clipping): its clipped sum
    :math:`\sum_i f_i g_i^\top a_i` needs them. A materialized layer's output gradient is freed
    as soon as its per-example gradient is formed;
  - *materialized per-example gradients*, kept: :math:`n \cdot \text{numel}` of every weight with
    :math:`d_{in} d_{out} < L^2` (convolutions: torch's weight-gradient kernel, no ``im2col``), of
    every bias and LayerNorm parameter and of every parameter no traced call uses (broadcast
    biases; a vmap fallback is the same size);
  - *transient*, one layer at a time (the largest layer's is counted): a ghost-form weight's two
    Gram matrices, :math:`2 n G L^2`, plus, for a ghost-form convolution with a kernel wider
    than 1, its ``im2col`` columns :math:`n L G d_{in}` with :math:`d_{in} = (C_{in}/G) \prod k`.

  Ghost's extra is output gradients + materialized + transient: an upper bound on what it holds
  beyond the activations (which the backward frees as ghost's records grow); vmap's extra is
  :math:`n P s`. ``route="backward"`` (norms, then a second backward) keeps neither output
  gradients nor per-example gradients: its extra is the largest layer's transient (with its
  per-example gradient if materialized), on top of the graph retained for the second backward.

A weight used by several calls of one layout has its positions added (ghost concatenates them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from privasr.ghost import bind_conv, is_pointwise
from privasr.per_sample import trainable_parameters

_LINEAR = {F.linear}
_CONV = {torch.conv1d, torch.conv2d, F.conv1d, F.conv2d}
_LAYER_NORM = {F.layer_norm}
_GIB = 2.0 ** 30


@dataclass
class LayerShape:
    """One trained weight's use per example: ``groups`` x (``d_in`` -> ``d_out``) over ``positions``."""

    kind: str  # linear | conv | layer_norm
    weight: str
    names: tuple  # every trained parameter of the call (weight, bias)
    numel: dict  # name -> elements
    d_in: int
    d_out: int
    groups: int = 1
    positions: int = 1  # L, per example (a shared input: its own positions)
    shared_input: bool = False
    input_numel: int = 0  # elements of the input per example (convolutions)
    pointwise: bool = False  # a convolution whose columns are its input (privasr.ghost.is_pointwise)


class ShapeTracer(TorchFunctionMode):
    """Records the shapes of the layer calls on ``params`` (``{id: name}``) for a batch of ``batch``."""

    def __init__(self, names: Dict[int, str], batch: int):
        super().__init__()
        self.names, self.batch = names, int(batch)
        self.layers: Dict[str, LayerShape] = {}

    def _name(self, t) -> Optional[str]:
        return self.names.get(id(t)) if isinstance(t, torch.nn.Parameter) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _LINEAR or func in _CONV or func in _LAYER_NORM:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        x = args[0] if args else kwargs.get("input")
        key = "normalized_shape" if func in _LAYER_NORM else None
        weight = kwargs.get("weight", args[2 if key else 1] if len(args) > (2 if key else 1) else None)
        bias = kwargs.get("bias", args[3 if key else 2] if len(args) > (3 if key else 2) else None)
        names = tuple(n for n in (self._name(weight), self._name(bias)) if n)
        if not names or not isinstance(x, torch.Tensor):
            return
        numel = {self._name(t): t.numel() for t in (weight, bias) if self._name(t)}
        if func in _LINEAR:
            d_in, d_out = weight.shape[1], weight.shape[0]
            shared = self.batch > 1 and x.shape[0] == 1
            positions = x.numel() // d_in if shared else x.numel() // (self.batch * d_in)
            shape = LayerShape("linear", names[0], names, numel, d_in, d_out, 1, positions, shared)
        elif func in _CONV:
            _, _, _, stride, padding, dilation, groups = bind_conv(args, kwargs)
            groups = int(groups)
            d_in = weight.shape[1] * math.prod(weight.shape[2:])
            shape = LayerShape("conv", names[0], names, numel, d_in, weight.shape[0] // groups, groups,
                               math.prod(out.shape[2:]), input_numel=x.numel() // self.batch,
                               pointwise=is_pointwise(tuple(weight.shape[2:]), stride, padding, dilation))
        else:
            d = math.prod(weight.shape if weight is not None else bias.shape)
            shape = LayerShape("layer_norm", names[0], names, numel, d, d, 1, x.numel() // (self.batch * d))
        seen = self.layers.get(shape.weight)
        if seen is not None and (seen.kind, seen.d_in, seen.d_out, seen.groups) == (
                shape.kind, shape.d_in, shape.d_out, shape.groups):
            seen.positions += shape.positions  # one weight, several uses: ghost concatenates them
            seen.input_numel += shape.input_numel
        else:
            self.layers[shape.weight] = shape


def trace_layers(model: torch.nn.Module, fn: Callable[[], object], batch: int) -> List[LayerShape]:
    """Run ``fn()`` (a forward of ``batch`` examples through ``model``) and return its layer shapes."""
    names = {id(p): n for n, p in trainable_parameters(model)}
    tracer = ShapeTracer(names, batch)
    with torch.no_grad(), tracer:
        fn()
    return list(tracer.layers.values())


@dataclass
class MemoryEstimate:
    """Bytes per chunk of :attr:`chunk` examples (and, for per-example gradients, per batch)."""

    batch: float
    chunk: int
    trained_params: int
    element_size: int
    activations: int = 0
    kept_inputs: int = 0  # the ghost-form layers' inputs (a part of activations), held to the clipped sum
    im2col: int = 0  # the columns of the layer with the largest transient (ghost-form convolutions)
    output_grads: int = 0
    materialized: int = 0
    gram_peak: int = 0  # the Gram matrices of the layer with the largest transient
    two_pass_peak: int = 0  # route="backward": the largest layer's transient and per-example gradient
    layers: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def per_example_grads_batch(self) -> float:
        """:math:`B P s`: every example's gradient of one batch at once."""
        return self.batch * self.trained_params * self.element_size

    @property
    def vmap_extra(self) -> int:
        """:math:`n P s`: the per-example gradients one vmap call holds."""
        return self.chunk * self.trained_params * self.element_size

    @property
    def transient(self) -> int:
        """The largest one-layer transient of a ghost pass: Gram matrices and ``im2col`` columns."""
        return self.im2col + self.gram_peak

    @property
    def ghost_extra(self) -> int:
        """What ghost (book-keeping) holds beyond the chunk's activations, at most (see the module doc)."""
        return self.output_grads + self.materialized + self.transient

    def line(self) -> str:
        g = lambda b: f"{b / _GIB:.3g} GiB"  # noqa: E731
        return (f"per-example clipping memory (estimated from layer shapes): per-example gradients of a batch of "
                f"{self.batch:g}: {g(self.per_example_grads_batch)} ({self.batch:g} x {self.trained_params:,} "
                f"x {self.element_size} B); per chunk of {self.chunk}, beyond its activations ({g(self.activations)}, "
                f"held by every mode): vmap {g(self.vmap_extra)} vs ghost {g(self.ghost_extra)} (output grads "
                f"of ghost-form layers {g(self.output_grads)}, materialized {g(self.materialized)}, one layer's "
                f"Gram + im2col {g(self.transient)}; {self.layers} layers; two-pass ghost: "
                f"{g(self.two_pass_peak)})" + "".join(f"; {n}" for n in self.notes))


def estimate(layers: Sequence[LayerShape], model: torch.nn.Module, batch: float, chunk: int) -> MemoryEstimate:
    """The estimate of the module doc for ``chunk`` examples per call and an (expected) ``batch``."""
    trained = trainable_parameters(model)
    if not trained:
        raise ValueError("the model has no trained parameter")
    size = trained[0][1].element_size()
    est = MemoryEstimate(float(batch), int(chunk), sum(p.numel() for _, p in trained), size, layers=len(layers))
    n, covered = int(chunk), set()
    for layer in layers:
        covered.update(layer.names)
        length, g = layer.positions, layer.groups
        copies = 1 if layer.shared_input else n
        if layer.kind == "layer_norm":  # its input; weight and bias materialized, its output gradient freed
            est.activations += n * length * layer.d_in * size
            est.materialized += n * sum(layer.numel.values()) * size
            est.two_pass_peak = max(est.two_pass_peak, n * sum(layer.numel.values()) * size)
            continue
        inputs = n * layer.input_numel * size if layer.kind == "conv" else copies * length * layer.d_in * size
        est.activations += inputs
        biases = n * sum(v for k, v in layer.numel.items() if k != layer.weight) * size
        est.materialized += biases
        if layer.d_in * layer.d_out < length ** 2:  # materialized: its per-example gradient stays
            weight = n * layer.numel[layer.weight] * size
            est.materialized += weight
            est.two_pass_peak = max(est.two_pass_peak, weight + biases)
            continue
        est.kept_inputs += inputs
        est.output_grads += n * length * g * layer.d_out * size
        gram = 2 * n * g * length ** 2 * size
        cols = n * length * g * layer.d_in * size if layer.kind == "conv" and not layer.pointwise else 0
        if gram + cols > est.gram_peak + est.im2col:
            est.gram_peak, est.im2col = gram, cols
        est.two_pass_peak = max(est.two_pass_peak, gram + cols + biases)
    other = [(name, p.numel()) for name, p in trained if name not in covered]
    est.materialized += n * sum(v for _, v in other) * size
    if other:
        est.notes.append(f"{len(other)} parameter(s) outside linear/conv/layer_norm counted as materialized")
    return est


def bestrq_estimate(bestrq, frames: int, batch: float, chunk: int) -> MemoryEstimate:
    """:func:`estimate` for a :class:`privasr.models.bestrq.BestRQ` on ``chunk`` inputs of ``frames`` feature frames.

    The inputs live on the model's device: the ``meta`` device builds and traces the paper-scale
    model without allocating it.
    """
    device = next(bestrq.parameters()).device
    inputs = torch.zeros(chunk, frames, bestrq.feat_dim, device=device)
    lens = torch.ones(chunk, device=device)
    stacked = bestrq.num_stacked(frames)
    targets = torch.zeros(chunk, stacked, dtype=torch.long, device=device)
    mask = torch.ones(chunk, stacked, dtype=torch.bool, device=device)
    layers = trace_layers(bestrq, lambda: bestrq.loss(inputs, lens, targets, mask, reduction="per_example"), chunk)
    return estimate(layers, bestrq, batch, chunk)


def _main(argv=None) -> None:
    import tempfile

    from privasr.cli import CliParser, positive_int
    from privasr.cli.hparams import load_hparams

    parser = CliParser(prog="python -m privasr.dp.memory",
                       description="per-example clipping memory of a BEST-RQ DP YAML, built on the meta device")
    parser.add_argument("hparams", help="a BEST-RQ DP-SGD YAML (e.g. bestrq_dp_xl.yaml)")
    parser.add_argument("--seconds", type=float, default=None, help="utterance length (default: max_duration)")
    parser.add_argument("--batch", type=float, default=None,
                        help="examples per process per step (default: dp_batch_size, one process)")
    parser.add_argument("--chunk", type=positive_int, default=None, help="examples per call (default: dp_micro_batch)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        hparams = load_hparams(args.hparams, f"output_folder: {tmp}")
    seconds = args.seconds or float(hparams["max_duration"])
    frames = int(seconds * 100)  # 10 ms fbank hop
    chunk = args.chunk or int(hparams.get("dp_micro_batch", 8))
    batch = args.batch or float(hparams["dp_batch_size"])
    est = bestrq_estimate(hparams["bestrq"], frames, batch, chunk)
    print(f"{args.hparams} ({hparams.get('model_size')}, {seconds:g} s = {frames} frames): {est.line()}")


if __name__ == "__main__":
    import sys

    from privasr.cli import run_cli

    sys.exit(run_cli(_main, sys.argv[1:], prog="python -m privasr.dp.memory"))
