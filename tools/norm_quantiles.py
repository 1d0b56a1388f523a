"""privasr-norm-quantiles: per-core gradient norms of a model at several per-core batch sizes.

PCC's bound is a number in gradient-norm units, and those units depend on the model, the
loss normalization and the per-core batch size B. This tool loads a recipe (its YAML and
overrides, exactly as train.py does), recovers the latest checkpoint of ``--output_folder``
if there is one, and, without updating the model, computes the per-core gradient norm of
every core of ``--batches`` training batches for each B. It prints quantiles per B, e.g. to
pick ``--clip_bound`` at the median (p50) or the 10th percentile (p10) of the baseline:

    privasr-norm-quantiles recipes/mini_tts/ASR/conformer/hparams/conformer_ctc.yaml \\
        --per-core 1 2 4 8 --batches 20 -- --data_folder egs/mini_tts/data --output_folder exp/baseline/seed1
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Arguments after -- are recipe overrides, as for train.py.")
    p.add_argument("hparams", help="the recipe's YAML")
    p.add_argument("--per-core", type=int, nargs="+", default=[1, 2, 4, 8], help="per-core batch sizes B")
    p.add_argument("--batches", type=int, default=20, help="training batches to measure")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--json", help="also write the quantiles here")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides
    return args


def load_brain(hparams_file: str, overrides: list[str]):
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    from privasr.asr import ASRBrain, make_dataset

    _, run_opts, yaml_overrides = sb.parse_arguments([hparams_file] + overrides)
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, yaml_overrides)
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    hparams["checkpointer"].recover_if_possible()
    data = make_dataset(hparams["train_csv"], hparams["tokenizer"], hparams["sample_rate"], "random",
                        hparams["max_duration"])
    return brain, data, hparams


def measure(brain, data, hparams, per_core: list[int], batches: int) -> dict[int, np.ndarray]:
    """``{B: per-core norms}`` over the first ``batches`` batches (each split into cores of B)."""
    import speechbrain as sb

    from privasr.per_sample import shard_grads_loop

    batch_size = max(per_core) * max(1, hparams["batch_size"] // max(per_core))
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
                squares = [g.double().pow(2).sum() for g in grads if g is not None]
                norms[b].append(float(torch.stack(squares).sum().sqrt()))
    return {b: np.asarray(v) for b, v in norms.items()}


def table(norms: dict[int, np.ndarray], quantiles: list[float]) -> str:
    head = "| per-core batch B | cores | " + " | ".join(f"p{round(100 * q)}" for q in quantiles) + " |"
    lines = [head, "|---" * (len(quantiles) + 2) + "|"]
    for b, values in norms.items():
        cells = " | ".join(f"{np.quantile(values, q):.3g}" for q in quantiles)
        lines.append(f"| {b} | {values.size} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        brain, data, hparams = load_brain(args.hparams, args.overrides)
    except (OSError, ValueError) as err:
        print(f"privasr-norm-quantiles: error: {err}", file=sys.stderr)
        return 2
    norms = measure(brain, data, hparams, args.per_core, args.batches)
    print(table(norms, args.quantiles))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(b): {f"p{round(100 * q)}": float(np.quantile(v, q)) for q in args.quantiles}
                       for b, v in norms.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
