"""Bad input to every tool (privasr.cli) ends with one line ``<prog>: error: ...``, exit status 2, nothing written.

Each case calls the tool's ``main(argv)`` in-process (the parser and the checks run before any
process, model or file is made, so this is fast); one case runs a real command. "Nothing written"
is checked on the whole temporary directory every case works in.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, assert_one_line_error, run_privasr_cli
from privasr.cli import accountant, bench_clipping, bench_dp, make_canaries, norm_quantiles, score_exposure

RECIPE_YAML = str(REPO_ROOT / "recipes" / "mini_tts" / "ASR" / "conformer" / "hparams" / "conformer_ctc.yaml")
TOOLS = {
    "privasr-bench": bench_clipping.main,
    "privasr-bench-dp": bench_dp.main,
    "privasr-canaries": make_canaries.main,
    "privasr-exposure": score_exposure.main,
    "privasr-accountant": accountant.main,
    "privasr-norm-quantiles": norm_quantiles.main,
}
ACCOUNTANT = ["-q", "0.01", "-s", "1.1", "-T", "100", "--delta", "1e-5"]


@pytest.fixture
def work(tmp_path):
    """A directory with an empty folder ``dir``, a file ``file.txt`` and a two-word vocabulary ``vocab.txt``."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x\n")
    (tmp_path / "vocab.txt").write_text("ALPHA\nBETA\n")
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_refused(prog, argv, work, capsys, *fragments):
    """``prog argv`` exits 2 with one stderr line ``prog: error: ...`` naming ``fragments``; nothing written."""
    argv = [a.replace("WORK", str(work)) for a in argv]
    before = snapshot(work)
    status = TOOLS[prog](argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, (status, captured.out, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in captured.err
    assert snapshot(work) == before, "something was written"


# -- zero steps --------------------------------------------------------------------------
@pytest.mark.parametrize("prog, argv, fragment", [
    ("privasr-bench", ["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ("privasr-bench-dp", ["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ("privasr-bench", ["--steps", "-3"], "got -3"),
    ("privasr-bench", ["--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--batches", "0"], "argument --batches: expected an integer >= 1"),
    ("privasr-accountant", ["-q", "0.01", "--target-epsilon", "2", "-T", "0", "--delta", "1e-5"],
     "steps must be >= 1 to calibrate"),
])
def test_zero_steps(prog, argv, fragment, work, capsys):
    assert_refused(prog, argv, work, capsys, fragment)


# -- zero or negative processes, batches, cores -------------------------------------------
@pytest.mark.parametrize("prog, argv, fragment", [
    ("privasr-bench", ["--nproc", "0"], "argument --nproc: expected an integer >= 1, got 0"),
    ("privasr-bench", ["--nproc", "-2"], "got -2"),
    ("privasr-bench-dp", ["--nproc", "0"], "argument --nproc"),
    ("privasr-bench", ["--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
    ("privasr-bench-dp", ["--batch", "-1"], "argument --batch"),
    ("privasr-bench-dp", ["--micro-batch", "0"], "argument --micro-batch"),
    ("privasr-bench", ["--threads", "0"], "argument --threads"),
    ("privasr-bench", ["--strategies", "pcc-v0"], "pcc-vK needs an integer K >= 1"),
    ("privasr-bench", ["--strategies", "pcc-vx"], "pcc-vK needs an integer K >= 1"),
    ("privasr-bench", ["--strategies", "pcc-v16"], "16 virtual cores need at least as many utterances"),
    ("privasr-bench", ["--seconds", "0"], "argument --seconds: expected a finite number > 0"),
    ("privasr-bench", ["--seconds", "nan"], "argument --seconds"),
    ("privasr-bench", ["--tokens", "200", "--seconds", "1"], "more tokens than CTC output frames"),
    ("privasr-bench", ["--vocab", "1"], "--vocab must be >= 2"),
    ("privasr-bench-dp", ["--heads", "5"], "--heads 5 must divide --d-model 144"),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--per-core", "0", "2"], "argument --per-core"),
    ("privasr-canaries", ["--out", "WORK/c", "--vocab", "WORK/vocab.txt", "--per-count", "0"], "--per-count"),
    ("privasr-canaries", ["--out", "WORK/c", "--vocab", "WORK/vocab.txt", "--nj", "0"], "--nj"),
    ("privasr-canaries", ["--out", "WORK/c", "--vocab", "WORK/vocab.txt", "--speed", "-4"], "--speed"),
    ("privasr-canaries", ["--out", "WORK/c", "--vocab", "WORK/vocab.txt", "--counts", "0", "2"], "--counts"),
    ("privasr-accountant", ["-q", "0.01", "-s", "1e-6", "-T", "10", "--delta", "1e-5", "--accountant", "prv"],
     "use --accountant rdp"),
])
def test_zero_or_negative_sizes(prog, argv, fragment, work, capsys):
    assert_refused(prog, argv, work, capsys, fragment)


# -- percent-style quantiles and fractions --------------------------------------------------
@pytest.mark.parametrize("prog, argv, fragments", [
    ("privasr-norm-quantiles", [RECIPE_YAML, "--quantiles", "10", "50", "90"], ["got 10", "0.1 for 10 %"]),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--quantiles", "-0.1"], ["expected a number in [0, 1]"]),
    ("privasr-bench-dp", ["--freeze-fraction", "50"], ["--freeze-fraction", "0.5 for 50 %"]),
])
def test_percent_style_fractions(prog, argv, fragments, work, capsys):
    assert_refused(prog, argv, work, capsys, *fragments)


# -- unknown options and overrides -----------------------------------------------------------
@pytest.mark.parametrize("prog, argv, fragments", [
    ("privasr-bench", ["--bogus", "1"], ["unrecognized arguments: --bogus 1"]),
    ("privasr-bench-dp", ["--rows", "dp-foo"], ["unknown row 'dp-foo'"]),
    ("privasr-bench", ["--strategies", "bogus"], ["unknown strategy 'bogus'"]),
    ("privasr-canaries", ["--out", "WORK/c", "--vocab", "WORK/vocab.txt", "--bogus"], ["unrecognized arguments"]),
    ("privasr-exposure", ["--canaries", "c.csv", "--holdout", "h.csv", "--hyps", "y.csv", "--out", "WORK/e.json",
                          "--bogus"], ["unrecognized arguments: --bogus"]),
    ("privasr-exposure", ["compare", "a.json", "--plot", "p.png", "--bogus"], ["unrecognized arguments: --bogus"]),
    ("privasr-accountant", [*ACCOUNTANT, "--bogus", "3"], ["unrecognized arguments: --bogus 3"]),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--", "--output_folde", "WORK/dir"],
     ["unknown option --output_folde", "did you mean --output_folder?"]),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--", "--virtual_cores", "abc"], ["--virtual_cores expects an integer"]),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--output_folder", "WORK/dir"], ["recipe overrides go after --"]),
    ("privasr-norm-quantiles", [str(REPO_ROOT / "nope.yaml")], ["nope.yaml: hyper-parameter file not found"]),
])
def test_unknown_options_and_overrides(prog, argv, fragments, work, capsys):
    assert_refused(prog, argv, work, capsys, *fragments)


# -- output paths that are folders, under a file, or unwritable -------------------------------
@pytest.mark.parametrize("prog, argv, fragments", [
    ("privasr-bench", ["--json", "WORK/dir"], ["--json", "is a directory"]),
    ("privasr-bench-dp", ["--json", "WORK/dir/"], ["--json", "is a directory"]),
    ("privasr-bench", ["--json", "WORK/file.txt/b.json"], ["file.txt is a file, not a directory"]),
    ("privasr-norm-quantiles", [RECIPE_YAML, "--json", "WORK/dir"], ["--json", "is a directory"]),
    ("privasr-exposure", ["--canaries", "c.csv", "--holdout", "h.csv", "--hyps", "y.csv", "--out", "WORK/dir"],
     ["--out", "is a directory"]),
    ("privasr-exposure", ["--canaries", "c.csv", "--holdout", "h.csv", "--hyps", "y.csv", "--out", "WORK/e.json",
                          "--plot", "WORK/dir"], ["--plot", "is a directory"]),
    ("privasr-exposure", ["--canaries", "c.csv", "--holdout", "h.csv", "--hyps", "WORK/file.txt", "--out",
                          "WORK/file.txt"], ["is one of the inputs"]),
    ("privasr-exposure", ["compare", "WORK/file.txt", "--plot", "WORK/dir"], ["--plot", "is a directory"]),
    ("privasr-exposure", ["compare", "WORK/file.txt", "--plot", "WORK/p.png", "--out", "WORK/p.png"],
     ["name the same file"]),
    ("privasr-canaries", ["--out", "WORK/file.txt", "--vocab", "WORK/vocab.txt"], ["--out", "is a file"]),
    ("privasr-canaries", ["--out", "WORK/file.txt/c", "--vocab", "WORK/vocab.txt"], ["is a file, not a directory"]),
    ("privasr-canaries", ["--out", "WORK/c", "--train-in", "WORK/file.txt", "--train-out", "WORK/dir"],
     ["--train-out", "is a directory"]),
    ("privasr-canaries", ["--out", "WORK/c", "--train-in", "WORK/file.txt", "--train-out", "WORK/file.txt"],
     ["the training manifest would be overwritten"]),
])
def test_output_paths_that_cannot_be_written(prog, argv, fragments, work, capsys):
    assert_refused(prog, argv, work, capsys, *fragments)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_unwritable_output_directory(work, capsys):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_refused("privasr-bench", ["--json", "WORK/locked/b.json"], work, capsys, "is not writable")
    finally:
        locked.chmod(0o700)


# -- "the trained model" that is not there ---------------------------------------------------
@pytest.mark.parametrize("folder", ["dir", "never_made"])
def test_norm_quantiles_refuses_a_folder_without_a_checkpoint(folder, work, capsys):
    """Today's bug: rc 0 and the norms of a randomly initialised model."""
    assert_refused("privasr-norm-quantiles", [RECIPE_YAML, "--json", "WORK/q.json", "--", "--output_folder",
                                              f"WORK/{folder}"], work, capsys,
                   "no trained model: no checkpoint in", f"{folder}/save")


# -- the exposure tool's own rules -----------------------------------------------------------
def test_exposure_higher_is_likelier_needs_the_score_metric(work, capsys):
    assert_refused("privasr-exposure", ["--canaries", "WORK/c.csv", "--holdout", "WORK/h.csv", "--hyps", "WORK/y.csv",
                                        "--out", "WORK/e.json", "--direction", "higher"], work, capsys,
                   "direction 'higher' only applies to metric 'score'")


def test_every_tool_returns_its_status_in_process(capsys):
    """``main(argv)`` returns the status the command would exit with: --help is 0 for every tool."""
    for prog, main in TOOLS.items():
        assert main(["--help"]) == 0, prog
        assert "usage:" in capsys.readouterr().out


def test_a_real_command_exits_2_with_one_line():
    """The console-script path (``python -m``): exit status 2 and one line, no traceback."""
    proc = run_privasr_cli("privasr.cli.bench_clipping", "--steps", "0")
    assert_one_line_error(proc, "privasr-bench: error: argument --steps: expected an integer >= 1, got 0")
    assert proc.stdout == ""


# -- the layout: the code in privasr.cli, thin executables in tools/, no package named `tools` -------------
THIN_TOOLS = sorted(p.stem for p in (REPO_ROOT / "tools").glob("*.py"))


def test_every_console_script_runs_a_privasr_cli_main():
    """setup.py's console scripts all point at ``privasr.cli.<module>:main`` (as installed), and load."""
    from importlib.metadata import distribution

    scripts = [e for e in distribution("privasr").entry_points if e.group == "console_scripts"]
    assert {e.name for e in scripts} >= set(TOOLS) | {"privasr-bench-recipe", "privasr-canary-gradients"}
    for entry in scripts:
        assert entry.value.startswith("privasr.cli.") and entry.value.endswith(":main"), entry
        assert callable(entry.load()), entry


def test_tools_holds_only_thin_executables_and_is_not_installed():
    """Each tools/<name>.py only runs ``privasr.cli.<name>.main``; ``import tools`` fails outside the checkout."""
    assert THIN_TOOLS and not (REPO_ROOT / "tools" / "__init__.py").exists()
    for name in THIN_TOOLS:
        path = REPO_ROOT / "tools" / f"{name}.py"
        tree = ast.parse(path.read_text())
        imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert [(i.module, [a.name for a in i.names]) for i in imports] == [(f"privasr.cli.{name}", ["main"])], name
        assert path.read_text().startswith("#!/usr/bin/env python3\n") and os.access(path, os.X_OK), name
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('tools'))"],
                           cwd="/", capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == "None", found.stdout + found.stderr


def test_a_thin_executable_is_the_command():
    """``python tools/accountant.py`` (from any directory) prints what the accountant computes; bad input: one line."""
    from privasr.accounting import epsilon

    def run(*args):
        return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "accountant.py"), *args], cwd="/",
                              capture_output=True, text=True, timeout=120)

    done = run(*ACCOUNTANT)
    assert done.returncode == 0 and done.stdout.strip() == f"{epsilon(0.01, 1.1, 100, 1e-5):.6g}", done
    assert_one_line_error(run(*ACCOUNTANT, "--bogus"), "privasr-accountant: error: unrecognized arguments: --bogus")


