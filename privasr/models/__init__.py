"""privasr's ASR models: Conformer-CTC and Conformer-transducer.

Every model follows one contract (lengths are SpeechBrain *relative* lengths):

* ``model.features(wavs, wav_lens) -> (feats, feat_lens)``: parameter-free
  80-mel fbanks, normalized per utterance;
* ``model.augment(feats, feat_lens)``: SpecAugment on a batch (training only);
* ``model.forward_features(feats, feat_lens[, tokens])`` and
  ``model(wavs, wav_lens[, tokens])``: CTC log-probs ``[B, T, V]`` or
  transducer logits ``[B, T, U+1, V]``, plus output lengths;
* ``model.loss(out, out_lens, tokens, token_lens, reduction)`` with
  ``reduction`` in ``("mean", "sum", "none")``;
* ``model.param_groups()``: the groups of ``privasr.dp.per_layer.LAYER_REGEX`` (per-layer clipping,
  freezing) under short names: ``frontend``, ``layer.<i>``, ``final_norm``, the head(s).

All of it is safe under ``torch.func.vmap(torch.func.grad(...))`` for
per-example gradients; see :mod:`privasr.models.encoder` for why.
"""

from privasr.models.conformer_ctc import ConformerCTC
from privasr.models.ctc_loss import ctc_loss
from privasr.models.encoder import ConformerEncoder, build_spec_augment, encoder_param_groups
from privasr.models.rnnt_loss import rnnt_loss
from privasr.models.sizes import PUBLISHED_PARAMS, SIZES, build_model, count_parameters, get_size
from privasr.models.transducer import ConformerTransducer

__all__ = [
    "ConformerCTC",
    "ConformerTransducer",
    "ConformerEncoder",
    "build_model",
    "build_spec_augment",
    "count_parameters",
    "ctc_loss",
    "encoder_param_groups",
    "get_size",
    "rnnt_loss",
    "PUBLISHED_PARAMS",
    "SIZES",
]
