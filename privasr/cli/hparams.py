"""A recipe's command line: ``train.py HPARAMS.yaml [--key value ...]`` read, checked and built.

:func:`parse_arguments` and :func:`load_hparams` read the command line and the YAML:
an override key the YAML does not define is refused with the closest known key
(``--virtual_core`` -> ``did you mean --virtual_cores?``), and an override whose type
does not match the YAML's value is refused before anything is built
(``--virtual_cores abc``: ``expects an integer``). Every such problem is a
:class:`~privasr.errors.UserError`; a recipe's ``train.py`` runs its ``main`` through
:func:`privasr.cli.run_cli` with ``user_errors=RECIPE_ERRORS`` (only those are one line
``train.py: error: ...`` and status 2; a programming error keeps its traceback) and
``interrupted_hint=RESUME_HINT``.

``python -m privasr.cli.hparams check-overrides HPARAMS.yaml --key value ...`` checks overrides
from the shell (``egs/lib/stages.sh`` refuses bad ``--train_args`` before stage 0). Nothing
here imports torch.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import re
import sys
from typing import Any, Optional, Sequence

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import DuplicateKeyError, SafeConstructor

from privasr.cli import one_line
from privasr.errors import UserError

__all__ = ["RECIPE_ERRORS", "RESUME_HINT", "warnings_to_stdout", "parse_arguments", "recipe_help", "yaml_defaults",
           "check_overrides", "resolved_values", "load_hparams", "check_overrides_main"]

#: What a recipe reports as one line and status 2; anything else is a bug and keeps its traceback.
RECIPE_ERRORS = (UserError,)
#: Said after ``train.py: interrupted`` (Ctrl-C): checkpoints are atomic (:mod:`privasr.resume`).
RESUME_HINT = "re-run the same command to resume from the last checkpoint"


def warnings_to_stdout() -> None:
    """Until the recipe sets up logging (SpeechBrain's ``create_experiment_directory``), warnings go to stdout.

    Python's last-resort handler would print them on stderr, where a refused run must leave only
    its one ``train.py: error: ...`` line. Does nothing when the root logger already has a handler.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(name)s - %(message)s")


# -- command line ---------------------------------------------------------------------------
def parse_arguments(argv: Sequence[str]):
    """``speechbrain.parse_arguments``, with argparse's usage + error turned into a :class:`UserError`.

    ``--help`` prints SpeechBrain's options, then the recipe's own keys with their YAML
    defaults and meanings (:func:`recipe_help`): those of the YAML given before ``--help``,
    else of the first YAML in the calling recipe's ``hparams/`` folder.
    """
    import speechbrain as sb

    captured, shown = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(shown):
            return sb.parse_arguments(list(argv))
    except SystemExit as stop:
        if stop.code in (0, None):
            print(shown.getvalue(), end="")
            if {"-h", "--help"} & set(argv):
                print(recipe_help(_help_hparams(argv, sys._getframe(1).f_code.co_filename)))
            raise
        lines = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        raise UserError(lines[-1].split(": error: ", 1)[1] if lines else captured.getvalue().strip()) from None


def _help_hparams(argv: Sequence[str], caller: str) -> Optional[str]:
    """The YAML ``--help`` documents: the first argument if it is a file, else the caller's ``hparams/*.yaml``."""
    if argv and not str(argv[0]).startswith("-") and os.path.isfile(argv[0]):
        return str(argv[0])
    folder = os.path.join(os.path.dirname(os.path.abspath(caller)), "hparams")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
    return os.path.join(folder, found[0]) if found else None


_KEY_LINE = re.compile(r"^([A-Za-z]\w*):(.*)$")
_OBJECT_TAGS = ("!new:", "!apply:", "!name:", "!module:", "!include:")


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> ``(value, comment)``; a ``#`` inside quotes or glued to text is not a comment."""
    quote = None
    for i, char in enumerate(text):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def recipe_help(hparams_file: Optional[str]) -> str:
    """The recipe's own options: every top-level YAML key but built objects, default and trailing comment.

    Read from the YAML's text (one line per key; a mapping is shown as ``{key: value, ...}``),
    under the YAML's one-line section comments.
    """
    if not hparams_file:
        return "recipe options: give the hyper-parameter file first (train.py HPARAMS.yaml --help)"
    with open(hparams_file, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    out = [f"recipe options (the keys of {hparams_file}; each is --key VALUE, default shown):"]
    for number, line in enumerate(lines):
        match = _KEY_LINE.match(line)
        if line.startswith("# ") and number + 1 < len(lines) and _KEY_LINE.match(lines[number + 1]):
            out.append(f"\n {line[2:].strip()}:")
        if not match or match.group(1).startswith("_"):
            continue
        value, comment = _split_comment(match.group(2))
        if value.startswith(_OBJECT_TAGS) or match.group(1) == "modules":  # objects, not options
            continue
        if not value:  # a mapping: its indented ``key: value`` lines
            items = []
            for inner in lines[number + 1:]:
                if not inner.startswith((" ", "\t")):
                    break
                items.append(_split_comment(inner.strip())[0])
            value = "{" + ", ".join(items) + "}"
        value = value.replace("!ref ", "")  # a default computed from other keys: <key> stands for their value
        out.append(f"  --{match.group(1)} {value}" + (f"\n        {comment}" if comment else ""))
    return "\n".join(out)


# -- hyper-parameters -----------------------------------------------------------------------
class _Tagged:
    """Stands for a value built by a HyperPyYAML tag (``!ref``, ``!new:``...): any type."""


class _PlainConstructor(SafeConstructor):
    """YAML 1.2 plain values, as HyperPyYAML reads them; every tagged value is a :class:`_Tagged`."""


_PlainConstructor.add_multi_constructor("!", lambda loader, suffix, node: _Tagged())


def _plain_yaml(text) -> Any:
    reader = YAML(typ="safe", pure=True)
    reader.Constructor = _PlainConstructor
    return reader.load(text)


def yaml_defaults(hparams_file: str) -> dict:
    """The top-level keys of a HyperPyYAML file and their plain values."""
    if not os.path.isfile(hparams_file):
        raise UserError(f"{hparams_file}: hyper-parameter file not found")
    with open(hparams_file, encoding="utf-8") as handle:
        try:
            data = _plain_yaml(handle)
        except YAMLError as err:
            raise UserError(f"{hparams_file}: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{hparams_file}: expected a mapping of hyper-parameters")
    return data


def _yaml_problem(err: YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(err, "problem", None) or err).split())


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, (_Tagged, dict, list)) or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if value is None:  # null switches off a float / string setting; integers and flags need a value
        return not isinstance(default, int)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)  # a string: any scalar


