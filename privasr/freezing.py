r"""Gradient-based layer freezing (LayerFreeze, paper §4.2.3).

During the public warm-start, accumulate for every layer :math:`l` (a group of
:math:`D_l` parameters :math:`\theta_l`, see
:func:`privasr.dp.per_layer.group_parameters_by_layer`) the normalised squared
gradient norm

.. math::

    s_l = \frac{1}{D_l} \sum_t \big\|\nabla_{\theta_l} \mathcal{L}_t\big\|_2^2 ,

then freeze the layers with the lowest :math:`s_l` for the private phase. A frozen
layer has ``requires_grad=False``: it gets no gradient, no clipping budget and no
noise, which lowers the dimension of DP-SGD's noise.

Typical use::

    freezer = LayerFreezer(model)
    for batch in warm_start:            # public data
        loss(model, batch).backward()
        freezer.accumulate(model)
        optimizer.step(); optimizer.zero_grad()
    freezer.select(fraction=0.5)
    freezer.apply(model)
    freezer.save("exp/freeze.json"); print(freezer.summary())
"""
from __future__ import annotations

import json
import math
from typing import Dict, Iterable, List, Optional, Union

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from privasr.dp.per_layer import group_parameters_by_layer


@register_checkpoint_hooks
class LayerFreezer:
    r"""Accumulates per-layer gradient scores :math:`s_l` and freezes the lowest ones.

    Args:
        model: the model whose trainable parameters are grouped into layers; may be
            ``None`` if the state is then restored with :meth:`load_state_dict`/:meth:`load`.
        depth_or_regex: layer grouping (default :data:`privasr.dp.per_layer.LAYER_REGEX`: one
            group per Conformer block ``layers.<i>``, the front end, the final norm and each
            head, plus each other top-level module); see :func:`group_parameters_by_layer`.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None,
                 depth_or_regex: Union[int, str, None] = None):
        self.groups: Dict[str, List[str]] = {}
        self.sizes: Dict[str, int] = {}
        self._sums: Dict[str, float] = {}
        self.steps = 0
        self.frozen: List[str] = []
        if model is not None:
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.groups = group_parameters_by_layer(trainable, depth_or_regex)
            numel = dict((n, p.numel()) for n, p in trainable)
            self.sizes = {g: sum(numel[n] for n in names) for g, names in self.groups.items()}
            self._sums = {g: 0.0 for g in self.groups}

    # -- scoring -------------------------------------------------------------------
    def accumulate(self, model: torch.nn.Module) -> None:
        r"""Add :math:`\|\nabla_{\theta_l}\mathcal{L}_t\|^2` of the current ``.grad`` to each layer.

        Call after ``backward()`` (and before ``zero_grad``); parameters without a
        gradient contribute 0.
        """
        if not self.groups:
            raise ValueError("LayerFreezer has no layers: construct it with the model")
        params = dict(model.named_parameters())
        for group, names in self.groups.items():
            total = 0.0
            for name in names:
                if name not in params:
                    raise ValueError(f"model has no parameter {name!r}; "
                                     "give the model the freezer was built on")
                grad = params[name].grad
                if grad is not None:
                    total += float(grad.detach().double().pow(2).sum())
            self._sums[group] += total
        self.steps += 1

    def scores(self) -> Dict[str, float]:
        r""":math:`s_l = \frac{1}{D_l}\sum_t\|\nabla_{\theta_l}\mathcal{L}_t\|^2` per layer."""
        return {g: self._sums[g] / self.sizes[g] for g in self.groups}

    # -- selection -----------------------------------------------------------------
    def select(self, fraction: Optional[float] = None, count: Optional[int] = None,
               exclude: Iterable[str] = ()) -> List[str]:
        r"""Choose the layers with the lowest scores; they become :attr:`frozen`.

        Args:
            fraction: freeze :math:`\lfloor f K \rfloor` of the :math:`K` candidate layers, :math:`f\in[0,1]`.
            count: freeze exactly this many layers (give ``fraction`` or ``count``, not both).
            exclude: layers that must stay trainable (e.g. the head); not candidates.

        Returns:
            the frozen layer names, in model order (ties keep model order).
        """
        if (fraction is None) == (count is None):
            raise ValueError("give exactly one of fraction or count, "
                             f"got fraction={fraction!r}, count={count!r}")
        if self.steps == 0:
            raise ValueError("no gradients accumulated yet: call accumulate(model) after backward first")
        exclude = set(exclude)
        unknown = exclude - set(self.groups)
        if unknown:
            raise ValueError(f"exclude must name layers among {list(self.groups)}, "
                             f"got unknown {sorted(unknown)}")
        candidates = [g for g in self.groups if g not in exclude]
        if fraction is not None:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
            count = math.floor(fraction * len(candidates) + 1e-9)
        if int(count) != count or not 0 <= count <= len(candidates):
            raise ValueError(f"count must be an integer in [0, {len(candidates)}], got {count!r}")
        scores = self.scores()
        lowest = set(sorted(candidates, key=lambda g: scores[g])[: int(count)])
        self.frozen = [g for g in self.groups if g in lowest]
        return list(self.frozen)

    def apply(self, model: torch.nn.Module) -> List[str]:
        """Set ``requires_grad=False`` on every parameter of the frozen layers; return their names."""
        params = dict(model.named_parameters())
        names = [n for g in self.frozen for n in self.groups[g]]
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"model lacks parameters of frozen layers, e.g. {missing[0]!r}")
        for name in names:
            params[name].requires_grad_(False)
            params[name].grad = None
        return names

    # -- reporting and persistence -------------------------------------------------
    def summary(self) -> str:
        """A table of layers: parameter count, score, and whether frozen."""
        scores = self.scores()
        width = max([len("layer")] + [len(g) for g in self.groups])
        lines = [f"{'layer':<{width}}  {'params':>12}  {'score':>11}  frozen"]
        for g in self.groups:
            mark = "yes" if g in self.frozen else ""
            lines.append(f"{g:<{width}}  {self.sizes[g]:>12,}  {scores[g]:>11.4e}  {mark}")
        lines.append(f"{len(self.frozen)}/{len(self.groups)} layers frozen, "
                     f"{sum(self.sizes[g] for g in self.frozen):,}/{sum(self.sizes.values()):,} parameters; "
                     f"{self.steps} warm-start steps")
        return "\n".join(lines)

    def state_dict(self) -> Dict:
        """A JSON-serialisable dict of groups, sizes, accumulated sums, steps and frozen layers."""
        return {"groups": {g: list(n) for g, n in self.groups.items()}, "sizes": dict(self.sizes),
                "sums": dict(self._sums), "steps": self.steps, "frozen": list(self.frozen)}

    def load_state_dict(self, state: Dict) -> None:
        """Restore a :meth:`state_dict` (replaces everything)."""
        keys = {"groups", "sizes", "sums", "steps", "frozen"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"state must be a dict with keys {sorted(keys)}")
        if set(state["sizes"]) != set(state["groups"]) or set(state["sums"]) != set(state["groups"]):
            raise ValueError("state 'groups', 'sizes' and 'sums' must name the same layers")
        if not set(state["frozen"]) <= set(state["groups"]):
            raise ValueError("state 'frozen' must only name layers listed in 'groups'")
        self.groups = {g: list(n) for g, n in state["groups"].items()}
        self.sizes = {g: int(state["sizes"][g]) for g in self.groups}
        self._sums = {g: float(state["sums"][g]) for g in self.groups}
        self.steps, self.frozen = int(state["steps"]), list(state["frozen"])

    @mark_as_saver
    def save(self, path) -> None:
        """Write :meth:`state_dict` (plus the scores, for reading) as JSON."""
        state = dict(self.state_dict(), scores=self.scores())
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)

    @mark_as_loader
    def load(self, path, end_of_epoch: bool = False) -> None:
        """Read a file written by :meth:`save` (``end_of_epoch`` is ignored)."""
        with open(path, encoding="utf-8") as f:
            self.load_state_dict(json.load(f))
