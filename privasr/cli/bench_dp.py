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

    privasr-bench-dp --nproc 2 --batch 4 --seconds 2 --json bench_dp.json
"""
from __future__ import annotations

import sys

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


def _freeze_lowest_half(model, loss_fn, tensors, fraction: float) -> None:
    """LayerFreeze from one gradient of the batch: freeze ``fraction`` of the layers (the head stays)."""
    from privasr.dp.brain import LAYER_REGEX
    from privasr.freezing import LayerFreezer

    freezer = LayerFreezer(model, LAYER_REGEX)
    loss_fn(*tensors).backward()
    freezer.accumulate(model)
    model.zero_grad(set_to_none=True)
    freezer.select(fraction=fraction, exclude=[g for g in freezer.groups if g.endswith("head")])
    freezer.apply(model)


def dp_step_fn(args, model, batch, strategy):
    """A zero-argument DP-SGD step (or bench_clipping's step for its own strategies)."""
    if not strategy.startswith("dp-"):
        return _CLIPPING_STEP_FN(args, model, batch, strategy)
    import torch.distributed as dist

    from privasr.dp.brain import LAYER_REGEX
    from privasr.dp.noise import NoiseSource
    from privasr.dp.per_layer import PerLayerClipper
    from privasr.dp.step import DPSGDStep
    from privasr.ghost import summed_shard_loss

    mode, freeze, grad_mode = row_settings(strategy, args.grad_mode)
    feats, feat_lens = model.features(batch[0], batch[1])
    tensors = (feats, feat_lens, batch[2], batch[3])

    def loss_fn(f, fl, y, yl):
        log_probs, out_lens = model.forward_features(f, fl)
        return model.loss(log_probs, out_lens, y, yl, reduction="mean")

    if freeze:
        _freeze_lowest_half(model, loss_fn, tensors, args.freeze_fraction)
    clipper = PerLayerClipper(model.named_parameters(), 1.0, mode, LAYER_REGEX)
    ghost_loss = summed_shard_loss(loss_fn, 1, "mean")  # the CTC loss is a mean of per-example losses
    dp = DPSGDStep(model, clipper, noise_multiplier=1.0, expected_batch_size=float(args.batch * dist.get_world_size()),
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
    bench_clipping.model_arguments(p)
    p.set_defaults(seconds=2.0)
    args = p.parse_args(argv)
    for row in args.rows:
        if row != "none":
            try:
                row_settings(row)
            except ValueError as e:
                p.error(str(e))
    bench_clipping.check_model_arguments(p, args)
    args.rows = list(dict.fromkeys(args.rows))  # a row named twice is measured once
    if "none" not in args.rows:
        args.rows = ["none"] + args.rows
    return args


def _main(argv=None):
    args = parse_args(argv)
    return bench_clipping.run_rows(args, args.rows, measure, f"rows without a route: {args.grad_mode}; -freeze rows: "
                                   f"{args.freeze_fraction:.0%} of the layers frozen; ", prog=PROG)


def main(argv=None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2; a worker died: one line, 1)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
