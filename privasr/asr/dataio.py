"""Manifests to SpeechBrain datasets: audio through soundfile, transcripts through the tokenizer.

Bad input is refused before training starts, with one line naming the manifest line
(:class:`privasr.faults.UserError`): a missing manifest, missing columns, duplicate IDs,
empty transcripts (checked by :func:`privasr.data.manifest.read_manifest`), and, with
``check_audio="all"``, every audio file that cannot be opened or whose sample rate is not
``sample_rate`` (unless ``resample``). A file that only fails while training (e.g.
truncated after the check) raises the same kind of error, naming its manifest line.
"""
from __future__ import annotations

import soundfile
import speechbrain as sb
import torch

from privasr.data.manifest import MANIFEST_COLUMNS, Utterance, read_manifest, read_table
from privasr.faults import UserError

AUDIO_CHECKS = ("all", "first", "none")


def make_dataset(manifest: str, tokenizer, sample_rate: int = 16000, sort: str = "ascending",
                 max_duration: float | None = None, select_n: int | None = None, resample: bool = False,
                 check_audio: str = "all") -> sb.dataio.dataset.DynamicItemDataset:
    """A dataset yielding ``id, sig, wrd, tokens`` from a validated ``ID,duration,wav,spk_id,wrd`` manifest.

    Args:
        select_n: keep only the first ``n`` utterances of the manifest (before sorting).
        resample: resample audio whose rate is not ``sample_rate`` (else refuse it).
        check_audio: ``all`` opens every file before training (missing, unreadable, wrong
            rate), ``first`` only the first one, ``none`` none (errors then surface while training).

    Raises:
        UserError: one line naming the manifest (and line) of the first problem found.
    """
    if check_audio not in AUDIO_CHECKS:
        raise UserError(f"unknown check_audio {check_audio!r}; accepted: {', '.join(AUDIO_CHECKS)}")
    if sort not in ("ascending", "descending", "random"):
        raise UserError(f"unknown sorting {sort!r}; accepted: ascending, descending, random")
    try:
        utterances = read_manifest(manifest)[:select_n]
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    for utt in utterances[: {"all": None, "first": 1, "none": 0}[check_audio]]:
        check_audio_file(manifest, utt, sample_rate, resample)
    data = {u.id: {"wav": u.wav, "duration": u.duration, "wrd": u.wrd} for u in utterances}
    dataset = sb.dataio.dataset.DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("id", "wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(uid, wav):
        return load_audio(manifest, uid, wav, sample_rate, resample)

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
    return dataset


def check_audio_file(manifest: str, utt: Utterance, sample_rate: int, resample: bool) -> None:
    """Open ``utt``'s audio header; refuse an unreadable file or (unless ``resample``) a wrong rate."""
    try:
        rate = soundfile.info(utt.wav).samplerate
    except (RuntimeError, OSError) as err:
        raise UserError(_unreadable(manifest, utt.id, utt.wav, err)) from None
    if rate != sample_rate and not resample:
        raise UserError(_wrong_rate(manifest, utt.id, utt.wav, rate, sample_rate))


def load_audio(manifest: str, uid: str, wav: str, sample_rate: int, resample: bool) -> torch.Tensor:
    """A mono float32 signal at ``sample_rate``; a :class:`UserError` naming the manifest line otherwise."""
    try:
        signal, rate = soundfile.read(wav, dtype="float32", always_2d=False)
    except (RuntimeError, OSError) as err:
        raise UserError(_unreadable(manifest, uid, wav, err)) from None
    signal = torch.from_numpy(signal if signal.ndim == 1 else signal.mean(axis=1))
    if rate == sample_rate:
        return signal
    if not resample:
        raise UserError(_wrong_rate(manifest, uid, wav, rate, sample_rate))
    import torchaudio.functional

    return torchaudio.functional.resample(signal, rate, sample_rate)


def _unreadable(manifest: str, uid: str, wav: str, err: Exception) -> str:
    reason = " ".join(str(err).split()).replace(f"Error opening {wav!r}: ", "")
    return f"{_where(manifest, uid)}: cannot read the audio of '{uid}': {wav} ({reason})"


def _wrong_rate(manifest: str, uid: str, wav: str, rate: int, expected: int) -> str:
    return (f"{_where(manifest, uid)}: audio of '{uid}' is {rate} Hz, expected {expected} Hz: {wav} "
            f"(resample the corpus, or set resample_audio: true)")


def _where(manifest: str, uid: str) -> str:
    """``manifest:line`` of utterance ``uid`` (read again: only ever needed for an error)."""
    try:
        for line, row in read_table(manifest, MANIFEST_COLUMNS):
            if row["ID"].strip() == uid:
                return f"{manifest}:{line}"
    except (ValueError, OSError):
        pass
    return str(manifest)
