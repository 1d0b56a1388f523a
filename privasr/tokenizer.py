"""SentencePiece tokenizer with id 0 reserved for the CTC / transducer blank.

SentencePiece is trained with ``unk_id=0`` and no BOS/EOS/PAD, giving piece
ids ``0 .. n-1``; privasr shifts them by one::

    privasr id 0        -> blank (never produced by encode)
    privasr id 1        -> <unk>
    privasr id k >= 2   -> piece k - 1

so a model's output layer has ``Tokenizer.vocab_size = n + 1`` classes.

Training reads the ``wrd`` column of a SpeechBrain CSV manifest, is
deterministic (one thread, fixed seed, no sentence sampling) and idempotent:
``Tokenizer.train`` returns the existing model when ``out_dir`` already holds
one trained with the same settings (and refuses one trained differently).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import sentencepiece as spm
import torch

__all__ = ["Tokenizer", "BLANK_ID", "MODEL_TYPES", "read_transcripts", "model_output_size"]

BLANK_ID = 0
MODEL_TYPES = ("unigram", "bpe", "char")
_MODEL_FILE = "tokenizer.model"
_CONFIG_FILE = "tokenizer.json"
_TEXT_FILE = "train_text.txt"

PathLike = Union[str, os.PathLike]


def read_transcripts(manifest: PathLike, column: str = "wrd") -> List[str]:
    """The non-empty ``column`` entries of a SpeechBrain CSV manifest."""
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{manifest}: no {column!r} column (columns: {reader.fieldnames})")
        texts = [row[column].strip() for row in reader]
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError(f"{manifest}: column {column!r} holds no text")
    return texts


class Tokenizer:
    """A trained SentencePiece model with the blank-at-0 id shift.

    Use :meth:`train` (idempotent) or :meth:`load`; then :meth:`encode` /
    :meth:`decode`.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, model_type: str, config: dict | None = None,
                 model_dir: PathLike | None = None):
        self.processor = processor
        self.model_type = model_type
        self.config = config  # the settings it was trained with (tokenizer.json), None if unknown
        self.model_dir = model_dir
        self._unknown: dict[str, bool] = {}  # character -> encodes to <unk>

    # ------------------------------------------------------------------ build
    @classmethod
    def train(cls, manifest: PathLike, out_dir: PathLike, vocab_size: int,
              model_type: str = "unigram", column: str = "wrd",
              character_coverage: float = 1.0, seed: int = 1234) -> "Tokenizer":
        """Train on ``manifest[column]`` into ``out_dir`` (skip if already there).

        ``vocab_size`` counts the model's output classes *including* the blank,
        so SentencePiece learns ``vocab_size - 1`` pieces. For ``"char"`` it is
        an upper bound: the pieces are the characters of the text (+ ``<unk>``).
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        if not isinstance(vocab_size, int) or vocab_size < 3:
            raise ValueError(f"vocab_size must be an int >= 3 (blank, unk, 1 piece), got {vocab_size!r}")
        out_dir = Path(out_dir)
        config = {"model_type": model_type, "vocab_size": vocab_size, "column": column,
                  "character_coverage": character_coverage, "seed": seed}
        if (out_dir / _MODEL_FILE).exists():
            return cls._load_checked(out_dir, config)
        out_dir.mkdir(parents=True, exist_ok=True)
        text_file = out_dir / _TEXT_FILE
        text_file.write_text("\n".join(read_transcripts(manifest, column)) + "\n", encoding="utf-8")
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(out_dir / "tokenizer"),
            vocab_size=vocab_size - 1, model_type=model_type,
            character_coverage=character_coverage, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            normalization_rule_name="identity", num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, hard_vocab_limit=model_type != "char", minloglevel=2,
        )
        (out_dir / _CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return cls.load(out_dir)

    @classmethod
    def load(cls, model_dir: PathLike) -> "Tokenizer":
        """Load ``model_dir/tokenizer.model`` (written by :meth:`train`)."""
        model_file = Path(model_dir) / _MODEL_FILE
        if not model_file.exists():
            raise ValueError(f"no tokenizer at {model_file}; train one with Tokenizer.train")
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
        config_file = Path(model_dir) / _CONFIG_FILE
        config = json.loads(config_file.read_text()) if config_file.exists() else None
        model_type = config["model_type"] if config else "unknown"
        return cls(processor, model_type, config, model_dir)

    @classmethod
    def _load_checked(cls, out_dir: Path, config: dict) -> "Tokenizer":
        """Load an existing model, refusing one trained with other settings."""
        config_file = out_dir / _CONFIG_FILE
        if config_file.exists():
            saved = json.loads(config_file.read_text())
            differs = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
            if differs:
                raise ValueError(f"{out_dir} holds a tokenizer trained with other settings "
                                 f"(saved, requested): {differs}; use another directory")
        return cls.load(out_dir)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        """Output classes including the blank (= SentencePiece pieces + 1)."""
        return self.processor.get_piece_size() + 1

    @property
    def blank_id(self) -> int:
        """Always 0."""
        return BLANK_ID

    @property
    def unk_id(self) -> int:
        """The ``<unk>`` id (1)."""
        return self.processor.unk_id() + 1

    def encode(self, text: str) -> List[int]:
        """Text -> ids in ``1 .. vocab_size - 1``."""
        return [piece + 1 for piece in self.processor.encode(text, out_type=int)]

    def unknown_characters(self, text: str) -> List[str]:
        """The distinct characters of ``text`` (whitespace aside) that encode to ``<unk>``, sorted.

        A character is unknown when encoding it alone yields the ``<unk>`` id: SentencePiece
        then maps it (and any unknown neighbours) to one ``<unk>``, which the model can
        neither learn to spell nor ever output.
        """
        for char in set(text) - set(self._unknown):
            if not char.isspace():
                self._unknown[char] = self.unk_id in self.encode(char)
        return sorted(c for c in set(text) if self._unknown.get(c))

    def encode_as_tensor(self, text: str) -> torch.Tensor:
        """Text -> ``LongTensor [S]`` (for a SpeechBrain data pipeline)."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Ids -> text; the blank (0) is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces = [int(i) - 1 for i in ids if int(i) != BLANK_ID]
        bad = [p + 1 for p in pieces if not 0 <= p < self.processor.get_piece_size()]
        if bad:
            raise ValueError(f"token ids {bad} are outside [0, {self.vocab_size})")
        return self.processor.decode(pieces)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> List[str]:
        """Many id sequences -> texts."""
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, token_id: int) -> str:
        """Human-readable piece of an id (``"<blank>"`` for 0)."""
        if token_id == BLANK_ID:
            return "<blank>"
        return self.processor.id_to_piece(token_id - 1)


def model_output_size(tokenizer: "Tokenizer | None", vocab_size: int) -> int:
    """The output classes a model needs: the tokenizer's (blank included).

    A recipe YAML builds its model with this (``!apply:privasr.tokenizer.model_output_size``),
    so the output layer always matches the tokenizer it trains with: the YAML's
    ``vocab_size`` is the size the tokenizer is *trained* with (an upper bound for
    ``char``), not the model's. Only without a tokenizer (building a model's shape, e.g.
    on the meta device) is ``vocab_size`` used.
    """
    return vocab_size if tokenizer is None else tokenizer.vocab_size


def main(argv=None) -> int:
    """``python -m privasr.tokenizer --manifest train.csv --out DIR [--vocab-size N] [--model-type char]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Train (or reuse) a SentencePiece tokenizer on a manifest's wrd column")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=40)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="char")
    args = p.parse_args(argv)
    try:
        tok = Tokenizer.train(args.manifest, args.out, args.vocab_size, args.model_type)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"privasr.tokenizer: error: {err}", file=sys.stderr)
        return 2
    print(f"tokenizer at {args.out}: {tok.model_type}, {tok.vocab_size} classes (blank included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
