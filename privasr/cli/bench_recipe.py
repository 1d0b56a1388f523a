"""privasr-bench-recipe: the real recipe training step, per method, with and without each speed-up.

Each (method, speed-up set, repeat) runs in a fresh process (so its peak memory and its
allocator settings are its own): the mini_tts recipe YAML is loaded with the given
overrides, the real training loader is built (bucketed or not), and ``--steps`` optimizer
steps of ``ASRBrain.fit_batch`` are timed after ``--warmup`` steps. Printed: utterances/s
(median and range over ``--repeats``), the ratio to the ``plain`` set of the same method,
and peak RSS, side by side in one run.

Speed-up sets (``--configs``; each adds to ``plain``):

``plain``    random batches, untrimmed cores, glibc's default allocator thresholds, a 144-channel front end
             (the mini model's d_model; every set but ``all+front64`` keeps it, so each speed-up is exact)
``malloc``   ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised (freed blocks are kept, not
             returned to the OS and page-faulted back every step)
``bucket``   duration-bucketed batches (``bucket_batches``)
``trim``     each core cut to its own longest utterance (``trim_shards``)
``all``      all three
``all+front64``  all three and a 64-channel convolutional front end (``frontend_channels``: a smaller model,
             not an exact speed-up)

    privasr-bench-recipe --data egs/mini_tts/data --methods none pcc pec --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from privasr.cli import CliParser, nonnegative_int, output_file, positive_int, run_cli
from privasr.errors import UserError
from privasr.results_md import table_lines

PROG = "privasr-bench-recipe"
ROOT = Path(__file__).resolve().parents[2]  # the checkout: privasr/cli/ -> the repository root
HPARAMS = ROOT / "recipes" / "mini_tts" / "ASR" / "conformer" / "hparams" / "conformer_ctc.yaml"
METHODS = {"none": ("none", 1), "pcc": ("pcc", None), "apcc": ("apcc", None), "pec": ("pec", None)}
FRONT_144 = 144  # the mini model's d_model: the front end before the recipe's default became 64 channels
CONFIGS = {
    "plain": dict(malloc=False, bucket=False, trim=False, frontend=FRONT_144),
    "malloc": dict(malloc=True, bucket=False, trim=False, frontend=FRONT_144),
    "bucket": dict(malloc=False, bucket=True, trim=False, frontend=FRONT_144),
    "trim": dict(malloc=False, bucket=False, trim=True, frontend=FRONT_144),
    "all": dict(malloc=True, bucket=True, trim=True, frontend=FRONT_144),
    "all+front64": dict(malloc=True, bucket=True, trim=True, frontend=64),  # a model change: needs a WER check
}
# glibc keeps freed blocks up to these sizes instead of unmapping them (the stage library's defaults)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def build_parser() -> CliParser:
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a mini_tts data folder after stage 3 (train.csv, tokenizer/)")
    p.add_argument("--methods", nargs="+", default=["none", "pcc", "apcc", "pec"], choices=sorted(METHODS))
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "all+front64"], choices=list(CONFIGS))
    p.add_argument("--steps", type=positive_int, default=12, help="timed optimizer steps (default 12)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--repeats", type=positive_int, default=3, help="fresh processes per cell (default 3)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--virtual-cores", type=positive_int, default=8, help="cores per process for pcc/apcc")
    p.add_argument("--model-size", default="mini")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--json", type=output_file, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one cell, run in a fresh process by run_cell
    return p


def overrides_of(args, method: str, config: dict, out: str) -> list[str]:
    clipping, cores = METHODS[method]
    data = Path(args.data)
    return ["--data_folder", str(data), "--tokenizer_dir", str(data / "tokenizer"), "--train_csv",
            str(data / "train.csv"), "--output_folder", out, "--model_size", args.model_size, "--clipping", clipping,
            "--virtual_cores", str(cores or args.virtual_cores), "--batch_size", str(args.batch_size),
            "--bucket_batches", "8" if config["bucket"] else "0", "--trim_shards", str(config["trim"]).lower(),
            "--log_every_n_steps", "0", "--core_log_dir", "null", "--tensorboard_dir", "null", "--check_audio",
            "first"] + ([] if config["frontend"] is None else ["--frontend_channels", str(config["frontend"])])


def worker(spec: dict) -> dict:
    """One cell: build the recipe's brain and loader, time ``steps`` optimizer steps."""
    import torch
    import speechbrain as sb

    from privasr.asr import ASRBrain, make_dataset
    from privasr.cli.hparams import load_hparams, parse_arguments

    torch.set_num_threads(spec["threads"])
    _, run_opts, overrides = parse_arguments([str(HPARAMS), *spec["overrides"], "--noprogressbar"])
    hparams = load_hparams(str(HPARAMS), overrides)
    dataset = make_dataset(hparams["train_csv"], hparams["tokenizer"], hparams["sample_rate"], "random",
                           hparams["max_duration"], check_audio="first")
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=None)
    loader = brain.make_dataloader(dataset, sb.Stage.TRAIN, **hparams["train_dataloader_opts"])
    if brain.train_sampler is not None and hasattr(brain.train_sampler, "set_epoch"):
        brain.train_sampler.set_epoch(1)
    brain.on_fit_start()
    brain.modules.train()
    batches = iter(loader)
    needed = spec["warmup"] + spec["steps"]
    if len(loader) < needed:
        raise UserError(f"{hparams['train_csv']} gives {len(loader)} batches, fewer than "
                         f"--warmup + --steps = {needed}")
    for _ in range(spec["warmup"]):
        brain.fit_batch(next(batches))
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        brain.fit_batch(next(batches))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"utt_per_s": spec["steps"] * spec["batch_size"] / seconds, "peak_mb": peak_mb, "seconds": seconds}


