r"""privasr-canary-gradients: per-example gradient norms of canaries vs normal utterances on a trained model.

Clipping can only curb memorization by as much as a canary's gradient stands out. Let
:math:`r` be the ratio of a canary's per-example gradient norm to a normal utterance's. A core
of :math:`B` examples holding one canary (norm :math:`r g`) and :math:`B - 1` normal utterances
(norm :math:`g`), their gradients roughly orthogonal, has norm :math:`\approx g\sqrt{r^2 + B - 1}`,
a core of normal utterances :math:`g\sqrt{B}`. Clipping every core to the same bound scales each
to it, so the canary core is scaled down more than a normal core by

.. math:: \rho(r, B) = \sqrt{r^2 + B - 1} / \sqrt{B}

(:func:`privasr.core_log.predicted_weight_ratio`): the factor by which the canary's weight,
relative to a normal utterance's, falls. :math:`\rho = r` for per-example clipping (:math:`B = 1`),
and :math:`\rho \to 1` as :math:`B` grows: with :math:`r = 1.6`, PCC at :math:`B = 4` cuts a
canary's weight by only 1.18, while a floor like the paper's needs :math:`r` of order 10.

This tool loads a recipe (its YAML and overrides, as train.py does; :mod:`privasr.cli.norm_quantiles`'s
loading), recovers the trained run's latest checkpoint (refused when there is none), and, without
updating the model, computes the gradient norm of the training loss of every canary (``--canaries``,
by default the YAML's ``canaries_csv``) and of ``--normal`` normal utterances drawn with ``--seed``
from the canary-free training manifest (``--normal-csv``, by default the YAML's ``train_eval_csv``,
``train.csv``), each utterance alone (a batch and core of one: the gradient that per-example
clipping clips), with :func:`privasr.per_sample.shard_grads_loop` and :func:`privasr.clipping.core_norm`.
It prints the quantiles (p10/p50/p90) and the mean of each group's norms, :math:`r` from the medians
and from the means (also per insertion count when the canaries file has an ``insertions`` column),
and :math:`\rho` at each ``--per-core`` B::

    privasr-canary-gradients recipes/mini_tts/ASR/conformer/hparams/conformer_ctc.yaml --normal 200 \
        --json exp/canary_gradients.json -- --data_folder egs/mini_tts/data --output_folder exp/none/seed1

**Transcripts.** A canary whose gradient stands out is only an outlier worth clipping if the model
cannot already transcribe it: the study wants canaries a canary-free model decodes badly (holdout CER
:math:`\ge 0.95`, mostly empty output). So every measured utterance is also decoded, unless ``--no-decode``,
by the recipe's own decoding (:meth:`privasr.asr.ASRBrain.decode`: greedy CTC, or prefix beam search
when ``beam_size`` > 1, or transducer greedy; the tokenizer's decode) in evaluation mode under
``torch.no_grad``, one utterance at a time, and scored with :func:`privasr.metrics.utterance_cer`
(jiwer): per group the median and mean per-utterance CER, the corpus CER (:func:`privasr.metrics.cer`,
as train.py's decode reports it), the fraction of empty transcripts and the median per-utterance loss
(:meth:`~privasr.asr.ASRBrain.per_utterance_loss`, the ``score`` of ``hyps/*.csv``). This needs no
canaries in the run's record, so it works on a canary-free pre-training, which ``train.py --mode decode``
rightly refuses to decode canaries for. A forward pass is cheap next to the backward of the norm.

**Mode.** The model is in training mode (what the clipped gradients come from: any layer whose
training behaviour is not random, e.g. a BatchNorm, behaves as in training) with its dropout layers
switched off and no SpecAugment. Dropout and SpecAugment make a training gradient random; its norm
would then mix the canary-vs-normal difference we want with the mask drawn, and a repeated
measurement would differ. Without them the norms are those of the model's expected (unmasked)
training loss, reproducible to the bit: the first utterance is measured twice and a difference
refused (a model with randomness outside ``torch.nn`` dropout layers). The mini_tts model has no
BatchNorm, so this is also what evaluation mode gives.

A non-finite norm (an utterance CTC cannot align: infinite loss; training drops its core) is
counted and left out of the statistics. Bad input ends with one line
``privasr-canary-gradients: error: ...`` and exit status 2 before anything is written.
"""
from __future__ import annotations

