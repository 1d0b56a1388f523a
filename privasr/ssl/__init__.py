"""Self-supervised pre-training of the Conformer encoder (BEST-RQ), private or not.

* :mod:`privasr.ssl.brain` -- :class:`BestRQBrain` and :class:`DPBestRQBrain` (public
  warm-start, LayerFreeze, DP-SGD);
* :mod:`privasr.ssl.dataio` -- unlabeled audio manifests and the public / private split;
* :mod:`privasr.ssl.pretrained` -- build, export and load the pre-trained encoder
  (``load_pretrained_encoder`` is what a fine-tuning YAML calls);
* :mod:`privasr.ssl.results` -- ``RESULTS.md``: ε of the pre-training next to the WER of
  the fine-tuned models (its rows; :mod:`privasr.results_md` writes every RESULTS.md).
"""
from privasr.ssl.dataio import audio_dataset, read_audio_manifest, split_public_private
from privasr.ssl.pretrained import build_encoder, export_encoder, load_pretrained_encoder
from privasr.ssl.brain import BestRQBrain, DPBestRQBrain  # noqa: E402 (after pretrained, which it uses)

__all__ = [
    "BestRQBrain",
    "DPBestRQBrain",
    "audio_dataset",
    "build_encoder",
    "export_encoder",
    "load_pretrained_encoder",
    "read_audio_manifest",
    "split_public_private",
]
