"""Conformer transducer (RNN-T): the shared Conformer encoder, an LSTM
prediction network and an additive joint network (Graves 2012; Gulati et al.
2020 use a single-layer LSTM decoder).

Contract::

    logits, out_lens = model(wavs, wav_lens, tokens)       # [B, T, U+1, V], rel [B]
    loss = model.loss(logits, out_lens, tokens, token_lens, reduction="mean")
    hyps = model.greedy_decode(wavs, wav_lens)               # list of token-id lists

Blank is id 0 and doubles as the start symbol of the prediction network.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from privasr.models.encoder import ConformerEncoder, encoder_param_groups, relative_to_absolute
from privasr.models.rnnt_loss import rnnt_loss

__all__ = ["PredictionNetwork", "JointNetwork", "ConformerTransducer"]

LSTMState = Tuple[torch.Tensor, torch.Tensor]


class PredictionNetwork(nn.Module):
    """Embedding + LSTM over the previous labels (the transducer "decoder").

    ``forward(tokens [B, U]) -> [B, U+1, dim]``: output ``u`` has seen the
    start symbol (blank) and ``y_1..y_u``.
    """

    def __init__(self, vocab_size: int, dim: int, num_layers: int = 1, dropout: float = 0.0,
                 blank_id: int = 0):
        super().__init__()
        self.blank_id = blank_id
        self.embedding = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, U]`` ids -> ``[B, U+1, dim]``."""
        start = torch.full_like(tokens[:, :1], self.blank_id)
        out, _ = self.lstm(self.embedding(torch.cat([start, tokens], dim=1).long()))
        return out

    def step(self, token: torch.Tensor, state: Optional[LSTMState] = None
             ) -> Tuple[torch.Tensor, LSTMState]:
        """One label: ``token [B]`` -> (``[B, dim]``, new state)."""
        out, state = self.lstm(self.embedding(token.long()).unsqueeze(1), state)
        return out.squeeze(1), state


class JointNetwork(nn.Module):
    """``out(tanh(W_enc enc_t + W_pred pred_u))``: ``[B,T,D] x [B,U+1,P] -> [B,T,U+1,V]``."""

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int):
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim, bias=False)
        self.out = nn.Linear(joint_dim, vocab_size)

    def forward(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Broadcasting join of encoder frames and prediction outputs."""
        hidden = self.enc_proj(enc).unsqueeze(-2) + self.pred_proj(pred).unsqueeze(-3)
        return self.out(torch.tanh(hidden))


class ConformerTransducer(nn.Module):
    """Conformer encoder + LSTM prediction network + joint network.

    Arguments
    ---------
    vocab_size: output classes including the blank (id 0).
    d_model, num_layers, nhead, d_ffn, kernel_size, dropout, n_mels:
        encoder, see :class:`~privasr.models.encoder.ConformerEncoder`.
    pred_dim, pred_layers: LSTM prediction network size.
    joint_dim: joint hidden size (default ``pred_dim``).
    subsampling_channels, subsampling_factor, spec_augment: as for the encoder.
    """

    blank_id = 0

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, nhead: int,
                 d_ffn: int, kernel_size: int = 31, dropout: float = 0.1, n_mels: int = 80,
                 pred_dim: int = 320, pred_layers: int = 1, joint_dim: Optional[int] = None,
                 subsampling_channels: Optional[int] = None,
                 spec_augment: Optional[nn.Module] = None, subsampling_factor: int = 4):
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2 (blank + 1 token), got {vocab_size!r}")
        if pred_dim <= 0 or pred_layers <= 0 or (joint_dim is not None and joint_dim <= 0):
            raise ValueError("pred_dim, pred_layers and joint_dim must be positive")
        self.vocab_size = vocab_size
        self.encoder = ConformerEncoder(d_model, num_layers, nhead, d_ffn, kernel_size, dropout,
                                        n_mels, subsampling_channels=subsampling_channels,
                                        spec_augment=spec_augment, subsampling_factor=subsampling_factor)
        self.predictor = PredictionNetwork(vocab_size, pred_dim, pred_layers, dropout, self.blank_id)
        self.joint = JointNetwork(d_model, pred_dim, joint_dim or pred_dim, vocab_size)

    def features(self, wavs: torch.Tensor, wav_lens: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalized fbanks (no parameters): see ``ConformerEncoder.features``."""
        return self.encoder.features(wavs, wav_lens)

    def augment(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> torch.Tensor:
        """SpecAugment on a batch in training mode (identity otherwise)."""
        return self.encoder.augment(feats, feat_lens)

    def forward_features(self, feats: torch.Tensor, feat_lens: torch.Tensor,
                         tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features + targets ``[B, U]`` -> (joint logits ``[B, T, U+1, V]``, rel ``[B]``)."""
        enc, out_lens = self.encoder.encode(feats, feat_lens)
        return self.joint(enc, self.predictor(tokens)), out_lens

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor, tokens: torch.Tensor,
                augment: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Waveforms ``[B, N]`` + targets ``[B, U]`` -> (logits ``[B, T, U+1, V]``, rel ``[B]``)."""
        feats, feat_lens = self.features(wavs, wav_lens)
        if augment:
            feats = self.augment(feats, feat_lens)
        return self.forward_features(feats, feat_lens, tokens)

    def loss(self, logits: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor,
             token_lens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Transducer loss, see :func:`privasr.models.rnnt_loss.rnnt_loss`."""
        return rnnt_loss(logits, out_lens, tokens, token_lens, reduction, self.blank_id)

    def param_groups(self) -> Dict[str, List[str]]:
        """Names per layer: ``frontend``, ``layer.i``, ``final_norm``, ``predictor``, ``joint``."""
        return encoder_param_groups(self)

    @torch.no_grad()
    def greedy_decode(self, wavs: torch.Tensor, wav_lens: torch.Tensor,
                      max_symbols_per_frame: int = 5) -> List[List[int]]:
        """Greedy transducer search, one utterance at a time.

        At each frame, emit ``argmax`` labels (at most
        ``max_symbols_per_frame``), feeding each back to the prediction
        network, until blank wins; then move to the next frame.
        """
        if max_symbols_per_frame < 1:
            raise ValueError(f"max_symbols_per_frame must be >= 1, got {max_symbols_per_frame}")
        enc, out_lens = self.encoder(wavs, wav_lens)
        frames = relative_to_absolute(out_lens, enc.shape[1]).tolist()
        return [self._greedy_one(enc[b, :frames[b]], max_symbols_per_frame)
                for b in range(enc.shape[0])]

    def _greedy_one(self, enc: torch.Tensor, max_symbols: int) -> List[int]:
        """Greedy search over one utterance's encoder frames ``[T, D]``."""
        hyp: List[int] = []
        token = torch.full((1,), self.blank_id, dtype=torch.long, device=enc.device)
        pred, state = self.predictor.step(token)
        for frame in enc:
            for _ in range(max_symbols):
                label = int(self.joint(frame[None], pred).argmax(dim=-1))
                if label == self.blank_id:
                    break
                hyp.append(label)
                pred, state = self.predictor.step(token.fill_(label), state)
        return hyp