def run_cell(args, method: str, config_name: str) -> dict:
    """One fresh process timing ``method`` with the speed-ups of ``config_name``."""
    config = CONFIGS[config_name]
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if config["malloc"]:
        env.update(MALLOC_ENV)
    env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as out:
        spec = {"overrides": overrides_of(args, method, config, out), "threads": args.threads,
                "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size}
        proc = subprocess.run([sys.executable, "-m", "privasr.cli.bench_recipe", "--data", args.data, "--worker",
                               json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise UserError(f"{method}/{config_name} failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(cells: dict, methods, configs) -> str:
    rows = []
    for method in methods:
        base = statistics.median(r["utt_per_s"] for r in cells[method]["plain"]) if "plain" in configs else None
        for config in configs:
            rates = [r["utt_per_s"] for r in cells[method][config]]
            median = statistics.median(rates)
            ratio = f"{median / base:.2f}" if base else "–"
            peak = statistics.median(r["peak_mb"] for r in cells[method][config])
            rows.append([method, config, f"{median:.1f} ({min(rates):.1f}–{max(rates):.1f})", ratio, f"{peak:.0f}"])
    return "\n".join(table_lines(["method", "speed-ups", "utt/s (median, range)", "× plain", "peak RSS (MB)"], rows))


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    data = Path(args.data)
    for need in (data / "train.csv", data / "tokenizer"):
        if not need.exists():
            raise UserError(f"{need} not found: --data needs a mini_tts data folder after stage 3")
    load = os.getloadavg()[0]
    print(f"# {PROG}: {args.steps} steps of batch {args.batch_size} (+{args.warmup} warm-up), {args.repeats} "
          f"repeats, {args.threads} threads, model {args.model_size}; load average at start {load:.2f}", flush=True)
    cells = {m: {c: [] for c in args.configs} for m in args.methods}
    # Round-robin: repeat r of every cell before repeat r + 1 of any, so that a drift of the machine's speed
    # (frequency, page cache, a neighbour) spreads over all cells instead of biasing the ones measured last.
    for repeat in range(args.repeats):
        for method in args.methods:
            for config in args.configs:
                cell = run_cell(args, method, config)
                cells[method][config].append(cell)
                print(f"  repeat {repeat + 1}: {method:5s} {config:12s} {cell['utt_per_s']:.1f} utt/s", flush=True)
    print(table(cells, args.methods, args.configs))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cells": cells}, indent=1))
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