def check_overrides(hparams_file: str, overrides: Optional[str]) -> dict:
    """Refuse override keys the YAML lacks and values of the wrong type; return the parsed overrides."""
    try:
        values = _plain_yaml(overrides or "") or {}
    except DuplicateKeyError as err:
        key = re.search(r'duplicate key "([^"]+)"', str(err.problem))
        raise UserError(f"option --{key.group(1) if key else '?'} given more than once") from None
    except YAMLError as err:
        raise UserError(f"cannot read the command-line overrides: {_yaml_problem(err)}") from None
    if not isinstance(values, dict):
        raise UserError(f"cannot read the command-line overrides {overrides!r}")
    defaults = yaml_defaults(hparams_file)
    name = os.path.basename(hparams_file)
    for key, value in values.items():
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults if not str(k).startswith("_")], 1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown option --{key}: {name} has no such key{hint}")
        default = defaults[key]
        if not _type_ok(default, value):
            kind = _KINDS.get(type(default), type(default).__name__)
            raise UserError(f"--{key} expects {kind} ({name} has {default!r}), got {value!r}")
    return values


def resolved_values(hparams_file: str, overrides: Optional[str]) -> dict:
    """The top-level values with ``!ref`` resolved and overrides applied, no object built (tagged: :class:`_Tagged`)."""
    from hyperpyyaml import resolve_references

    try:
        with open(hparams_file, encoding="utf-8") as handle:
            return _plain_yaml(resolve_references(handle, overrides).getvalue()) or {}
    except Exception as err:  # a broken reference: a configuration problem
        if os.environ.get("PRIVASR_DEBUG"):
            raise
        raise UserError(f"{hparams_file}: {one_line(err)}") from None


def load_hparams(hparams_file: str, overrides: Optional[str]) -> dict:
    """Check the overrides (:func:`check_overrides`) and the settings every recipe shares, then build the objects.

    The shared settings are checked on the resolved values before anything is built (a
    YAML object may create folders): output folders a file or not writable, batch sizes
    below 1, learning rates, durations, workers and intervals out of range (:mod:`privasr.asr.checks`).
    """
    from hyperpyyaml import load_hyperpyyaml

    from privasr.asr.checks import check_batch_sizes, check_numbers, check_output_paths

    check_overrides(hparams_file, overrides)
    values = resolved_values(hparams_file, overrides)
    check_output_paths(values)
    check_batch_sizes(values)
    check_numbers(values)
    try:
        with open(hparams_file, encoding="utf-8") as handle:
            return load_hyperpyyaml(handle, overrides)
    except Exception as err:  # building the YAML's objects: any failure is a configuration problem
        if os.environ.get("PRIVASR_DEBUG"):
            raise
        raise UserError(f"{hparams_file}: {one_line(err)}") from None


# -- checking overrides from the shell (egs/lib/stages.sh refuses bad --train_args before stage 0) --
def check_overrides_main(argv: Sequence[str], prog: str = "python -m privasr.cli.hparams") -> int:
    """``PROG check-overrides HPARAMS.yaml --key value ...``: one line and status 2 if bad, else 0."""
    if len(argv) < 2 or argv[0] != "check-overrides":
        print(f"usage: {prog} check-overrides HPARAMS.yaml [--key value ...]", file=sys.stderr)
        return 2
    try:
        hparams_file, _, overrides = parse_arguments(list(argv[1:]))
        check_overrides(hparams_file, overrides)
    except UserError as err:
        print(f"--train_args: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(check_overrides_main(sys.argv[1:]))
