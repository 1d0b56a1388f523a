"""mini_tts: a small English ASR corpus synthesized on the machine, no download.

Text: the seeded template grammar of :mod:`privasr.data.text_source` (an embedded word list
of 2,125 English word forms; sentences of 5-15 words, 8 on average). Splits are disjoint and prefix-stable:
the first 3,000 train sentences of a 10,000-utterance corpus are the 3,000 of the default one.

Audio: each utterance is spoken by one of 28 speakers -- 24 espeak-ng configurations
(8 English accents x voice variants, rates 135-185 wpm, pitches 25-80) and 4 flite voices
(slt, rms, awb, kal16) -- chosen with ``random.Random(f"{seed}:{utterance id}")``, then
resampled by sox to 16 kHz mono 16-bit WAV. ``spk_id`` is the voice configuration
(e.g. ``espeak-ng_en-gb+f2_s160_p60``). The same seed gives the same text, the same speakers
and byte-identical audio.

Output under ``--out``::

    train.csv dev.csv test.csv   SpeechBrain manifests (ID,duration,wav,spk_id,wrd)
    lexicon.txt                  sorted unique words of train (default canary vocabulary)
    wav/<split>/<ID>.wav
    .mini_tts.done               parameters of the completed run (a rerun does nothing)

Usage::

    python -m privasr.data.mini_tts --out data/mini_tts --nj 2 [--seed 0] [--num-train 3000]
"""
from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Sequence

from privasr.cli import CliParser, run_cli
from privasr.data import claim_dir, is_done, mark_done
from privasr.data.manifest import Utterance, lexicon, write_lexicon, write_manifest
from privasr.data.text_source import split_sentences
from privasr.tts import SAMPLE_RATE, SynthesisJob, Voice, synthesize_many

__all__ = ["prepare_mini_tts", "speakers", "plan_jobs", "SPLITS", "CORPUS_VERSION"]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
#: Bump when the grammar, the word lists or the speaker bank change (invalidates old audio).
CORPUS_VERSION = 1

_ESPEAK_SPEAKERS = [  # (voice+variant, words per minute, pitch 0..99)
    ("en-us+m1", 150, 45), ("en-us+m3", 165, 35), ("en-us+f2", 155, 65), ("en-us+f4", 175, 70),
    ("en-us+m6", 185, 50), ("en-us+f5", 140, 80), ("en-gb+m2", 145, 40), ("en-gb+m4", 170, 50),
    ("en-gb+f1", 160, 60), ("en-gb+f3", 140, 75), ("en-gb+m5", 165, 52), ("en-gb+m7", 150, 25),
    ("en-gb-scotland+m5", 150, 30), ("en-gb-scotland+f5", 165, 55), ("en-gb-x-rp+m7", 155, 45),
    ("en-gb-x-rp+f2", 180, 68), ("en-029+m1", 140, 38), ("en-029+f4", 160, 62),
    ("en-us-nyc+m2", 175, 42), ("en-us-nyc+f1", 150, 58), ("en-gb-x-gbclan+m3", 135, 48),
    ("en-gb-x-gbclan+f3", 170, 72), ("en-gb-x-gbcwmd+m4", 160, 33), ("en-gb-x-gbcwmd+f5", 145, 66),
]
_FLITE_SPEAKERS = [("slt", 155), ("rms", 150), ("awb", 160), ("kal16", 165)]


def speakers(use_flite: bool = True) -> list[Voice]:
    """The speaker bank: 24 espeak-ng configurations, plus 4 flite voices if ``use_flite``.

    Changing this list changes which speaker reads each utterance: bump :data:`CORPUS_VERSION`.
    """
    bank = [Voice("espeak-ng", name, rate, pitch) for name, rate, pitch in _ESPEAK_SPEAKERS]
    return bank + ([Voice("flite", name, rate) for name, rate in _FLITE_SPEAKERS] if use_flite else [])


def _spoken(sentence: str) -> str:
    """Text given to the engine: the sentence with final punctuation for natural prosody."""
    question = sentence.split()[0] in {"did", "why", "how"}
    return sentence + ("?" if question else ".")