def test_run_cli_returns_main_s_status_and_output_file_checks_while_parsing(tmp_path, capsys):
    """The convention itself: ``main``'s integer is the status (None: 0); ``output_file`` refuses a folder."""
    from privasr.cli import CliParser, output_file, run_cli

    assert run_cli(lambda argv: 1, [], prog="p") == 1
    assert run_cli(lambda argv: None, [], prog="p") == 0
    parser = CliParser(prog="p")
    parser.add_argument("--json", type=output_file)
    assert run_cli(lambda argv: parser.parse_args(argv), ["--json", str(tmp_path)], prog="p") == 2
    assert capsys.readouterr().err == f"p: error: argument --json: {tmp_path}: is a directory, expected a file name " \
                                      f"(see --help)\n"


# -- one runner for tools and recipes (privasr.cli.run_cli) --------------------------------------------------
def _raising(err):
    def main(argv):
        raise err
    return main


@pytest.mark.parametrize("err, status, message", [
    (ValueError("bad value"), 2, "bad value"),
    (OSError("out.json: not writable"), 2, "out.json: not writable"),
    (ValueError("first line\n  second line\n"), 2, "first line second line"),  # two lines: joined
    (ValueError("Error(s) in loading the model:\n\tMissing key: a\n\tMissing key: b"), 2,
     "Error(s) in loading the model:"),  # more: the first, the rest is context
    (RuntimeError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "  File \"x.py\", line 1, in f\nValueError: a.csv:3 'utt3': audio not found"), 2,
     "a.csv:3 'utt3': audio not found"),
    (ValueError(""), 2, "ValueError"),
], ids=["value", "os", "two-lines", "many-lines", "dataloader-worker", "empty"])
def test_run_cli_reports_user_errors_as_one_line(err, status, message, capsys):
    from privasr.cli import run_cli

    assert run_cli(_raising(err), [], prog="p") == status
    assert capsys.readouterr().err == f"p: error: {message}\n"


