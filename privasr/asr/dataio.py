"""Manifests to SpeechBrain datasets: audio through soundfile, transcripts through the tokenizer.

Bad input is refused before training starts, with one line naming the manifest line
(:class:`privasr.errors.UserError`): a missing manifest, missing columns, duplicate IDs,
empty transcripts (checked by :func:`privasr.data.manifest.read_manifest`), and, with
``check_audio="all"``, every audio file that cannot be opened or whose sample rate is not
``sample_rate`` (unless ``resample``) or whose length disagrees with the manifest's
``duration`` by more than :data:`DURATION_ERROR` (a smaller disagreement, beyond
:data:`DURATION_WARNING`, is warned about: sorting and ``max_duration`` use the manifest's
value). A manifest with no utterance, or none left by ``max_duration``, is refused; so are
transcripts the tokenizer would mostly turn into ``<unk>`` (a few unknown characters are
warned about, naming the utterances). A file that only fails while training (e.g.
truncated after the check) raises the same kind of error, naming its manifest line.
"""
from __future__ import annotations

import logging

import soundfile
import speechbrain as sb
import torch

from privasr.data.manifest import MANIFEST_COLUMNS, Utterance, read_manifest, read_table
from privasr.errors import UserError

logger = logging.getLogger(__name__)

AUDIO_CHECKS = ("all", "first", "none")
#: audio length vs the manifest's duration (seconds): beyond WARNING a warning, beyond ERROR (or a
#: relative ERROR_FRACTION of the audio, whichever is larger) an error: the manifest describes other audio
DURATION_WARNING, DURATION_ERROR, DURATION_ERROR_FRACTION = 0.05, 0.5, 0.1
#: an utterance whose non-space characters are more than this fraction unknown to the tokenizer is refused
UNKNOWN_ERROR_FRACTION = 0.5


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
    utterances = within_max_duration(manifest, utterances, max_duration)
    mismatches = []
    for utt in utterances[: {"all": None, "first": 1, "none": 0}[check_audio]]:
        mismatches += check_audio_file(manifest, utt, sample_rate, resample)
    warn_duration_mismatches(manifest, mismatches)
    if tokenizer is not None:
        check_transcripts(manifest, utterances, tokenizer)
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
    if sort in ("ascending", "descending"):  # max_duration was applied above, whatever the sorting
        dataset = dataset.filtered_sorted(sort_key="duration", reverse=sort == "descending")
    return dataset


def within_max_duration(manifest: str, utterances: list[Utterance], max_duration: float | None) -> list[Utterance]:
    """The utterances of at most ``max_duration`` s; none at all (or none left) is an error, a cut a warning."""
    if not utterances:
        raise UserError(f"{manifest}: no utterances (nothing after the header)")
    if not max_duration:
        return utterances
    kept = [u for u in utterances if u.duration <= max_duration]
    if not kept:
        raise UserError(f"{manifest}: no utterance of at most max_duration {max_duration} s (the shortest is "
                        f"{min(u.duration for u in utterances):g} s); raise --max_duration")
    if len(kept) < len(utterances):
        logger.warning("%s: %d of %d utterances are longer than max_duration %g s and left out (longest %g s)",
                       manifest, len(utterances) - len(kept), len(utterances), max_duration,
                       max(u.duration for u in utterances))
    return kept


def check_audio_file(manifest: str, utt: Utterance, sample_rate: int, resample: bool) -> list[tuple]:
    """Open ``utt``'s audio header; refuse an unreadable file, (unless ``resample``) a wrong rate, a wrong length.

    The length ``frames / rate`` is compared with the manifest's ``duration``: a difference
    beyond ``max(DURATION_ERROR, DURATION_ERROR_FRACTION * length)`` is refused (the manifest
    describes other audio, e.g. a file replaced after the manifest was written, or durations in
    another unit); beyond ``DURATION_WARNING`` it is returned as ``[(utt, length)]`` for one warning.
    """
    try:
        info = soundfile.info(utt.wav)
    except (RuntimeError, OSError) as err:
        raise UserError(_unreadable(manifest, utt.id, utt.wav, err)) from None
    if info.samplerate != sample_rate and not resample:
        raise UserError(_wrong_rate(manifest, utt.id, utt.wav, info.samplerate, sample_rate))
    length = info.frames / info.samplerate
    difference = abs(length - utt.duration)
    if difference > max(DURATION_ERROR, DURATION_ERROR_FRACTION * length):
        raise UserError(f"{_where(manifest, utt.id)}: duration {utt.duration:g} s of '{utt.id}' disagrees with its "
                        f"audio ({length:g} s): {utt.wav} (rewrite the manifest from the audio)")
    return [(utt, length)] if difference > DURATION_WARNING else []


def warn_duration_mismatches(manifest: str, mismatches: list[tuple]) -> None:
    """One warning for every utterance whose audio length is off its manifest duration (within the error bound)."""
    if not mismatches:
        return
    worst, length = max(mismatches, key=lambda m: abs(m[1] - m[0].duration))
    logger.warning("%s: %d utterance(s) whose duration differs from the audio by more than %g s (largest: %s '%s' "
                   "%g s in the manifest, %g s of audio); sorting and max_duration use the manifest's", manifest,
                   len(mismatches), DURATION_WARNING, _where(manifest, worst.id), worst.id, worst.duration, length)


def check_transcripts(manifest: str, utterances: list[Utterance], tokenizer) -> None:
    """Characters of the transcripts that ``tokenizer`` encodes to ``<unk>``.

    An utterance that is more than :data:`UNKNOWN_ERROR_FRACTION` unknown (e.g. lower-case
    text for an upper-case tokenizer) would silently train and score on ``<unk>``: refused,
    naming the line and characters. Fewer unknown characters: one warning naming the
    characters and the first utterances (training goes on; they become ``<unk>``).
    """
    unknown_of = getattr(tokenizer, "unknown_characters", None)
    if unknown_of is None:
        return
    found = []
    for utt in utterances:
        unknown = unknown_of(utt.wrd)
        if not unknown:
            continue
        chars = [c for c in utt.wrd if not c.isspace()]
        share = sum(c in unknown for c in chars) / len(chars)
        if share > UNKNOWN_ERROR_FRACTION:
            raise UserError(f"{_where(manifest, utt.id)}: the tokenizer does not know {share:.0%} of the characters "
                            f"of '{utt.id}' ({_shown(unknown)}): they would all become <unk>; normalize the text "
                            "as the tokenizer's training text (case?) or retrain the tokenizer")
        found.append((utt, unknown))
    if found:
        chars = sorted({c for _, unknown in found for c in unknown})
        first = ", ".join(f"{_where(manifest, u.id)} '{u.id}' ({_shown(unk)})" for u, unk in found[:3])
        logger.warning("%s: %d utterance(s) hold characters the tokenizer does not know (%s), encoded as <unk>: %s%s",
                       manifest, len(found), _shown(chars), first, ", ..." if len(found) > 3 else "")


def _shown(chars) -> str:
    return " ".join(repr(c) for c in chars)


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
