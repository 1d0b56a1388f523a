"""privasr-bench for DP-SGD: the cost of a DP step next to a non-private one, under real DDP.

Every row runs in its own fresh group of gloo (CPU) or nccl (GPU) processes, with the model,
batch, timing and memory measurement of :mod:`privasr.cli.bench_clipping` (imported, not copied). A
DP-SGD step is :class:`privasr.dp.step.DPSGDStep`, the object :class:`privasr.dp.brain.DPSGDBrain`
trains with: per-example gradients, clipping (flat or per-layer), the clipped sum + Gaussian noise
once (rank 0) in one SUM all-reduce, division by the expected batch; then an SGD update. Ratios are to ``none`` (one backward per process,
one all-reduce) measured in the same run.

Rows: ``none``; ``dp-<flat|uniform|dim>[-freeze][-<loop|vmap|ghost>]``: the clipping, with
``-freeze`` the lowest-score half of the layers (LayerFreeze scores from one gradient of the
batch) frozen first, so those layers get no per-example gradient, clipping or noise, and the
per-example route (default ``--grad-mode``): ``loop``/``vmap`` per-example gradients, or ``ghost``
(:func:`privasr.dp.step.ghost_clipped_sum`: ghost norms and book-keeping, none formed). The
default rows put the three routes side by side for flat and dim clipping.

``--hparams YAML`` (a BEST-RQ DP recipe, overrides after ``--``) times that recipe's own model
instead: its ``bestrq`` (encoder size, head, masking, dropout as the YAML builds them), its loss
(the masked-frame cross-entropy; per example, ``reduction="per_example"``, for ghost, as
:class:`privasr.ssl.brain.BestRQRecipe` gives DP-SGD), its ``layer_regex`` for the per-layer
groups, on the benchmark's random audio (BEST-RQ needs no transcripts); ``none`` is then the
recipe's non-private step on the same batch.

    privasr-bench-dp --nproc 2 --batch 4 --seconds 2 --json bench_dp.json
    privasr-bench-dp --hparams recipes/mini_tts/SSL/bestrq/hparams/bestrq_dp.yaml --nproc 1 --batch 16 \
        --rows none dp-flat-loop dp-flat-vmap dp-flat-ghost dp-dim-loop dp-dim-vmap dp-dim-ghost
"""
from __future__ import annotations

import functools
import sys
import tempfile

import torch

from privasr.cli import CliParser, bench_clipping, fraction, positive_int, run_cli

PROG = "privasr-bench-dp"
DEFAULT_ROWS = ["none", "dp-flat-loop", "dp-flat-vmap", "dp-flat-ghost", "dp-dim-loop", "dp-dim-vmap", "dp-dim-ghost",
                "dp-dim-freeze-ghost"]
DP_MODES = ("flat", "uniform", "dim")
GRAD_MODES = ("loop", "vmap", "ghost")


def row_settings(name: str, default_grad_mode: str = "loop"):
    """``(clip mode, freeze, grad mode)`` of a DP row name (``dp-<mode>[-freeze][-<grad mode>]``)."""
    parts = name.split("-")
    grad_mode = parts.pop() if len(parts) > 2 and parts[-1] in GRAD_MODES else default_grad_mode
    if parts[0] != "dp" or len(parts) not in (2, 3) or parts[1] not in DP_MODES or parts[2:] not in ([], ["freeze"]):
        raise ValueError(f"unknown row {name!r}; rows: none or dp-<{'|'.join(DP_MODES)}>[-freeze]"
                         f"[-<{'|'.join(GRAD_MODES)}>]")
    return parts[1], len(parts) == 3, grad_mode


def _freeze_lowest_half(model, loss_fn, tensors, fraction: float, layer_regex: str) -> None:
    """LayerFreeze from one gradient of the batch: freeze ``fraction`` of the layers (the head stays)."""
    from privasr.freezing import LayerFreezer

    freezer = LayerFreezer(model, layer_regex)
    loss_fn(*tensors).backward()
    freezer.accumulate(model)
    model.zero_grad(set_to_none=True)
    freezer.select(fraction=fraction, exclude=[g for g in freezer.groups if g.endswith("head")])
    freezer.apply(model)


def load_recipe(args) -> dict:
    """The ``--hparams`` YAML's objects (with its overrides; outputs in a fresh temporary folder)."""
    from privasr.cli.hparams import load_hparams, parse_arguments

    _, _, overrides = parse_arguments([args.hparams, *args.overrides])
    hparams = load_hparams(args.hparams, f"{overrides or ''}\noutput_folder: {tempfile.mkdtemp(prefix='bench_dp_')}")
    if not isinstance(hparams.get("bestrq"), torch.nn.Module):
        raise ValueError(f"{args.hparams} builds no `bestrq` module: --hparams takes a BEST-RQ DP recipe "
                         "(e.g. recipes/mini_tts/SSL/bestrq/hparams/bestrq_dp.yaml)")
    return hparams


def _recipe_model(args, device):
    """bench_clipping.build_model's stand-in under ``--hparams``: the recipe's ``bestrq``, its layer regex kept."""
    hparams = load_recipe(args)
    model = hparams["bestrq"].to(device)
    model.layer_regex = hparams.get("layer_regex")
    return model


