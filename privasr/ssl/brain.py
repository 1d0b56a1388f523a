r"""BEST-RQ pre-training Brains: non-private (:class:`BestRQBrain`) and DP-SGD (:class:`DPBestRQBrain`).

The recipe, :class:`BestRQRecipe`, is written once and combined with either training step::

    BestRQRecipe(PrivasrBrain)                  batch_to_tensors, shard_loss, example_losses, evaluation, export
    BestRQBrain(BestRQRecipe, PerCoreBrain)     + the per-core step (privasr.brain)
    DPBestRQBrain = make_dp_brain(BestRQRecipe)  = (DPSGDBrain, BestRQRecipe): + the DP-SGD step (privasr.dp.brain)

so the DP Brain carries no per-core state. The recipe follows :class:`privasr.brain.PrivasrBrain`'s
contract. Everything random or parameter-free happens once per batch, outside any per-example
transform::

    batch_to_tensors:  wavs -> fbanks (encoder.features) -> BestRQ.prepare
                       = (noised inputs, lengths, codebook targets, span mask)
    shard_loss:        masked cross-entropy  L = Σ m·CE(W h, y) / max(1, Σ m)   (BestRQ.loss)

so per-example gradients (loop or ``vmap``) see a deterministic function of the parameters.
``modules`` holds one entry, ``bestrq``: a :class:`privasr.models.bestrq.BestRQ` around a
:class:`privasr.models.encoder.ConformerEncoder` (``encoder_method="encode"``).

Validation masks with a fixed generator (``valid_mask_seed``), so the validation loss and
masked-frame accuracy of different epochs are comparable; training masks are unaffected.

:class:`DPBestRQBrain`: public warm-start with LayerFreeze scores, freezing, then DP-SGD (see
:mod:`privasr.dp.brain`).
"""
from __future__ import annotations

import logging
from typing import Optional

import speechbrain as sb
import torch
import torch.nn.functional as F

from privasr.brain import PrivasrBrain, PrivateBrain
from privasr.dp.brain import make_dp_brain
from privasr.ssl.pretrained import export_encoder

__all__ = ["BestRQBrain", "BestRQRecipe", "DPBestRQBrain"]

logger = logging.getLogger(__name__)


class BestRQRecipe(PrivasrBrain):
    """BEST-RQ masked prediction of random-projection codes (``modules.bestrq``), without a training step.

    The recipe part of the BEST-RQ Brains: the tensors and losses the training steps differentiate,
    the evaluation and the export. It derives from :class:`~privasr.brain.PrivasrBrain` (not from
    ``object``) so that in ``(DPSGDBrain, BestRQRecipe)`` its methods still come before the
    infrastructure base's and ``sb.Brain``'s defaults in the MRO, and ``DPSGDBrain.on_stage_end``'s
    ``super()`` reaches :meth:`on_stage_end` here. Alone it has no private step: train
    :class:`BestRQBrain` or :class:`DPBestRQBrain`.
    """

    # -- training (the PrivasrBrain recipe contract) -----------------------------------------
    def batch_to_tensors(self, batch):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        bestrq = self.modules.bestrq
        feats, feat_lens = bestrq.encoder.features(wavs, wav_lens)
        prepared = bestrq.prepare(feats, feat_lens)
        return prepared.inputs, feat_lens, prepared.targets, prepared.mask

    def shard_loss(self, inputs, lens, targets, mask):
        return self.modules.bestrq.loss(inputs, lens, targets, mask)

    def example_losses(self, inputs, lens, targets, mask):
        """Each example's mean over its own masked frames, ``[n]``: what DP-SGD's ghost mode clips per example."""
        return self.modules.bestrq.loss(inputs, lens, targets, mask, reduction="per_example")

    def shard_loss_reduction(self):
        """None: BEST-RQ's loss is a mean over masked frames pooled across the shard's examples, not a mean of
        per-example losses, so the per-core step's ``core_grad_mode: ghost`` (one forward of the whole batch) would
        be inexact and is refused; DP-SGD's ghost differentiates :meth:`example_losses` instead."""
        return None

    # -- evaluation ------------------------------------------------------------------------
    def compute_forward(self, batch, stage):
        inputs, lens, targets, mask = self.batch_to_tensors(batch)
        bestrq = self.modules.bestrq
        out = getattr(bestrq.encoder, bestrq.encoder_method)(inputs, lens)[0]
        n = min(out.shape[1], targets.shape[1])
        return bestrq.head(out[:, :n]), targets[:, :n], mask[:, :n]

    def compute_objectives(self, predictions, batch, stage):
        logits, targets, mask = predictions
        weight = mask.to(logits.dtype)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        self._masked_frames += float(weight.sum())
        self._correct += float(((logits.argmax(-1) == targets) & mask).sum())
        return (ce * weight).sum() / weight.sum().clamp(min=1.0)

    def on_stage_start(self, stage, epoch=None):
        self._masked_frames, self._correct = 0.0, 0.0
        if stage != sb.Stage.TRAIN:  # the same masks at every validation
            seed = int(getattr(self.hparams, "valid_mask_seed", 0))
            self._train_generator = self.modules.bestrq.generator
            self.modules.bestrq.generator = torch.Generator().manual_seed(seed)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            return
        self.modules.bestrq.generator = self._train_generator
        stats = {"loss": stage_loss, "masked_accuracy": 100.0 * self._correct / max(self._masked_frames, 1.0)}
        train_logger = getattr(self.hparams, "train_logger", None)
        if stage == sb.Stage.VALID:
            if train_logger is not None:
                train_logger.log_stats({"epoch": epoch}, train_stats=getattr(self, "train_stats", None),
                                       valid_stats=stats)
            self._log_tensorboard_epoch(epoch, stats)
            if self.checkpointer is not None:  # the latest model is the result (no selection on data)
                self.checkpointer.save_and_keep_only(meta={**stats, "epoch": epoch}, num_to_keep=1)
        elif train_logger is not None:
            train_logger.log_stats({"Epoch loaded": epoch}, test_stats=stats)

    def _log_tensorboard_epoch(self, epoch, valid_stats) -> None:
        writer = self._tensorboard()
        if writer is None or not sb.utils.distributed.if_main_process():
            return
        for name, value in getattr(self, "train_stats", {}).items():
            writer.add_scalar(f"train/{name}", float(value), epoch)
        for name, value in valid_stats.items():
            writer.add_scalar(f"valid/{name}", float(value), epoch)
        writer.flush()

    # -- result ----------------------------------------------------------------------------
    def export_encoder(self, path: Optional[str] = None) -> Optional[str]:
        """Write the encoder's ``state_dict`` (``hparams.encoder_file`` by default), main process only."""
        path = path or getattr(self.hparams, "encoder_file", None)
        if path is None:
            raise ValueError("export_encoder needs a path or the hyper-parameter encoder_file")
        if sb.utils.distributed.if_main_process():
            export_encoder(self.modules.bestrq.encoder, path)
            logger.info("pre-trained encoder written to %s", path)
        sb.utils.distributed.ddp_barrier()
        return path


class BestRQBrain(BestRQRecipe, PrivateBrain):
    """Non-private (or per-core clipped) BEST-RQ pre-training: the recipe with the per-core step."""


#: BEST-RQ pre-training with public warm-start, LayerFreeze and DP-SGD: ``(DPSGDBrain, BestRQRecipe)``.
DPBestRQBrain = make_dp_brain(BestRQRecipe, "DPBestRQBrain")