import json
import os
import random
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from privasr.cli import CliParser, nonnegative_int, output_file, positive_int, run_cli
from privasr.cli.norm_quantiles import check_trained_run, load_brain, resolved_hparams
from privasr.core_log import predicted_weight_ratio
from privasr.errors import UserError
from privasr.provenance import file_digest
from privasr.results_md import table_lines

PROG = "privasr-canary-gradients"
QUANTILES = (0.1, 0.5, 0.9)


def _parser() -> CliParser:
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0],
                  epilog="Arguments after -- are recipe overrides, as for train.py (--output_folder: the trained run).")
    p.add_argument("hparams", help="the recipe's YAML")
    p.add_argument("--canaries", help="the canaries' manifest (default: the YAML's canaries_csv)")
    p.add_argument("--normal-csv", help="the canary-free manifest normal utterances are drawn from "
                                        "(default: the YAML's train_eval_csv)")
    p.add_argument("--normal", type=positive_int, default=200, help="normal utterances to measure (>= 1; default 200)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the draw of normal utterances (default 0)")
    p.add_argument("--per-core", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                   help="per-core batch sizes B of the prediction (default 1 2 4 8)")
    p.add_argument("--no-decode", dest="decode", action="store_false",
                   help="skip the transcripts (greedy CTC decoding, CER, empty fraction; on by default)")
    p.add_argument("--json", type=output_file,
                   help="also write the statistics, the prediction and every per-example norm here")
    return p


def parse_args(argv=None):
    """The tool's options and, after ``--``, the recipe overrides (``args.overrides``)."""
    args = _parser().parse_with_overrides(argv)
    args.per_core = list(dict.fromkeys(args.per_core))
    return args


# -- the data ----------------------------------------------------------------------------
def read_canary_counts(path: str) -> tuple[list[str], Optional[dict[str, int]]]:
    """The canary IDs of a manifest and ``{ID: insertions}`` when it has that column (else None)."""
    from privasr.canaries import read_canaries
    from privasr.data.manifest import read_manifest

    try:
        canaries = read_manifest(path, check_audio=False)
        if not canaries:
            raise UserError(f"{path}: no canaries")
        if "insertions" not in canaries[0].extra:
            return [u.id for u in canaries], None
        canaries, counts = read_canaries(path)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    return [u.id for u in canaries], {u.id: c for u, c in zip(canaries, counts)}


