r"""The exactness table of :mod:`privasr.ghost`, per layer type, on privasr's own models.

For each case (a real model on a padded fp32 batch of utterances of unequal lengths) one
:func:`~privasr.ghost.ghost_pass` is set against ``torch.func`` per-example gradients
(:func:`privasr.per_sample.shard_grads_vmap`, the reference), parameter by parameter:

* **norms**: :math:`\max_i |\hat n_{ip} - n_{ip}| / n_{ip}`, the per-example norm of parameter
  :math:`p`'s gradient by ghost (:math:`\hat n`) and by vmap (:math:`n`);
* **clipped sum**: :math:`\lVert \hat s_p - s_p \rVert_\infty / \lVert s_p \rVert_\infty` with
  :math:`s_p = \sum_i f_i \nabla_p \ell_i`, :math:`f_i = \min(1, b / \lVert \nabla \ell_i \rVert)`
  (:func:`privasr.clipping.clip_factors`, ``pcc``; ``b`` the median norm, so some examples are
  clipped and some not); ghost's :math:`\hat s` is the book-keeping sum with ghost's own factors.

The table gives, per layer type and case, the worst parameter's two errors (max relative error);
the cases' table adds the whole gradient's norm and the *fp32 floor*, the loop's per-example norms
against vmap's (two exact routes: what fp32 rounding alone gives).

Each parameter is filed under the layer type of its recorded uses
(:attr:`privasr.ghost.GhostPass.kinds`, e.g. ``"Conv1d depthwise weight, materialized"``); the
table keeps the worst parameter of each type. A parameter no rule covers is listed with the
reason it falls back to exact vmap gradients (:func:`fallbacks`).

    python -m privasr.ghost.report                       # every case, tiny models
    python -m privasr.ghost.report --cases ctc --size mini --seconds 2
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from privasr.clipping import clip_factors, core_norms
from privasr.ghost.front import summed_shard_loss
from privasr.ghost.passes import ghost_pass
from privasr.per_sample import shard_grads_loop, shard_grads_vmap, trainable_parameters

FALLBACK = "fallback to vmap"


@dataclass
class ParamRow:
    """One parameter of one case: its layer type and ghost's errors against vmap."""

    case: str
    name: str
    kind: str
    numel: int
    norm_error: float
    sum_error: float
    floor: float  # the loop's norm error against vmap: fp32 rounding between two exact routes


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |got - expected| / max |expected|`` (0 when both are zero)."""
    scale = float(expected.abs().max())
    diff = float((got - expected).abs().max())
    return diff / scale if scale > 0 else diff


def _norm_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max_i |got_i - expected_i| / expected_i`` over per-example norms (a zero norm: its absolute error)."""
    return float(((got - expected).abs() / expected.clamp(min=torch.finfo(torch.float64).tiny)).max())


def compare(case: str, model: torch.nn.Module, loss_fn: Callable, tensors) -> tuple[list[ParamRow], float]:
    """``(rows, whole-gradient norm error)``: ghost against vmap, parameter by parameter (module doc).

    Each row also has the *floor*: the same norm error of the loop's per-example gradients (one
    backward per example, :func:`privasr.per_sample.shard_grads_loop`) against vmap's, the fp32
    rounding between two exact routes.

    ``loss_fn(*batch)``: per-example losses ``[N]`` or their sum, as :func:`~privasr.ghost.ghost_pass`
    takes; each example's loss alone is ``loss_fn`` of that example (what vmap differentiates).
    """
    result = ghost_pass(model, loss_fn, tensors)
    ref, _ = shard_grads_vmap(model, lambda *shard: loss_fn(*shard).sum(), tensors, tensors[0].shape[0])
    n = tensors[0].shape[0]
    loop = [[g if g is not None else torch.zeros_like(p) for g, (_, p) in zip(grads, trainable_parameters(model))]
            for grads, _ in shard_grads_loop(model, lambda *shard: loss_fn(*shard).sum(), tensors, n)]
    ref_norms = core_norms(ref)
    bound = float(ref_norms.median())
    ref_factors, _ = clip_factors(ref_norms, "pcc", bound)
    factors, _ = clip_factors(result.norms, "pcc", bound)
    params = [p for _, p in trainable_parameters(model)]
    sums = result.weighted_sum(factors, torch.isfinite(result.norms), [p.shape for p in params])
    rows = []
    for index, (name, p, g, got) in enumerate(zip(result.names, params, ref, sums)):
        expected_norms = core_norms([g])
        floor = _norm_error(torch.stack([core_norms([grads[index].unsqueeze(0)])[0] for grads in loop]),
                            expected_norms)
        expected_sum = torch.einsum("i,i...->...", ref_factors.to(g.dtype), g)
        sum_error = _relative(torch.zeros_like(p) if got is None else got, expected_sum)
        rows.append(ParamRow(case, name, result.kinds[name], p.numel(),
                             _norm_error(result.sq_norms[name].sqrt(), expected_norms), sum_error, floor))
    whole = _norm_error(result.norms, ref_norms)
    return rows, whole


