r"""Taps: where the backward hands each recorded layer's output gradient to the recorder.

Every recorded output ``out`` reaches the model through :class:`_Tap`, an identity whose backward
calls its :class:`_Site` with :math:`g = \partial \sum_i \ell_i / \partial\,\text{out}` the moment
the backward reaches that layer. The layer's pieces (and, once all its uses are in, its norm) are
formed then and ``g`` is freed unless the clipped sum needs it, so never all layers' output
gradients are held at once.

The backward is taken for one scalar leaf, the *anchor*, that every tap takes as a (gradient-free)
input: every tap is then on a path to it, the backward runs as far as the earliest tap, and no
parameter gradient (no weight-gradient product of an ordinary backward) is ever formed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # the recorder imports this module
    from privasr.ghost.recorder import _Recorder


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
