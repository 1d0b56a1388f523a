"""privasr-norm-quantiles: per-core gradient norms of a trained model at several per-core batch sizes.

PCC's bound is a number in gradient-norm units, and those units depend on the model, the
loss normalization and the per-core batch size B. This tool loads a recipe (its YAML and
overrides, exactly as train.py does), recovers the latest checkpoint of ``--output_folder``
(refused when there is none: the norms of a randomly initialised model say nothing about
the trained one), and, without updating the model, computes the per-core gradient norm of
every core of ``--batches`` training batches for each B. It prints quantiles per B, e.g. to
pick ``--clip_bound`` at the median (p50) or the 10th percentile (p10) of the baseline:

    privasr-norm-quantiles recipes/mini_tts/ASR/conformer/hparams/conformer_ctc.yaml \\
        --per-core 1 2 4 8 --batches 20 -- --data_folder egs/mini_tts/data --output_folder exp/baseline/seed1

Every measured batch holds ``max(B) * (batch_size // max(B))`` utterances, so every B must
divide it (equal cores). Quantiles are fractions (``0.1`` is p10). Bad input ends with one
line ``privasr-norm-quantiles: error: ...`` and exit status 2 before anything is written.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np
import torch

from privasr.cli import CliParser, fraction, one_line, output_file, positive_int, run_cli
from privasr.errors import UserError
from privasr.results_md import table_lines

PROG = "privasr-norm-quantiles"


def _parser() -> CliParser:
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0],
                  epilog="Arguments after -- are recipe overrides, as for train.py (--output_folder: the trained run).")
    p.add_argument("hparams", help="the recipe's YAML")
    p.add_argument("--per-core", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="per-core batch sizes B")
    p.add_argument("--batches", type=positive_int, default=20, help="training batches to measure (>= 1)")
    p.add_argument("--quantiles", type=fraction, nargs="+", default=[0.1, 0.5, 0.9],
                   help="quantiles as fractions in [0, 1] (default 0.1 0.5 0.9 = p10 p50 p90)")
    p.add_argument("--json", type=output_file, help="also write the quantiles here")
    return p


def parse_args(argv=None):
    """The tool's options and, after ``--``, the recipe overrides (``args.overrides``)."""
    return _parser().parse_with_overrides(argv)


def resolved_hparams(hparams_file: str, overrides: list[str]) -> tuple[str, dict, str, dict]:
    """``(hparams_file, run_opts, yaml_overrides, plain)``: the command line checked as train.py checks it.

    ``plain`` holds the YAML's plain values with every ``!ref`` resolved (objects are not built),
    enough to find the run's checkpoints before the model and data are loaded.
    """
    from privasr.cli.hparams import check_overrides, parse_arguments, resolved_values

    hparams_file, run_opts, yaml_overrides = parse_arguments([hparams_file] + list(overrides))
    check_overrides(hparams_file, yaml_overrides)
    plain = resolved_values(hparams_file, yaml_overrides)
    return hparams_file, run_opts, yaml_overrides, plain


def check_trained_run(plain: dict) -> str:
    """The run's checkpoint folder; refused (one line) when it holds no checkpoint."""
    from privasr.provenance import has_checkpoints

    save_folder = str(plain.get("save_folder") or os.path.join(str(plain.get("output_folder")), "save"))
    if not has_checkpoints(save_folder):
        raise UserError(f"no trained model: no checkpoint in {save_folder} (pass the trained run's folder after --, "
                        f"e.g. -- --output_folder exp/baseline/seed1)")
    return save_folder


def measured_batch(batch_size: int, per_core: Sequence[int]) -> int:
    """Utterances per measured batch: the largest multiple of ``max(per_core)`` <= ``batch_size`` (at least one).

    Raises :class:`UserError` when some B does not divide it (its cores would be unequal).
    """
    largest = max(per_core)
    size = largest * max(1, batch_size // largest)
    uneven = [b for b in per_core if size % b]
    if uneven:
        raise UserError(f"--per-core {' '.join(map(str, uneven))} does not divide the measured batch of {size} "
                        f"utterances (batch_size {batch_size}, largest B {largest}): cores would be unequal")
    return size


def load_brain(hparams_file: str, overrides: list[str]):
    """The recipe's Brain with the trained run's latest checkpoint loaded, its training data and hparams."""
    from privasr.asr import ASRBrain, make_dataset
    from privasr.cli.hparams import load_hparams

    hparams_file, run_opts, yaml_overrides, plain = resolved_hparams(hparams_file, overrides)
    save_folder = check_trained_run(plain)
    if plain.get("core_log_dir") is not None:  # measuring is read-only: no per-step core log in the trained run
        yaml_overrides = (yaml_overrides or "") + "\ncore_log_dir: null"
    hparams = load_hparams(hparams_file, yaml_overrides)
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    try:
        checkpoint = hparams["checkpointer"].recover_if_possible()
    except (RuntimeError, KeyError, ValueError) as err:  # e.g. a size mismatch: another model size or vocabulary
        raise UserError(f"the checkpoint in {save_folder} does not fit this recipe's model: {one_line(err)}") from None
    if checkpoint is None:
        raise UserError(f"no trained model: no loadable checkpoint in {save_folder}")
    data = make_dataset(hparams["train_csv"], hparams["tokenizer"], hparams["sample_rate"], "random",
                        hparams["max_duration"])
    return brain, data, hparams


def measure(brain, data, hparams, per_core: list[int], batches: int) -> dict[int, np.ndarray]:
    """``{B: per-core norms}`` over the first ``batches`` batches (each split into cores of B)."""
    import speechbrain as sb

    from privasr.clipping import core_norm
    from privasr.per_sample import shard_grads_loop

    batch_size = measured_batch(hparams["batch_size"], per_core)
    torch.manual_seed(hparams["seed"])
    loader = sb.dataio.dataloader.make_dataloader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    brain.modules.train()
    norms = {b: [] for b in per_core}
    for index, batch in enumerate(loader):
        if index == batches:
            break
        tensors = brain.batch_to_tensors(batch)
        for b in per_core:
            for grads, _ in shard_grads_loop(brain.modules, brain.shard_loss, tensors, batch_size // b):
                norms[b].append(float(core_norm(grads)))
    if not norms[per_core[0]]:
        raise UserError(f"{hparams['train_csv']}: fewer than {batch_size} utterances, not one batch to measure")
    return {b: np.asarray(v) for b, v in norms.items()}


def table(norms: dict[int, np.ndarray], quantiles: list[float]) -> str:
    rows = [[b, values.size, *(f"{np.quantile(values, q):.3g}" for q in quantiles)] for b, values in norms.items()]
    return "\n".join(table_lines(["per-core batch B", "cores", *map(_name, quantiles)], rows))


def _name(q: float) -> str:
    """``p10`` for 0.1; ``p2.5`` for 0.025 (a rounded name must not merge two quantiles)."""
    return f"p{100 * q:.6g}"


def _main(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    args.per_core = list(dict.fromkeys(args.per_core))
    brain, data, hparams = load_brain(args.hparams, args.overrides)
    norms = measure(brain, data, hparams, args.per_core, args.batches)
    measured = norms[args.per_core[0]].size * args.per_core[0] // measured_batch(hparams["batch_size"], args.per_core)
    if measured < args.batches:
        print(f"{PROG}: note: {hparams['train_csv']} gave {measured} of the {args.batches} batches asked for",
              file=sys.stderr)
    print(table(norms, args.quantiles))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({str(b): {_name(q): float(np.quantile(v, q)) for q in args.quantiles}
                       for b, v in norms.items()}, f, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
