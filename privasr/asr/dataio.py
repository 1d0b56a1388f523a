"""Manifests to SpeechBrain datasets: audio through soundfile, transcripts through the tokenizer."""
from __future__ import annotations

import speechbrain as sb
import soundfile
import torch

from privasr.data.manifest import read_manifest


def _check_sample_rate(path: str, expected: int) -> None:
    rate = soundfile.info(path).samplerate
    if rate != expected:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {expected} Hz (resample the corpus first)")


def make_dataset(manifest: str, tokenizer, sample_rate: int = 16000, sort: str = "ascending",
                 max_duration: float | None = None, select_n: int | None = None
                 ) -> sb.dataio.dataset.DynamicItemDataset:
    """A dataset yielding ``id, sig, wrd, tokens`` from a validated ``ID,duration,wav,spk_id,wrd`` manifest.

    ``select_n`` keeps only the first ``n`` utterances of the manifest (before sorting).
    The manifest is checked first (missing audio, duplicate IDs, empty transcripts raise a
    ValueError naming the file and line), so training never starts on a broken corpus.
    """
    utterances = read_manifest(manifest)[:select_n]
    if utterances:
        _check_sample_rate(utterances[0].wav, sample_rate)
    data = {u.id: {"wav": u.wav, "duration": u.duration, "wrd": u.wrd} for u in utterances}
    dataset = sb.dataio.dataset.DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        signal, rate = soundfile.read(wav, dtype="float32", always_2d=False)
        if rate != sample_rate:
            raise ValueError(f"{wav}: sample rate {rate} Hz, expected {sample_rate} Hz")
        return torch.from_numpy(signal if signal.ndim == 1 else signal.mean(axis=1))

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens")
    def text_pipeline(wrd):
        return tokenizer.encode_as_tensor(wrd)

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([dataset], text_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "sig", "wrd", "tokens"])
    if sort in ("ascending", "descending"):
        key_max = {"duration": max_duration} if max_duration else {}
        dataset = dataset.filtered_sorted(sort_key="duration", reverse=sort == "descending", key_max_value=key_max)
    elif sort != "random":
        raise ValueError(f"unknown sorting {sort!r}; accepted: ascending, descending, random")
    return dataset
