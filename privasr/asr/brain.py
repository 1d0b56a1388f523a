"""The ASR training step and evaluation shared by every recipe (CTC and transducer).

:class:`ASRBrain` turns a SpeechBrain batch into features (no parameters, so computed
once per batch, SpecAugment included) and lets :class:`privasr.brain.PrivateBrain` take
per-core gradients of :meth:`ASRBrain.shard_loss` over them. Evaluation decodes,
scores WER/CER with jiwer, and :meth:`ASRBrain.transcribe` writes the ``ID,hyp,score``
files that :mod:`privasr.exposure` reads, the score being the model's per-utterance loss.
"""
from __future__ import annotations

import csv
import logging
import math
import os

import speechbrain as sb
import torch
from tqdm import tqdm

from privasr.brain import PrivateBrain
from privasr.canaries import canary_id_of, read_canaries
from privasr.core_log import shard_partition
from privasr.decoding import ctc_greedy_decode, ctc_prefix_beam_search
from privasr.metrics import cer, wer
from privasr.models.encoder import relative_to_absolute

logger = logging.getLogger(__name__)


def ctc_infeasible(out_frames: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor) -> torch.Tensor:
    """True where CTC cannot align: fewer frames than labels plus repeated neighbours.

    Such an utterance has an infinite CTC loss (SpeechBrain would silently zero it).
    ``out_frames`` and ``token_lens`` are absolute lengths.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    valid = positions.unsqueeze(0) < token_lens.unsqueeze(1)
    repeats = (tokens[:, 1:] == tokens[:, :-1]) & valid[:, 1:]
    return out_frames < token_lens + repeats.sum(1)


def canary_insertions(canaries_csv) -> dict[str, int]:
    """``{canary ID: insertions}`` of a ``canaries.csv``; empty when there is none."""
    if not canaries_csv or not os.path.isfile(canaries_csv):
        return {}
    canaries, counts = read_canaries(canaries_csv)
    return {utt.id: count for utt, count in zip(canaries, counts)}


class ASRBrain(PrivateBrain):
    """Conformer ASR (``hparams.model_kind``: ``ctc`` or ``transducer``) under per-core clipping."""

    _canary_insertions: dict | None = None

    # -- training (per-core gradients) -------------------------------------------------
    def batch_to_tensors(self, batch):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens, token_lens = batch.tokens
        model = self.modules.model
        feats, feat_lens = model.features(wavs, wav_lens)
        feats = model.augment(feats, feat_lens)
        self._count_infeasible(model, feats, feat_lens, tokens, token_lens)
        return feats, feat_lens, tokens, token_lens

    def shard_labels(self, batch, num_shards):
        """Per core: the largest insertion count among its canaries (0: no canary), for the core log."""
        if self._canary_insertions is None:
            self._canary_insertions = canary_insertions(getattr(self.hparams, "canaries_csv", None))
        counts = [self._canary_insertions.get(canary_id_of(uid) or uid, 0) for uid in batch.id]
        return [max(shard, default=0) for shard in shard_partition(counts, num_shards)]

    def trim_shard(self, feats, feat_lens, tokens, token_lens):
        """The shard cut to its longest utterance and transcript; relative lengths rescaled to the new widths.

        The encoder zeroes padding before every convolution and masks it in attention and in
        the per-utterance feature normalization, so the shard's gradient is unchanged (tested)
        while a core of short utterances no longer pays for the batch's longest one.
        """
        frames = relative_to_absolute(feat_lens, feats.shape[1])
        labels = relative_to_absolute(token_lens, tokens.shape[1])
        width, label_width = int(frames.max()), max(int(labels.max()), 1)
        return (feats[:, :width], frames.to(feat_lens.dtype) / width, tokens[:, :label_width],
                labels.to(token_lens.dtype) / label_width)

    def shard_loss(self, feats, feat_lens, tokens, token_lens):
        out, out_lens = self._forward_features(feats, feat_lens, tokens)
        return self.modules.model.loss(out, out_lens, tokens, token_lens, reduction=self.hparams.loss_reduction)

    def shard_loss_reduction(self):
        """``loss_reduction`` (mean: of each utterance's loss per token; sum), for ``core_grad_mode: ghost``."""
        return self.hparams.loss_reduction

    def _forward_features(self, feats, feat_lens, tokens):
        if self.hparams.model_kind == "transducer":
            return self.modules.model.forward_features(feats, feat_lens, tokens)
        return self.modules.model.forward_features(feats, feat_lens)

    def _count_infeasible(self, model, feats, feat_lens, tokens, token_lens):
        if self.hparams.model_kind != "ctc":
            return
        n_frames = torch.round(feat_lens * feats.shape[1]).long()
        out_frames = model.encoder.subsampling.output_lengths(n_frames)
        abs_tokens = torch.round(token_lens * tokens.shape[1]).long()
        bad = int(ctc_infeasible(out_frames, tokens, abs_tokens).sum())
        self.counters.infinite_loss_utterances += bad

    # -- evaluation ---------------------------------------------------------------------
    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens, _ = batch.tokens
        model = self.modules.model
        feats, feat_lens = model.features(wavs, wav_lens)
        return self._forward_features(feats, feat_lens, tokens)

    def per_utterance_loss(self, predictions, batch):
        out, out_lens = predictions
        tokens, token_lens = batch.tokens
        return self.modules.model.loss(out, out_lens, tokens, token_lens, reduction="none")

    def compute_objectives(self, predictions, batch, stage):
        losses = self.comparable_losses(self.per_utterance_loss(predictions, batch), batch)
        finite = losses[torch.isfinite(losses)]
        loss = finite.mean() if finite.numel() else torch.zeros(())
        if stage != sb.Stage.TRAIN:
            self._references += list(batch.wrd)
            self._hypotheses += self.decode(predictions, batch)
        return loss

    def comparable_losses(self, losses, batch):
        """Per-utterance losses on the training loss's scale, so valid and train loss can be compared.

        With ``loss_reduction: mean`` training minimizes each utterance's loss divided by its token
        count (averaged over utterances), so evaluation divides by the token count too; with ``sum``
        it stays the utterance's total loss.
        """
        if self.hparams.loss_reduction != "mean":
            return losses
        tokens, token_lens = batch.tokens
        return losses / relative_to_absolute(token_lens, tokens.shape[1]).clamp(min=1).to(losses.dtype)

    def decode(self, predictions, batch) -> list[str]:
        """Transcripts of a batch: CTC greedy / prefix beam search, or transducer greedy."""
        out, out_lens = predictions
        beam = int(getattr(self.hparams, "beam_size", 1))
        if self.hparams.model_kind == "transducer":
            wavs, wav_lens = batch.sig
            ids = self.modules.model.greedy_decode(wavs, wav_lens)
        elif beam > 1:
            ids = ctc_prefix_beam_search(out, out_lens, beam_size=beam)
        else:
            ids = ctc_greedy_decode(out, out_lens)
        return [self.hparams.tokenizer.decode(seq) for seq in ids]

    def on_stage_start(self, stage, epoch=None):
        self._references, self._hypotheses = [], []

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = {**stats, **vars(self.counters)}
            if self.train_stats["infinite_loss_utterances"]:
                logger.warning("%d training utterances had an infinite CTC loss (fewer frames than tokens); "
                               "their loss was zeroed", self.train_stats["infinite_loss_utterances"])
            return
        stats["WER"] = 100 * wer(self._references, self._hypotheses)
        stats["CER"] = 100 * cer(self._references, self._hypotheses)
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats({"epoch": epoch}, train_stats=self.train_stats, valid_stats=stats)
            self._log_tensorboard_epoch(epoch, stats)
            self.checkpointer.save_and_keep_only(meta={"WER": stats["WER"], "epoch": epoch},
                                                 min_keys=["WER"], num_to_keep=1)
        else:
            self.hparams.train_logger.log_stats({"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)

    def _log_tensorboard_epoch(self, epoch, valid_stats):
        writer = self._tensorboard()
        if writer is None or not sb.utils.distributed.if_main_process():
            return
        for name, value in self.train_stats.items():
            writer.add_scalar(f"train/{name}", float(value), epoch)
        for name, value in valid_stats.items():
            writer.add_scalar(f"valid/{name}", float(value), epoch)
        writer.flush()

    # -- transcripts for exposure -------------------------------------------------------
    @torch.no_grad()
    def transcribe(self, dataset, out_csv: str, loader_kwargs: dict) -> None:
        """Write ``ID,hyp,ref,score`` for every utterance; ``score`` = the utterance's loss (lower = better fit)."""
        self.modules.eval()
        kwargs = {k: v for k, v in loader_kwargs.items() if k != "ckpt_prefix"}  # Brain.evaluate adds it
        loader = sb.dataio.dataloader.make_dataloader(dataset, **kwargs)
        os.makedirs(os.path.dirname(out_csv), exist_ok=True)
        tmp = out_csv + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "hyp", "ref", "score"])
            for batch in tqdm(loader, desc=os.path.basename(out_csv), dynamic_ncols=True):
                with self.evaluation_ctx:  # --eval_precision, as in Brain.evaluate
                    predictions = self.compute_forward(batch, sb.Stage.TEST)
                    losses = self.per_utterance_loss(predictions, batch.to(self.device)).float().tolist()
                for uid, hyp, ref, loss in zip(batch.id, self.decode(predictions, batch), batch.wrd, losses):
                    writer.writerow([uid, hyp, ref, loss if math.isfinite(loss) else "inf"])
        os.replace(tmp, out_csv)  # nothing half-written
