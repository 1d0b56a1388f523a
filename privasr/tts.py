"""Offline text-to-speech: espeak-ng or flite, then sox (tempo, 16 kHz mono, 16-bit).

One utterance is synthesized as::

    espeak-ng -v VOICE -s RATE -p PITCH -g GAP --stdout TEXT   (or: flite -voice VOICE ... -o tmp.wav)
      | sox - [tempo -s SPEED] rate -v 16000 channels 1   -> raw 16-bit PCM on stdout
      -> soundfile.write(path, PCM_16 WAV)

``sox tempo`` changes the speed without changing the pitch (WSOLA, tuned for speech with
``-s``); the canaries use ``speed=4`` as in the paper. Both engines and sox are deterministic
and dither is disabled (``sox -D``), so the same text and voice give byte-identical files.

The heavy work runs in the child processes, so :func:`synthesize_many` parallelises with a
thread pool of ``nj`` workers (each thread waits on its own espeak-ng/sox pipeline).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile
from tqdm import tqdm

__all__ = ["Voice", "SynthesisJob", "synthesize", "synthesize_to_file", "synthesize_many", "check_tools",
           "check_voices",
           "SAMPLE_RATE"]

SAMPLE_RATE = 16000
ENGINES = ("espeak-ng", "flite")
_FLITE_NATURAL_WPM = 170.0  # flite's speaking rate at duration_stretch=1, roughly
_INSTALL_HINT = "install it (apt-get install -y espeak-ng sox flite)"


@dataclass(frozen=True)
class Voice:
    """A synthesis voice configuration.

    Attributes:
        engine: ``"espeak-ng"`` or ``"flite"``.
        name: espeak-ng voice with optional variant (``"en-us+m3"``, ``"en-gb+f2"``) or a flite
            voice (``"slt"``, ``"rms"``, ``"awb"``, ``"kal16"``).
        rate: words per minute (espeak-ng ``-s``, 80..450); for flite, mapped to
            ``duration_stretch = 170 / rate``.
        pitch: espeak-ng ``-p`` (0..99, default 50); for flite, the F0 mean in Hz
            (``int_f0_target_mean``); ``None`` keeps the voice's default.
        word_gap: extra pause between words, espeak-ng ``-g`` (units of 10 ms at the default
            rate); ignored by flite.
    """

    engine: str = "espeak-ng"
    name: str = "en-us"
    rate: int = 160
    pitch: int | None = None
    word_gap: int = 0

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"unknown TTS engine '{self.engine}', expected one of {', '.join(ENGINES)}")
        if not 20 <= self.rate <= 450:
            raise ValueError(f"speaking rate {self.rate} wpm out of range 20..450")
        if self.engine == "espeak-ng" and self.rate < 80:
            raise ValueError(f"espeak-ng rates below 80 wpm are clamped to 80; got {self.rate}")
        if self.word_gap < 0:
            raise ValueError(f"word gap must be >= 0, got {self.word_gap}")

    @property
    def id(self) -> str:
        """Speaker id used in manifests, e.g. ``espeak-ng_en-us+m3_s150_p40``."""
        parts = [self.engine, self.name, f"s{self.rate}"]
        parts += [f"p{self.pitch}"] if self.pitch is not None else []
        parts += [f"g{self.word_gap}"] if self.word_gap else []
        return "_".join(parts)

    def command(self, text: str, wav_out: str) -> list[str]:
        """The engine's command line (espeak-ng writes to stdout, flite to ``wav_out``)."""
        if self.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", self.name, "-s", str(self.rate), "-g", str(self.word_gap), "--stdout"]
            return cmd + (["-p", str(self.pitch)] if self.pitch is not None else []) + ["--", text]
        stretch = _FLITE_NATURAL_WPM / self.rate
        cmd = ["flite", "-voice", self.name, "--setf", f"duration_stretch={stretch:.4f}"]
        cmd += ["--setf", f"int_f0_target_mean={self.pitch}"] if self.pitch is not None else []
        return cmd + ["-t", text, "-o", wav_out]


@dataclass(frozen=True)
class SynthesisJob:
    """One file to produce: ``text`` spoken by ``voice`` at ``speed``, written to ``path``."""

    text: str
    voice: Voice
    path: str
    speed: float = 1.0


def check_tools(engines: Iterable[str] = ("espeak-ng",)) -> None:
    """Raise :class:`FileNotFoundError` naming the first missing program (engines and sox)."""
    for program in [*dict.fromkeys(engines), "sox"]:
        if shutil.which(program) is None:
            raise FileNotFoundError(f"'{program}' not found on PATH; {_INSTALL_HINT}")