def _bestrq_step_fn(args, model, batch, strategy):
    """The recipe's DP-SGD step on BEST-RQ (or its non-private step for ``none``), as BestRQRecipe defines them."""
    from privasr.dp.brain import LAYER_REGEX
    from privasr.private_step import PerCoreClipping

    feats, feat_lens = model.encoder.features(batch[0], batch[1])
    prepared = model.prepare(feats, feat_lens)
    tensors = (prepared.inputs, feat_lens, prepared.targets, prepared.mask)

    def loss_fn(*t):  # BestRQRecipe.shard_loss: pooled over the masked frames of the shard
        return model.loss(*t)

    def example_losses(*t):  # BestRQRecipe.example_losses: what DP-SGD's ghost mode clips per example
        return model.loss(*t, reduction="per_example")

    if strategy == "none":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
        return functools.partial(bench_clipping.clipping_step, PerCoreClipping(model, "none"), optimizer, loss_fn,
                                 tensors)
    return _dp_step(args, model, strategy, loss_fn, example_losses, tensors, model.layer_regex or LAYER_REGEX)


def dp_step_fn(args, model, batch, strategy):
    """A zero-argument DP-SGD step (or bench_clipping's step for its own strategies)."""
    if getattr(args, "hparams", None):
        return _bestrq_step_fn(args, model, batch, strategy)
    if not strategy.startswith("dp-"):
        return _CLIPPING_STEP_FN(args, model, batch, strategy)
    from privasr.dp.brain import LAYER_REGEX
    from privasr.ghost import summed_shard_loss

    feats, feat_lens = model.features(batch[0], batch[1])
    tensors = (feats, feat_lens, batch[2], batch[3])

    def loss_fn(f, fl, y, yl):
        log_probs, out_lens = model.forward_features(f, fl)
        return model.loss(log_probs, out_lens, y, yl, reduction="mean")

    ghost_loss = summed_shard_loss(loss_fn, 1, "mean")  # the CTC loss is a mean of per-example losses
    return _dp_step(args, model, strategy, loss_fn, ghost_loss, tensors, LAYER_REGEX)


def _dp_step(args, model, strategy, loss_fn, ghost_loss, tensors, layer_regex):
    """One DPSGDStep (the row's clipping and route) + SGD on ``tensors``, as a zero-argument step."""
    import torch.distributed as dist

    from privasr.dp.noise import NoiseSource
    from privasr.dp.per_layer import PerLayerClipper
    from privasr.dp.step import DPSGDStep

    mode, freeze, grad_mode = row_settings(strategy, args.grad_mode)
    if freeze:
        _freeze_lowest_half(model, loss_fn, tensors, args.freeze_fraction, layer_regex)
    clipper = PerLayerClipper(model.named_parameters(), 1.0, mode, layer_regex)
    world = dist.get_world_size() if dist.is_initialized() else 1  # (in-process, no group: one process)
    dp = DPSGDStep(model, clipper, noise_multiplier=1.0, expected_batch_size=float(args.batch * world),
                   noise=NoiseSource(0), grad_mode=grad_mode, micro_batch=args.micro_batch)
    optimizer = torch.optim.SGD(dp.params, lr=1e-5)

    def step():
        dp.backward(loss_fn, *tensors, ghost_loss_fn=ghost_loss)
        dp.reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


_CLIPPING_STEP_FN = bench_clipping._step_fn


def _worker(rank, world_size, port, args, row, out_path):
    """bench_clipping's worker (process group, timing, memory), building its step with dp_step_fn."""
    bench_clipping._step_fn = dp_step_fn  # in this spawned process only
    if args.hparams:
        bench_clipping.build_model = _recipe_model
    bench_clipping._worker(rank, world_size, port, args, row, out_path)


def measure(args, row):
    """Median step time and peak step memory of one row, in a fresh group of processes (a death: one line)."""
    return bench_clipping.spawn_row(_worker, args, row)


def parse_args(argv=None):
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                   help="none and dp-<flat|uniform|dim>[-freeze][-<loop|vmap|ghost>]")
    p.add_argument("--batch", type=positive_int, default=4,
                   help="utterances per process (the Poisson mean, fixed here)")
    p.add_argument("--tokens", type=positive_int, default=20, help="transcript length in tokens")
    p.add_argument("--grad-mode", choices=GRAD_MODES, default="loop",
                   help="per-example route of the rows that do not name one")
    p.add_argument("--micro-batch", type=positive_int, default=8, help="examples per vmap call or ghost pass")
    p.add_argument("--freeze-fraction", type=fraction, default=0.5, help="layers frozen in the -freeze rows, in [0, 1]")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps (>= 1)")
    p.add_argument("--hparams", metavar="YAML", help="time this BEST-RQ DP recipe's own model and loss instead of "
                   "the Conformer-CTC (--d-model, --layers, --heads, --vocab, --tokens then unused); recipe "
                   "overrides after --, e.g. -- --model_size tiny")
    bench_clipping.model_arguments(p)
    p.set_defaults(seconds=2.0)
    args = p.parse_with_overrides(argv)
    if args.overrides and not args.hparams:
        p.error(f"recipe overrides ({' '.join(args.overrides)}) need --hparams")
    for row in args.rows:
        if row != "none":
            try:
                row_settings(row)
            except ValueError as e:
                p.error(str(e))
    if args.hparams:  # built once here, so a bad YAML or override is one line before any process starts
        encoder = load_recipe(args)["bestrq"].encoder
        args.d_model, args.layers = encoder.d_model, len(encoder.conformer.layers)  # the settings line tells them
    else:
        bench_clipping.check_model_arguments(p, args)
    args.rows = list(dict.fromkeys(args.rows))  # a row named twice is measured once
    if "none" not in args.rows:
        args.rows = ["none"] + args.rows
    return args


def _main(argv=None):
    args = parse_args(argv)
    model = f"BEST-RQ of {args.hparams} {' '.join(args.overrides)}; " if args.hparams else ""
    return bench_clipping.run_rows(args, args.rows, measure, f"{model}rows without a route: {args.grad_mode}; "
                                   f"-freeze rows: {args.freeze_fraction:.0%} of the layers frozen; ", prog=PROG)


def main(argv=None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2; a worker died: one line, 1)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