def test_run_cli_statuses_rank_hint_and_debug(monkeypatch, capsys):
    """SystemExit's code, a diverged run 1 (before RuntimeError's 2), a rank suffix, Ctrl-C's hint, PRIVASR_DEBUG."""
    from privasr.cli import run_cli
    from privasr.cli.hparams import RECIPE_ERRORS, RESUME_HINT
    from privasr.errors import NonFiniteGradientsError, UserError

    assert [run_cli(_raising(SystemExit(code)), [], prog="p") for code in (0, None, 2, "usage")] == [0, 0, 2, 1]
    assert run_cli(lambda argv: True, [], prog="p") == 0  # a bool is no status
    assert run_cli(_raising(NonFiniteGradientsError("training stopped")), [], prog="p") == 1
    assert capsys.readouterr().err == "p: error: training stopped\n"
    monkeypatch.setenv("RANK", "3")
    assert run_cli(_raising(KeyError("no key 'x'")), [], prog="p", user_errors=(KeyError,)) == 2
    assert capsys.readouterr().err == "p: error: no key 'x' (rank 3)\n"  # a KeyError's message, unquoted
    monkeypatch.setenv("RANK", "0")
    assert run_cli(_raising(KeyboardInterrupt()), [], prog="p") == 130
    assert capsys.readouterr().err == "p: interrupted\n"
    assert run_cli(_raising(KeyboardInterrupt()), [], prog="train.py", interrupted_hint=RESUME_HINT) == 130
    assert capsys.readouterr().err == ("train.py: interrupted; re-run the same command to resume from the last "
                                       "checkpoint\n")
    with pytest.raises(ValueError, match="a bug"):  # a recipe reports only UserError; a bug keeps its traceback
        run_cli(_raising(ValueError("a bug")), [], prog="train.py", user_errors=RECIPE_ERRORS)
    monkeypatch.setenv("PRIVASR_DEBUG", "1")
    for err in (UserError("bad input"), NonFiniteGradientsError("diverged")):
        with pytest.raises(type(err)):
            run_cli(_raising(err), [], prog="p")
    assert capsys.readouterr().err == ""


