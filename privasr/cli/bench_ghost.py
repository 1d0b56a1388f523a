"""Per-example clipping (PEC) step cost by how per-example gradients are had: none, vmap, loop, ghost.

Every cell runs in a fresh Python process (so each peak is its own): build the Conformer-CTC of a
size, a seeded batch of utterances of unequal lengths, one warm-up step, then ``--repeats`` timed
steps (the median is reported). A step is:

``none``   one backward of the batch's mean loss (what plain training does; no clipping);
``vmap``, ``loop``, ``ghost``  PEC (pcc, one example per core) into a
:class:`~privasr.distributed.CoreAccumulator` through :func:`privasr.private_step.accumulate_cores`
(the step ``PrivateBrain`` and ``PerCoreClipping`` run): per-example gradients by ``vmap``, one backward
per example, or ghost norms and the book-keeping clipped sum (no per-example gradients).

Memory: the process's peak resident set (``resource.getrusage(...).ru_maxrss``) minus its resident
set just before the first step, i.e. what the step adds on top of the model and the batch (CPU).

    privasr-bench-ghost --sizes mini --batches 8 16      # or python tools/bench_ghost.py ...
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from privasr.cli import CliParser, positive_float, positive_int, run_cli

PROG = "privasr-bench-ghost"
MODES = ("none", "vmap", "loop", "ghost")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_cell(mode: str, size: str, batch: int, seconds: float, repeats: int, seed: int) -> dict:
    import torch

    from privasr.distributed import CoreAccumulator
    from privasr.models.sizes import build_model
    from privasr.per_sample import trainable_parameters
    from privasr.private_step import accumulate_cores

    torch.manual_seed(seed)
    model = build_model(size, 32, dropout=0.0).train()
    g = torch.Generator().manual_seed(seed)
    samples = int(seconds * 16000)
    wav_lens = torch.linspace(0.6, 1.0, batch)
    wavs = torch.randn(batch, samples, generator=g) * (torch.arange(samples) < (wav_lens[:, None] * samples))
    feats, feat_lens = model.features(wavs, wav_lens)
    tokens = torch.randint(1, 32, (batch, max(2, int(seconds * 8))), generator=g)
    token_lens = torch.linspace(0.5, 1.0, batch)
    tensors = (feats, feat_lens, tokens, token_lens)

    def shard_loss(f, fl, t, tl):
        out, out_lens = model.forward_features(f, fl)
        return model.loss(out, out_lens, t, tl, reduction="mean")

    params = [p for _, p in trainable_parameters(model)]

    def step():
        if mode == "none":
            return torch.autograd.grad(shard_loss(*tensors), params)
        acc = CoreAccumulator(params, "pcc", 1.0, "mean")
        accumulate_cores(acc, model, shard_loss, tensors, batch, mode, loss_reduction="mean")
        return acc.reduce()

    before = _rss_mib()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "size": size, "batch": batch, "time_s": statistics.median(times),
            "extra_mib": max(peak - before, 0.0)}


def markdown(rows: list[dict]) -> str:
    lines = ["| size | batch | mode | step time (s) | × none | peak extra RSS (MiB) | × none |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["batch"] == row["batch"] and r["mode"] == "none")
        mem_ratio = row["extra_mib"] / base["extra_mib"] if base["extra_mib"] > 0 else float("nan")
        lines.append(f"| {row['size']} | {row['batch']} | {row['mode']} | {row['time_s']:.3f} | "
                     f"{row['time_s'] / base['time_s']:.2f} | {row['extra_mib']:.0f} | {mem_ratio:.2f} |")
    return "\n".join(lines)


def build_parser() -> CliParser:
    parser = CliParser(prog=PROG, description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["mini"], help="model sizes (privasr.models.sizes)")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[8, 16], help="batch sizes (examples)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seconds", type=positive_float, default=1.0, help="longest utterance of the batch (s)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed steps per cell (after one warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", nargs=3, metavar=("MODE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    return parser


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cell:
        mode, size, batch = args.cell
        print(json.dumps(run_cell(mode, size, int(batch), args.seconds, args.repeats, args.seed)))
        return 0
    rows = []
    modes = ["none"] + [m for m in args.modes if m != "none"]
    for size in args.sizes:
        for batch in args.batches:
            for mode in modes:
                cmd = [sys.executable, "-m", "privasr.cli.bench_ghost", "--cell", mode, size, str(batch),
                       "--seconds", str(args.seconds), "--repeats", str(args.repeats), "--seed", str(args.seed)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    parser.exit(1, f"{PROG}: error: cell {mode} {size} {batch} failed\n")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{size} batch {batch} {mode}: {rows[-1]['time_s']:.3f} s, +{rows[-1]['extra_mib']:.0f} MiB",
                      file=sys.stderr)
    print(markdown(rows))
    return 0


def main(argv=None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
