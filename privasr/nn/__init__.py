"""Small neural-network pieces that make SpeechBrain modules safe for per-example gradients."""
from privasr.nn.padding import PaddingSafeConvolutionModule, make_conformer_padding_safe

__all__ = ["PaddingSafeConvolutionModule", "make_conformer_padding_safe"]