def draw_normal(dataset, n: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` utterance IDs of ``dataset`` drawn without replacement with ``seed`` (manifest order kept).

    Canaries (``exclude``, also as the ``<id>_r<k>`` rows of a training manifest) are never drawn.
    All of them when fewer than ``n`` remain.
    """
    from privasr.canaries import canary_id_of

    pool = [uid for uid in dataset.data_ids if uid not in exclude and canary_id_of(uid) not in exclude]
    chosen = set(random.Random(seed).sample(pool, min(n, len(pool))))
    return [uid for uid in pool if uid in chosen]


# -- the measurement ---------------------------------------------------------------------
def without_dropout(modules: torch.nn.Module) -> torch.nn.Module:
    """``modules`` in training mode with every ``torch.nn`` dropout layer in evaluation mode (identity)."""
    modules.train()
    for module in modules.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()
    return modules


def example_tensors(brain, batch) -> tuple[torch.Tensor, ...]:
    """``(feats, feat_lens, tokens, token_lens)`` of a batch as training computes them, without SpecAugment."""
    batch = batch.to(brain.device)
    wavs, wav_lens = batch.sig
    tokens, token_lens = batch.tokens
    feats, feat_lens = brain.modules.model.features(wavs, wav_lens)
    return feats, feat_lens, tokens, token_lens


def example_norm(brain, dataset, index: int) -> float:
    """The gradient norm of the training loss of utterance ``index`` of ``dataset`` alone (one core of one)."""
    from speechbrain.dataio.batch import PaddedBatch

    from privasr.clipping import core_norm
    from privasr.per_sample import shard_grads_loop

    tensors = example_tensors(brain, PaddedBatch([dataset[index]]))
    (grads, _), = shard_grads_loop(brain.modules, brain.shard_loss, tensors, 1)
    return float(core_norm(grads))


def per_example_norms(brain, dataset, ids: Sequence[str]) -> dict[str, float]:
    """``{ID: gradient norm}`` of each utterance of ``ids``, measured without dropout or SpecAugment.

    Refused when measuring the first utterance twice gives two norms (randomness left in the model).
    """
    without_dropout(brain.modules)
    position = {uid: i for i, uid in enumerate(dataset.data_ids)}
    norms = {uid: example_norm(brain, dataset, position[uid]) for uid in ids}
    if ids:
        again = example_norm(brain, dataset, position[ids[0]])
        if not (again == norms[ids[0]] or (np.isnan(again) and np.isnan(norms[ids[0]]))):
            raise UserError(f"the model is random in training mode beyond torch.nn dropout layers "
                            f"(two norms of {ids[0]}: {norms[ids[0]]:.6g}, {again:.6g}): cannot measure")
    return norms


def transcribe_examples(brain, dataset, ids: Sequence[str]) -> dict[str, dict]:
    """``{ID: {ref, hyp, cer, empty, loss}}``: each utterance of ``ids`` decoded alone by the recipe's decoding.

    :meth:`privasr.asr.ASRBrain.compute_forward` / ``decode`` / ``per_utterance_loss`` in evaluation mode
    (dropout off) under ``torch.no_grad`` and ``--eval_precision``, as ``ASRBrain.transcribe`` decodes;
    ``cer`` is :func:`privasr.metrics.utterance_cer` (jiwer) against the manifest's ``wrd``, ``empty`` whether
    the transcript has no character but whitespace, ``loss`` the utterance's loss (``inf``: CTC cannot align).
    """
    import speechbrain as sb
    from speechbrain.dataio.batch import PaddedBatch

    from privasr.metrics import normalize_whitespace, utterance_cer

    brain.modules.eval()
    position = {uid: i for i, uid in enumerate(dataset.data_ids)}
    out = {}
    with torch.no_grad():
        for uid in ids:
            batch = PaddedBatch([dataset[position[uid]]])
            with brain.evaluation_ctx:
                predictions = brain.compute_forward(batch, sb.Stage.TEST)
                (loss,) = brain.per_utterance_loss(predictions, batch.to(brain.device)).float().tolist()
            (hyp,) = brain.decode(predictions, batch)
            (ref,) = batch.wrd
            out[uid] = {"ref": ref, "hyp": hyp, "cer": utterance_cer(ref, hyp),
                        "empty": not normalize_whitespace(hyp), "loss": loss}
    return out


# -- the report --------------------------------------------------------------------------
def transcript_stats(rows: Sequence[Mapping]) -> dict:
    """``cer_p50``, ``cer_mean`` (per utterance), ``cer_corpus``, ``empty``, ``empty_fraction`` and ``loss_p50``
    of :func:`transcribe_examples` rows (``loss_p50`` over the finite losses; None when there is none)."""
    from privasr.metrics import cer

    if not rows:
        return {}
    cers = np.array([row["cer"] for row in rows], dtype=float)
    losses = np.array([row["loss"] for row in rows], dtype=float)
    losses = losses[np.isfinite(losses)]
    empty = sum(bool(row["empty"]) for row in rows)
    return {"cer_p50": float(np.median(cers)), "cer_mean": float(cers.mean()),
            "cer_corpus": cer([row["ref"] for row in rows], [row["hyp"] for row in rows]),
            "empty": empty, "empty_fraction": empty / len(rows),
            "loss_p50": float(np.median(losses)) if losses.size else None}


def group_stats(values: Sequence[float]) -> dict:
    """``n``, ``nonfinite``, ``zero`` and, over the finite non-zero values, ``p10``/``p50``/``p90`` and ``mean``.

    A zero norm is an utterance CTC cannot align (too many tokens for its frames after subsampling: an
    infinite loss, which the loss zeroes): it gives training no gradient at all, so it is counted apart and
    left out of ``r``, which compares the utterances clipping actually scales.
    """
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    stats = {"n": int(values.size), "nonfinite": int(values.size - finite.size), "zero": int((finite == 0).sum())}
    finite = finite[finite > 0]
    if finite.size:
        stats.update({f"p{round(100 * q)}": float(np.quantile(finite, q)) for q in QUANTILES})
        stats["mean"] = float(finite.mean())
    return stats


def norm_ratios(group: dict, normal: dict) -> dict:
    """``r_median`` and ``r_mean`` of a group against the normal utterances (None without finite norms)."""
    if "p50" not in group:
        return {"r_median": None, "r_mean": None}
    return {"r_median": group["p50"] / normal["p50"], "r_mean": group["mean"] / normal["mean"]}


def report(canary_norms: Mapping[str, float], normal_norms: Mapping[str, float],
           counts: Optional[Mapping[str, int]], per_core: Sequence[int],
           transcripts: Optional[Mapping[str, Mapping[str, dict]]] = None) -> dict:
    """Statistics per group, ``r`` (overall and per insertion count) and ``rho(r, B)`` per B.

    With ``transcripts`` (``{"canaries": rows, "normal": rows}`` of :func:`transcribe_examples`), each
    group also gets the :func:`transcript_stats` of its utterances' transcripts.
    """
    def decoded(group: str, ids) -> dict:
        return {} if transcripts is None else transcript_stats([transcripts[group][uid] for uid in ids])

    normal = {**group_stats(list(normal_norms.values())), **decoded("normal", normal_norms)}
    canaries = {**group_stats(list(canary_norms.values())), **decoded("canaries", canary_norms)}
    if "p50" not in normal or normal["p50"] <= 0:
        raise UserError(f"no normal utterance with a finite, non-zero gradient norm (of {normal['n']}): "
                        f"cannot form the ratio r")
    if "p50" not in canaries:
        raise UserError(f"no canary with a finite, non-zero gradient norm (of {canaries['n']}: {canaries['nonfinite']} "
                        f"non-finite, {canaries['zero']} zero): CTC cannot align them (too many tokens for their "
                        f"frames), so training learns nothing from them; use sentencepiece pieces (--tokenizer_type "
                        f"unigram), slower canaries or less subsampling")
    ratios = norm_ratios(canaries, normal)
    out = {"normal": normal, "canaries": {**canaries, **ratios},
           "predicted": {str(b): {key: predicted_weight_ratio(r, b) for key, r in ratios.items()} for b in per_core},
           "by_insertions": {}}
    for count in sorted(set((counts or {}).values())):
        ids = [uid for uid in canary_norms if counts.get(uid) == count]
        group = {**group_stats([canary_norms[uid] for uid in ids]), **decoded("canaries", ids)}
        ratios = norm_ratios(group, normal)
        predicted = {str(b): None if ratios["r_median"] is None else predicted_weight_ratio(ratios["r_median"], b)
                     for b in per_core}
        out["by_insertions"][str(count)] = {**group, **ratios, "predicted_from_r_median": predicted}
    return out


def _cell(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3g}"


def markdown(result: dict, per_core: Sequence[int]) -> str:
    """The norms per group (and their transcripts' CER, when decoded) and the prediction per B, as markdown tables."""
    names = ["p10", "p50", "p90", "mean"]
    groups = [("normal", result["normal"]), ("canaries", result["canaries"])]
    groups += [(f"canaries x{count}", group) for count, group in result["by_insertions"].items()]
    norms = table_lines(
        ["utterances", "n", "non-finite", "zero (CTC cannot align)", *names, "r (medians)", "r (means)"],
        [[name, group["n"], group["nonfinite"], group["zero"], *(_cell(group.get(key)) for key in names),
          _cell(group.get("r_median")), _cell(group.get("r_mean"))] for name, group in groups])
    predicted = table_lines(
        ["per-core batch B", "predicted, r from medians", "predicted, r from means"],
        [[f"{b}{' (PEC)' if b == 1 else ''}", _cell(result["predicted"][str(b)]["r_median"]),
          _cell(result["predicted"][str(b)]["r_mean"])] for b in per_core])
    if "cer_mean" in result["normal"]:
        norms += ["", *table_lines(
            ["utterances", "n", "CER median", "CER mean", "CER corpus", "empty transcripts", "loss median"],
            [[name, group["n"], _cell(group["cer_p50"]), _cell(group["cer_mean"]), _cell(group["cer_corpus"]),
              f"{group['empty_fraction']:.0%} ({group['empty']})", _cell(group["loss_p50"])]
             for name, group in groups]),
            "", "Transcripts of the same utterances in evaluation mode, by the recipe's decoding (greedy CTC at "
                "beam_size 1); CER: jiwer, a fraction; loss: the utterance's whole loss, hyps/*.csv's score."]
    note = ("Predicted cut of a canary's weight relative to a normal utterance's when every core is clipped: "
            "√(r² + B − 1) / √B (B = 1: per-example clipping, the factor r).")
    return "\n".join([*norms, "", note, "", *predicted])


def _finite_or_none(value: float) -> Optional[float]:
    return value if np.isfinite(value) else None  # JSON has no inf/NaN


def checkpoint_record(save_folder: str) -> dict:
    """The checkpoint the measurement loaded (the most recent, as ``recover_if_possible`` picks it)."""
    from speechbrain.utils.checkpoints import Checkpointer

    from privasr.provenance import checkpoint_identity, code_version

    checkpoint = Checkpointer(save_folder).find_checkpoint()
    return {"save_folder": os.path.abspath(save_folder), "checkpoint": checkpoint_identity(checkpoint),
            "code_version": code_version()}


def _main(argv: Sequence[str] | None) -> None:
    from privasr.asr import make_dataset

    args = parse_args(argv)
    _, _, _, plain = resolved_hparams(args.hparams, args.overrides)
    save_folder = check_trained_run(plain)
    canaries_csv = args.canaries or plain.get("canaries_csv")
    normal_csv = args.normal_csv or plain.get("train_eval_csv")
    for path, option, key in ((canaries_csv, "--canaries", "canaries_csv"),
                              (normal_csv, "--normal-csv", "train_eval_csv")):
        if not path:
            raise UserError(f"no {key} in the recipe: pass {option}")
    canary_ids, counts = read_canary_counts(canaries_csv)
    brain, _, hparams = load_brain(args.hparams, args.overrides)
    datasets = {name: make_dataset(path, hparams["tokenizer"], hparams["sample_rate"], "random",
                                   hparams.get("max_duration"), resample=hparams.get("resample_audio", False),
                                   check_audio=check)
                for name, path, check in (("canaries", canaries_csv, "all"), ("normal", normal_csv, "none"))}
    normal_ids = draw_normal(datasets["normal"], args.normal, args.seed, set(canary_ids))
    if not normal_ids:
        raise UserError(f"{normal_csv}: no utterance that is not a canary")
    if len(normal_ids) < args.normal:
        print(f"{PROG}: note: {normal_csv} has {len(normal_ids)} of the {args.normal} normal utterances asked for",
              file=sys.stderr)
    measured_canaries = list(datasets["canaries"].data_ids)  # those within max_duration (make_dataset warns)
    canary_norms = per_example_norms(brain, datasets["canaries"], measured_canaries)
    normal_norms = per_example_norms(brain, datasets["normal"], normal_ids)
    transcripts = None
    if args.decode:
        transcripts = {"canaries": transcribe_examples(brain, datasets["canaries"], measured_canaries),
                       "normal": transcribe_examples(brain, datasets["normal"], normal_ids)}
    result = report(canary_norms, normal_norms, counts, args.per_core, transcripts)
    print(markdown(result, args.per_core))
    if args.json:
        record = {**checkpoint_record(save_folder), "canaries_csv": os.path.abspath(canaries_csv),
                  "canaries_sha256": file_digest(canaries_csv),  # what was measured: the bytes, not the path
                  "normal_csv": os.path.abspath(normal_csv), "normal_requested": args.normal, "seed": args.seed,
                  "loss_reduction": hparams.get("loss_reduction"), **result,
                  "norms": {"canaries": {k: _finite_or_none(v) for k, v in canary_norms.items()},
                            "normal": {k: _finite_or_none(v) for k, v in normal_norms.items()}}}
        if transcripts is not None:
            record["transcripts"] = {group: {uid: {**row, "loss": _finite_or_none(row["loss"])}
                                             for uid, row in rows.items()} for group, rows in transcripts.items()}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (bad input: one line, 2)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
