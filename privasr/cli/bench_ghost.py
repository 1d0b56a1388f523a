"""Per-example clipping (PEC) step cost by how per-example gradients are had: none, vmap, loop, ghost.

Every cell (model size x batch x mode) runs in a fresh Python process (so each peak is its own):
build the Conformer-CTC of a size, a seeded batch of utterances of unequal lengths, one warm-up
step, then ``--repeats`` timed steps (the median is reported). A step is:

``none``   one backward of the batch's mean loss (what plain training does; no clipping);
``vmap``, ``loop``, ``ghost``  PEC (pcc, one example per core) into a
:class:`~privasr.distributed.CoreAccumulator` through :func:`privasr.private_step.accumulate_cores`
(the step ``PrivateBrain`` and ``PerCoreClipping`` run): per-example gradients by ``vmap``, one backward
per example, or ghost norms and the book-keeping clipped sum (no per-example gradients).

Time: wall clock and process CPU time of a step (CPU time is the steadier one on a shared
machine). Memory, two measures of what the step adds on top of the model and the batch:

* *RSS*: the process's peak resident set (``ru_maxrss``) minus its resident set just before the
  first step (what the operating system sees; the allocator's caching included);
* *tensors*: the peak of the bytes of live tensors during one more step, from the profiler's
  allocation events (exact and repeatable: a count, not a timing).

Ratios are to ``none`` of the same size, batch and round. ``--rounds R`` runs the whole grid ``R``
times, interleaved, and reports each ratio's median and range over the rounds.

    privasr-bench-ghost --sizes tiny mini S --batches 8 16 32 --rounds 3   # the README table
    privasr-bench-ghost --quick                                            # a smoke test (seconds)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from privasr.cli import CliParser, output_file, positive_float, positive_int, run_cli
from privasr.results_md import table_lines

PROG = "privasr-bench-ghost"
MODES = ("none", "vmap", "loop", "ghost")
QUICK = dict(sizes=["tiny"], batches=[2], seconds=0.3, repeats=1, rounds=1)  # --quick


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def tensor_bytes(fn) -> tuple[int, int, object]:
    """``(peak, net, fn())``: bytes of tensors allocated by ``fn()`` alive at once at most, and still alive after.

    From the profiler's allocation events (CPU): a count of bytes, the same on every run.
    """
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live, result


def tensor_peak_mib(fn) -> float:
    """Peak MiB of tensors allocated by ``fn()`` and alive at once (see :func:`tensor_bytes`)."""
    return tensor_bytes(fn)[0] / 2**20


def make_step(mode: str, size: str, batch: int, seconds: float, seed: int):
    """The step of one cell, as a function of no argument (model and batch built here, seeded)."""
    import torch

    from privasr.distributed import CoreAccumulator
    from privasr.models.sizes import build_model
    from privasr.per_sample import trainable_parameters
    from privasr.private_step import accumulate_cores

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
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

    return step


def run_cell(mode: str, size: str, batch: int, seconds: float, repeats: int, seed: int) -> dict:
    """One cell in this process: ``{mode, size, batch, time_s, cpu_s, extra_mib, tensor_mib}``."""
    step = make_step(mode, size, batch, seconds, seed)
    before = _rss_mib()
    step()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the profiler's own memory
    return {"mode": mode, "size": size, "batch": batch, "time_s": statistics.median(times),
            "cpu_s": statistics.median(cpu), "extra_mib": max(peak - before, 0.0), "tensor_mib": tensor_peak_mib(step)}


def _ratio(rows: list[dict], key: str) -> str:
    """Median ratio to ``none`` over the rounds, with the range when there are several."""
    values = [r[key] / r["base"][key] if r["base"].get(key, 0) > 0 else float("nan") for r in rows]
    middle = statistics.median(values)
    return f"{middle:.2f}" if len(values) == 1 else f"{middle:.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown(rows: list[dict]) -> str:
    """One line per (size, batch, mode); ratios to ``none`` of the same size, batch and round."""
    header = ["size", "batch", "mode", "step time (s)", "× none", "CPU × none", "peak extra RSS (MiB)", "× none",
              "peak tensors (MiB)", "× none"]
    groups: dict = {}
    for index, row in enumerate(rows):
        same = [r for r in rows if r["size"] == row["size"] and r["batch"] == row["batch"] and r["mode"] == "none"
                and r.get("round", 0) == row.get("round", 0)]
        if not same:
            raise ValueError(f"no 'none' cell for size {row['size']} batch {row['batch']}: ratios need it")
        groups.setdefault((row["size"], row["batch"], row["mode"]), []).append(dict(row, base=same[0]))
    table_rows = []
    for (size, batch, mode), cells in groups.items():
        med = {k: statistics.median(c.get(k, float("nan")) for c in cells)
               for k in ("time_s", "extra_mib", "tensor_mib")}
        table_rows.append([size, batch, mode, f"{med['time_s']:.3f}", _ratio(cells, "time_s"),
                           _ratio(cells, "cpu_s"), f"{med['extra_mib']:.0f}", _ratio(cells, "extra_mib"),
                           f"{med['tensor_mib']:.1f}", _ratio(cells, "tensor_mib")])
    return "\n".join(table_lines(header, table_rows))


def plan(sizes, batches, modes, rounds: int) -> list[tuple]:
    """``(round, size, batch, mode)`` of every cell, ``none`` first in each (size, batch)."""
    modes = ["none"] + [m for m in modes if m != "none"]
    return [(r, size, batch, mode) for r in range(rounds) for size in sizes for batch in batches for mode in modes]


def build_parser() -> CliParser:
    parser = CliParser(prog=PROG, description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["mini"], help="model sizes (privasr.models.sizes)")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[8, 16], help="batch sizes (examples)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seconds", type=positive_float, default=1.0, help="longest utterance of the batch (s)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed steps per cell (after one warm-up)")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="times the whole grid runs (interleaved); ratios: median and range over them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + " (all modes)")
    parser.add_argument("--json", metavar="FILE", type=output_file, help="also write every cell's measurements to FILE")
    parser.add_argument("--cell", nargs=3, metavar=("MODE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    return parser


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.cell:
        mode, size, batch = args.cell
        print(json.dumps(run_cell(mode, size, int(batch), args.seconds, args.repeats, args.seed)))
        return 0
    from privasr.models.sizes import SIZES

    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown model size(s) {unknown}; choose from {sorted(SIZES)}")
    rows = []
    for rnd, size, batch, mode in plan(args.sizes, args.batches, args.modes, args.rounds):
        cmd = [sys.executable, "-m", "privasr.cli.bench_ghost", "--cell", mode, size, str(batch),
               "--seconds", str(args.seconds), "--repeats", str(args.repeats), "--seed", str(args.seed)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            parser.exit(1, f"{PROG}: error: cell {mode} {size} {batch} failed\n")
        rows.append(dict(json.loads(done.stdout.strip().splitlines()[-1]), round=rnd))
        row = rows[-1]
        print(f"round {rnd + 1}/{args.rounds} {size} batch {batch} {mode}: {row['time_s']:.3f} s "
              f"(CPU {row['cpu_s']:.3f} s), +{row['extra_mib']:.0f} MiB RSS, {row['tensor_mib']:.1f} MiB tensors",
              file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))
    return 0


def main(argv=None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