def test_run_cli_needs_no_torch_and_check_overrides_runs_as_a_module():
    """A command without torch stays without it (no process group can exist); ``check-overrides`` runs as
    ``python -m privasr.cli.hparams``, the command egs/lib/stages.sh calls to refuse a bad --train_args."""
    code = ("import runpy, sys\n"
            "from privasr.cli import run_cli\n"
            "assert run_cli(lambda argv: 3, [], prog='p') == 3\n"
            "print('torch' in sys.modules)\n"
            "sys.argv = ['x', 'check-overrides', sys.argv[1], '--virtual_core', '3']\n"
            "try:\n    runpy.run_module('privasr.cli.hparams', run_name='__main__')\n"
            "except SystemExit as stop:\n    print(stop.code)\n")
    proc = subprocess.run([sys.executable, "-c", code, RECIPE_YAML], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    assert proc.stderr == ("--train_args: error: unknown option --virtual_core: conformer_ctc.yaml has no such key "
                           "(did you mean --virtual_cores?)\n"), proc.stderr
    # the stage library calls it: a driver refuses the mistyped key before any stage runs
    driver = subprocess.run(["bash", str(REPO_ROOT / "egs" / "mini_tts" / "run.sh"), "--train_args", "--virtual_core=3"],
                            capture_output=True, text=True, timeout=60)
    assert (driver.returncode, driver.stdout) == (2, ""), driver.stdout + driver.stderr
    assert driver.stderr == ("run.sh: error: --train_args: unknown option --virtual_core: conformer_ctc.yaml has no "
                             "such key (did you mean --virtual_cores?)\n")
    # and reads the recipe YAML's tokenizer with the same module (an option given wins)
    library = (f"recipe=recipes/mini_tts/ASR/conformer hparams=hparams/conformer_ctc.yaml; "
               f"source {REPO_ROOT / 'egs' / 'lib' / 'stages.sh'}; tokenizer_type=unigram; tokenizer_from_hparams")
    tokenizer = subprocess.run(["bash", "-c", library], capture_output=True, text=True, timeout=60)
    assert tokenizer.stdout == "--vocab-size 40 --model-type unigram\n", tokenizer.stdout + tokenizer.stderr


def test_device_equivalence_refuses_bad_input_in_one_line(capsys):
    from privasr.cli import device_equivalence

    assert device_equivalence.main(["--bogus"]) == 2
    assert capsys.readouterr().err == "device_equivalence: error: unrecognized arguments: --bogus (see --help)\n"
    import torch

    if not torch.cuda.is_available():
        assert device_equivalence.main([]) == 2
        assert capsys.readouterr().err == ("device_equivalence: error: no CUDA device "
                                           "(--cpu runs the same checks on the CPU)\n")
