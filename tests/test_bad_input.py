"""Bad input to a recipe's train.py: one clear line, a non-zero exit, and nothing written.

Most cases run the recipe's ``main`` in this process through :func:`privasr.faults.run_cli`
(what ``train.py``'s ``__main__`` does), which is fast; one case runs the real command to
check the exit status and that no traceback reaches the user.
"""
import csv
import runpy
import shutil

import pytest

from privasr.faults import run_cli

from .fault_injection import HAVE_TTS, RECIPE, corrupt_file, quick_corpus, recipe_argv, run_python, write_wav

pytestmark = pytest.mark.skipif(not HAVE_TTS, reason="needs espeak-ng, flite and sox")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return quick_corpus(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def recipe_main():
    return runpy.run_path(str(RECIPE / "train.py"))["main"]


def rows(manifest):
    with open(manifest, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(manifest, table):
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def broken_copy(data, tmp_path, edit):
    """A copy of the 16-utterance training manifest (and its audio) with ``edit(table, tmp_path)`` applied."""
    table = rows(data / "train16.csv")
    for row in table:
        copy = tmp_path / (row["ID"] + ".wav")
        shutil.copy(row["wav"], copy)
        row["wav"] = str(copy)
    edit(table, tmp_path)
    write_rows(tmp_path / "train.csv", table)
    return tmp_path / "train.csv"


def with_options(argv, *pairs):
    """``argv`` with each ``--key value`` of ``pairs`` replacing the key's value, or appended."""
    argv = list(argv)
    for key, value in zip(pairs[::2], pairs[1::2]):
        if key in argv:
            argv[argv.index(key) + 1] = str(value)
        else:
            argv += [key, str(value)]
    return argv


def run_recipe(recipe_main, capsys, data, out, *overrides, train_csv=None):
    """``(exit status, stderr lines)`` of train.py run in this process (on ``train_csv`` if given)."""
    argv = with_options(recipe_argv(data, out)[1:], *overrides)
    if train_csv is not None:
        argv = with_options(argv, "--train_csv", train_csv)
    status = run_cli(recipe_main, argv, prog="train.py")
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_refused(status, lines, out, *fragments):
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists(), "a refused run must write nothing"


def _delete_audio(table, tmp_path):
    (tmp_path / (table[2]["ID"] + ".wav")).unlink()


def _garbage_audio(table, tmp_path):
    corrupt_file(table[2]["wav"], "garbage")


def _wrong_rate(table, tmp_path):
    write_wav(table[2]["wav"], 8000)


def _empty_transcript(table, tmp_path):
    table[2]["wrd"] = ""


def _duplicate_id(table, tmp_path):
    table[5]["ID"] = table[1]["ID"]


# manifest line = row index + 2 (the header is line 1)
@pytest.mark.parametrize("edit, fragments", [
    (_delete_audio, ["train.csv:4: audio file of", "not found"]),
    (_garbage_audio, ["train.csv:4: cannot read the audio of"]),
    (_wrong_rate, ["train.csv:4: audio of", "is 8000 Hz, expected 16000 Hz", "resample_audio: true"]),
    (_empty_transcript, ["train.csv:4: empty transcript (wrd)"]),
    (_duplicate_id, ["train.csv:7: duplicate ID", "(first on line 3)"]),
], ids=["missing-audio", "unreadable-audio", "wrong-sample-rate", "empty-transcript", "duplicate-id"])
def test_broken_training_manifest_is_refused_naming_the_line(edit, fragments, data, tmp_path, recipe_main, capsys):
    manifest = broken_copy(data, tmp_path, edit)
    out = tmp_path / "run"
    status, lines = run_recipe(recipe_main, capsys, data, out, train_csv=manifest)
    assert_refused(status, lines, out, *fragments)


@pytest.mark.parametrize("overrides, fragments", [
    (["--virtual_core", "4"], ["unknown option --virtual_core", "did you mean --virtual_cores?"]),
    (["--virtual_cores", "abc"], ["--virtual_cores expects an integer", "got 'abc'"]),
    (["--clip_bound", "big"], ["--clip_bound expects a number"]),
    (["--clipping", "pcc", "--clip_bound", "-1"], ["bound must be a positive finite float", "-1"]),
    (["--clipping", "perexample"], ["perexample", "none"]),
    (["--mode", "trian"], ["unknown mode 'trian'", "accepted: train, decode, train_and_decode"]),
    (["--model_kind", "transducer", "--beam_size", "4"], ["the transducer decodes greedily"]),
], ids=["unknown-key", "int-type", "float-type", "negative-bound", "unknown-clipping", "unknown-mode",
        "transducer-beam"])
def test_bad_options_are_refused_before_anything_is_written(overrides, fragments, data, tmp_path, recipe_main,
                                                            capsys):
    out = tmp_path / "run"
    status, lines = run_recipe(recipe_main, capsys, data, out, *overrides)
    assert_refused(status, lines, out, *fragments)


def test_wrong_rate_is_resampled_when_asked(data, tmp_path):
    # a real process: training sets up SpeechBrain's logging and excepthook, which must not leak into pytest
    manifest = broken_copy(data, tmp_path, _wrong_rate)
    out = tmp_path / "run"
    argv = with_options(recipe_argv(data, out), "--train_csv", manifest, "--resample_audio", "true",
                        "--number_of_epochs", "1", "--batch_size", "8", "--virtual_cores", "2")
    proc = run_python(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((out / "save").glob("CKPT*")), "the resampled run trains and checkpoints"


def test_real_command_exits_2_with_one_line_and_no_traceback(data, tmp_path):
    out = tmp_path / "run"
    proc = run_python(*with_options(recipe_argv(data, out), "--train_csv", tmp_path / "nowhere.csv"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"train.py: error: {tmp_path / 'nowhere.csv'}: file not found"], lines
    assert not out.exists()