# -- the cases: privasr's models on padded batches -----------------------------------------------------
def _utterances(n: int, seconds: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    samples = int(seconds * 16000)
    lens = torch.linspace(1.0, 0.55, n)
    wavs = torch.randn(n, samples, generator=g) * (torch.arange(samples) < (lens[:, None] * samples).round())
    return wavs, lens, g


def asr_case(kind: str, size: str, seconds: float, n: int = 3, seed: int = 0):
    """A Conformer-CTC or Conformer-transducer, the recipe's mean shard loss summed over examples."""
    from privasr.models.sizes import build_model

    torch.manual_seed(seed)
    model = build_model(size, 12, kind=kind, dropout=0.0).eval()
    wavs, lens, g = _utterances(n, seconds, seed)
    feats, feat_lens = model.features(wavs, lens)
    tokens = torch.randint(1, 12, (n, 5), generator=g)
    token_lens = torch.linspace(1.0, 0.6, n)

    def shard_loss(f, fl, t, tl):
        out, out_lens = model.forward_features(f, fl, t) if kind == "transducer" else model.forward_features(f, fl)
        return model.loss(out, out_lens, t, tl, reduction="mean")

    return model, summed_shard_loss(shard_loss, 1, "mean"), (feats, feat_lens, tokens, token_lens)


def bestrq_case(size: str, seconds: float, n: int = 3, seed: int = 0):
    """BEST-RQ (Conformer encoder + head) with each example's masked-frame loss (``reduction="per_example"``)."""
    from privasr.models.bestrq import BestRQ
    from privasr.ssl.pretrained import build_encoder

    torch.manual_seed(seed)
    encoder = build_encoder(size, dropout=0.0)
    model = BestRQ(encoder, 80, encoder.d_model, codebook_size=16, mask_prob=0.3, mask_span=2, seed=seed,
                   encoder_method="encode").eval()
    wavs, lens, _ = _utterances(n, seconds, seed)
    feats, feat_lens = model.encoder.features(wavs, lens)
    batch = model.prepare(feats, feat_lens)

    def example_losses(*t):
        return model.loss(*t, reduction="per_example")

    return model, example_losses, (batch.inputs, feat_lens, batch.targets, batch.mask)


class Patterns(torch.nn.Module):
    """Layer types the models above do not have, and two uses no rule covers (they fall back).

    A grouped strided Conv1d and a Conv2d in the ghost form, a Linear called twice (its norm is that of
    the summed gradient), an elementwise scale and a weight also read outside its Linear.
    """

    def __init__(self, d: int = 6):
        super().__init__()
        self.grouped = torch.nn.Conv1d(d, d, 3, stride=2, padding=1, groups=2)
        self.conv2d = torch.nn.Conv2d(1, 24, 3, padding=1)  # 9 * 24 >= (2 * 6)^2: ghost form
        self.twice = torch.nn.Linear(d, d)
        self.scale = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.read = torch.nn.Linear(d, d)

    def forward(self, x):  # x [N, T, d]
        h = self.grouped(x.transpose(1, 2)).transpose(1, 2)  # [N, T/2, d]
        h = h + self.conv2d(h.unsqueeze(1)).mean(1)
        h = self.twice(torch.tanh(self.twice(h)))
        return self.read(h) * self.read.weight.sum(0) * self.scale


def patterns_case(n: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = Patterns()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 6, generator=g)
    x[1:, 3:] = 0.0  # padded frames

    def losses(x):
        return model(x).pow(2).sum((1, 2))

    return model, losses, (x,)


CASES = {
    "ctc": ("Conformer-CTC", lambda a: asr_case("ctc", a.size, a.seconds)),
    "bestrq": ("BEST-RQ", lambda a: bestrq_case(a.size, a.seconds)),
    "transducer": ("Conformer transducer", lambda a: asr_case("transducer", a.size, a.seconds)),
    "patterns": ("patterns (toy)", lambda a: patterns_case()),
}


def run(cases, size: str = "tiny", seconds: float = 1.5) -> tuple[list[ParamRow], dict]:
    """``(parameter rows, {case: whole-gradient norm error})`` of the named cases."""
    args = argparse.Namespace(size=size, seconds=seconds)
    rows, whole = [], {}
    for key in cases:
        if key not in CASES:
            raise ValueError(f"unknown case {key!r}; cases: {', '.join(CASES)}")
        title, build = CASES[key]
        model, loss_fn, tensors = build(args)
        case_rows, whole[title] = compare(title, model, loss_fn, tensors)
        rows += case_rows
    return rows, whole


def by_layer_type(rows: list[ParamRow]) -> list[dict]:
    """One row per layer type: the cases it appears in, its parameters, the worst errors."""
    table: dict = {}
    for r in rows:
        entry = table.setdefault(r.kind, dict(kind=r.kind, cases=[], params=0, numel=0, norm_error=0.0,
                                              sum_error=0.0, floor=0.0, example=r.name, per_case={}))
        if r.case not in entry["cases"]:
            entry["cases"].append(r.case)
        entry["params"] += 1
        entry["numel"] += r.numel
        for key in ("norm_error", "sum_error", "floor"):
            entry[key] = max(entry[key], getattr(r, key))
        norm, total = entry["per_case"].get(r.case, (0.0, 0.0))
        entry["per_case"][r.case] = (max(norm, r.norm_error), max(total, r.sum_error))
    return sorted(table.values(), key=lambda e: (e["kind"].startswith(FALLBACK), e["kind"]))


def fallbacks(rows: list[ParamRow]) -> list[tuple[str, str, str]]:
    """``(case, parameter, why)`` of every parameter whose per-example gradients vmap materializes."""
    return [(r.case, r.name, r.kind[len(FALLBACK) + 2:]) for r in rows if r.kind.startswith(FALLBACK)]


def markdown(rows: list[ParamRow], whole: Optional[dict] = None) -> str:
    from privasr.results_md import table_lines

    cases = list(dict.fromkeys(r.case for r in rows))
    header = ["layer type", "parameters (elements)", "e.g."] + [f"{case}: norms / clipped sum" for case in cases]
    lines = table_lines(header, [[e["kind"], f"{e['params']} ({e['numel']:,})", f"`{e['example']}`"]
                                 + [" / ".join(f"{v:.1e}" for v in e["per_case"][case]) if case in e["per_case"]
                                    else "" for case in cases] for e in by_layer_type(rows)])
    if whole:
        lines += [""] + table_lines(
            ["case", "whole-gradient norm: max rel. error", "norms, clipped sum: max over parameters",
             "loop's norms (fp32 floor)"],
            [[case, f"{error:.1e}", f"{max(r.norm_error for r in rows if r.case == case):.1e}, "
              f"{max(r.sum_error for r in rows if r.case == case):.1e}",
              f"{max(r.floor for r in rows if r.case == case):.1e}"] for case, error in whole.items()])
    listed = fallbacks(rows)
    if listed:
        lines += ["", "Falls back to exact vmap per-example gradients:"]
        lines += [f"- {case}: `{name}` ({why})" for case, name, why in listed]
    return "\n".join(lines)


def main(argv=None) -> int:
    from privasr.cli import CliParser, positive_float, run_cli

    def _main(argv):
        p = CliParser(prog="python -m privasr.ghost.report", description=__doc__.splitlines()[0])
        p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
        p.add_argument("--size", default="tiny", help="model size of the ctc / bestrq / transducer cases")
        p.add_argument("--seconds", type=positive_float, default=1.5,
                       help="longest utterance (s); long enough that some Linear layers are materialized")
        args = p.parse_args(argv)
        print(markdown(*run(args.cases, args.size, args.seconds)))
        return 0

    return run_cli(_main, argv, prog="python -m privasr.ghost.report")


if __name__ == "__main__":
    sys.exit(main())
