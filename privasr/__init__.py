"""privasr: train speech recognisers that memorize less, and prove it."""
__version__ = "0.1.0"