def plan_jobs(out_dir: str | Path, sizes: dict[str, int], seed: int, use_flite: bool) -> dict[str, list[SynthesisJob]]:
    """The synthesis jobs of every split, in manifest order (pure: touches no file)."""
    texts = split_sentences(sizes["train"], sizes["dev"], sizes["test"], seed=seed)
    bank = speakers(use_flite)
    wav_root = Path(out_dir).resolve() / "wav"
    plan = {}
    for split in SPLITS:
        jobs = []
        for index, sentence in enumerate(texts[split]):
            utt_id = f"{split}_{index:06d}"
            voice = bank[random.Random(f"{seed}:{utt_id}").randrange(len(bank))]
            jobs.append(SynthesisJob(_spoken(sentence), voice, str(wav_root / split / f"{utt_id}.wav")))
        plan[split] = jobs
    return plan


def _utterance(job: SynthesisJob, duration: float) -> Utterance:
    words = job.text.rstrip(".?").upper().split()
    return Utterance(Path(job.path).stem, duration, job.path, job.voice.id, " ".join(words))


def prepare_mini_tts(
    out_dir: str | Path,
    num_train: int = 3000,
    num_dev: int = 200,
    num_test: int = 200,
    nj: int = 1,
    seed: int = 0,
    use_flite: bool = True,
) -> dict[str, Path]:
    """Synthesize the corpus into ``out_dir``; return ``{"train", "dev", "test", "lexicon"}`` paths.

    Idempotent: when ``out_dir/.mini_tts.done`` records the same parameters and the outputs
    exist, nothing is done. An interrupted run resumes (existing WAV files are kept); WAVs
    made with another seed or speaker bank are deleted first.
    """
    sizes = {"train": num_train, "dev": num_dev, "test": num_test}
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"num_{split} must be >= 0, got {size}")
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    out_dir = Path(out_dir)
    outputs = {**{s: out_dir / f"{s}.csv" for s in SPLITS}, "lexicon": out_dir / "lexicon.txt"}
    audio_key = {"seed": seed, "use_flite": use_flite, "version": CORPUS_VERSION, "sample_rate": SAMPLE_RATE}
    params = {**audio_key, **sizes}
    marker = out_dir / ".mini_tts.done"
    if is_done(marker, params, outputs.values()):
        log.info("mini_tts already prepared in %s (nothing to do)", out_dir)
        return outputs
    marker.unlink(missing_ok=True)
    claim_dir(out_dir / "wav", audio_key)
    plan = plan_jobs(out_dir, sizes, seed, use_flite)
    jobs = [job for split in SPLITS for job in plan[split]]
    durations = iter(synthesize_many(jobs, nj=nj, desc="mini_tts"))
    manifests = {split: [_utterance(job, next(durations)) for job in plan[split]] for split in SPLITS}
    for split in SPLITS:
        write_manifest(outputs[split], manifests[split])
    write_lexicon(outputs["lexicon"], lexicon(manifests["train"]))
    mark_done(marker, params)
    _log_summary(manifests)
    return outputs


def _log_summary(manifests: dict[str, list[Utterance]]) -> None:
    for split, utts in manifests.items():
        hours = sum(u.duration for u in utts) / 3600
        log.info("%s: %d utterances, %.2f h, %d speakers", split, len(utts), hours, len({u.spk_id for u in utts}))
    log.info("train vocabulary: %d words", len(lexicon(manifests["train"])))


def _parser() -> CliParser:
    parser = CliParser(prog="python -m privasr.data.mini_tts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--nj", type=int, default=1, help="parallel synthesis jobs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="text, speaker and audio seed (default 0)")
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-dev", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--no-flite", action="store_true", help="espeak-ng speakers only")
    return parser


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = prepare_mini_tts(args.out, args.num_train, args.num_dev, args.num_test,
                             nj=args.nj, seed=args.seed, use_flite=not args.no_flite)
    for name, path in paths.items():
        print(f"{name}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    return run_cli(_main, argv, prog="python -m privasr.data.mini_tts")


if __name__ == "__main__":
    sys.exit(main())
