"""What every ASR recipe shares: the Brain (training step, evaluation, transcripts) and data I/O."""
from privasr.asr.brain import ASRBrain, ctc_infeasible
from privasr.asr.dataio import make_dataset

__all__ = ["ASRBrain", "ctc_infeasible", "make_dataset"]