def check_voices(voices: Iterable[Voice]) -> None:
    """Raise :class:`ValueError` for a voice or variant the engine does not have.

    (espeak-ng silently ignores an unknown variant and flite silently falls back to its
    default voice, which would mislabel speakers.)
    """
    voices = list(dict.fromkeys(voices))
    check_tools(v.engine for v in voices)
    for voice in voices:
        name, _, variant = voice.name.partition("+")
        known = _installed_voices(voice.engine)
        if name not in known:
            listing = "espeak-ng --voices" if voice.engine == "espeak-ng" else "flite -lv"
            raise ValueError(f"{voice.engine} has no voice '{name}' (see: {listing})")
        if variant and variant not in _installed_voices("espeak-ng variants"):
            raise ValueError(f"espeak-ng has no voice variant '{variant}' (see: espeak-ng --voices=variant)")


@functools.lru_cache(maxsize=None)
def _installed_voices(kind: str) -> frozenset[str]:
    """Names accepted by ``flite -voice``, ``espeak-ng -v`` or as an espeak-ng ``+variant``."""
    if kind == "flite":
        listing = _run(["flite", "-lv"], what="flite -lv").decode()  # "Voices available: kal slt ..."
        return frozenset(listing.split(":", 1)[-1].split()) - {"awb_time"}  # awb_time only speaks times
    if kind == "espeak-ng variants":
        return frozenset(Path(row[4]).name for row in _espeak_listing("--voices=variant"))
    rows = _espeak_listing("--voices")  # columns: Pty Language Age/Gender VoiceName File ...
    return frozenset(name for row in rows for name in (row[1], Path(row[4]).name, Path(row[4]).name.lower()))


def _espeak_listing(option: str) -> list[list[str]]:
    output = _run(["espeak-ng", option], what=f"espeak-ng {option}").decode()
    return [row.split() for row in output.splitlines()[1:] if len(row.split()) > 4]


def synthesize(text: str, voice: Voice, speed: float = 1.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speak ``text``; return int16 mono samples at ``sample_rate``, sped up ``speed`` times."""
    if not text.strip():
        raise ValueError("cannot synthesize empty text")
    if not 0.1 <= speed <= 10:
        raise ValueError(f"speed {speed} out of range 0.1..10")
    with tempfile.TemporaryDirectory(prefix="privasr_tts_") as tmp:
        engine_wav = os.path.join(tmp, "engine.wav")
        raw = _run(voice.command(text, engine_wav), what=f"{voice.engine} ({voice.id})")
        if voice.engine == "flite":
            raw = Path(engine_wav).read_bytes()
        pcm = _run(_sox_command(speed, sample_rate), what="sox", stdin=raw)
    return np.frombuffer(pcm, dtype="<i2").copy()


def _sox_command(speed: float, sample_rate: int) -> list[str]:
    tempo = ["tempo", "-s", f"{speed:g}"] if speed != 1.0 else []
    effects = tempo + ["rate", "-v", str(sample_rate), "channels", "1"]
    output = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-L", "-"]
    return ["sox", "-V1", "-D", "-t", "wav", "-", *output, *effects]


def _run(cmd: Sequence[str], what: str, stdin: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"'{cmd[0]}' not found on PATH; {_INSTALL_HINT}") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {detail[-1] if detail else 'no message'}")
    return proc.stdout


def synthesize_to_file(job: SynthesisJob, sample_rate: int = SAMPLE_RATE) -> float:
    """Write ``job`` as a 16-bit PCM WAV (atomically); return its duration in seconds."""
    samples = synthesize(job.text, job.voice, job.speed, sample_rate)
    if samples.size == 0:
        raise RuntimeError(f"{job.voice.engine} produced no audio for '{job.text}'")
    path = Path(job.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    soundfile.write(tmp, samples, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return samples.size / sample_rate


def _existing_or_synthesize(job: SynthesisJob, sample_rate: int, skip_existing: bool) -> float:
    if skip_existing and os.path.isfile(job.path):
        info = soundfile.info(job.path)
        return info.frames / info.samplerate
    return synthesize_to_file(job, sample_rate)


def synthesize_many(
    jobs: Sequence[SynthesisJob],
    nj: int = 1,
    sample_rate: int = SAMPLE_RATE,
    skip_existing: bool = True,
    desc: str = "synthesizing",
) -> list[float]:
    """Synthesize ``jobs`` with ``nj`` parallel workers and a progress bar; return durations.

    With ``skip_existing`` a file already on disk is kept (files are written atomically, so an
    existing file is complete), which makes an interrupted run resumable.
    """
    if nj < 1:
        raise ValueError(f"--nj must be >= 1, got {nj}")
    check_voices(job.voice for job in jobs)
    with ThreadPoolExecutor(max_workers=nj) as pool, tqdm(total=len(jobs), desc=desc, unit="utt") as bar:
        futures = [pool.submit(_existing_or_synthesize, job, sample_rate, skip_existing) for job in jobs]
        durations = []
        try:
            for future in futures:
                durations.append(future.result())
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return durations
