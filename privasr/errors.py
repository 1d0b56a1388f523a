"""The two exceptions every part of privasr raises for a run that cannot go on.

Kept in a module of their own, importing nothing, so that the library (:mod:`privasr.brain`,
the data code) and the command-line runner (:func:`privasr.cli.run_cli`) can both import them
without an import cycle.
"""

__all__ = ["UserError", "NonFiniteGradientsError"]


class UserError(Exception):
    """A problem with the user's input (command line, YAML, manifests, audio); one line.

    A command reports it as ``<prog>: error: <message>`` and exits with status 2.
    """


class NonFiniteGradientsError(RuntimeError):
    """Training stopped: too many steps whose every core had a NaN/Inf gradient.

    A command reports it in one line and exits with status 1 (the run diverged; the input may be
    fine); its checkpoints are complete (:mod:`privasr.resume`).
    """
