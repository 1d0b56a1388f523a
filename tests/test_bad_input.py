"""Bad input to a recipe's train.py: one clear line, a non-zero exit, and nothing written.

Most cases run the recipe's ``main`` in this process through :func:`privasr.cli.run_cli`
(what ``train.py``'s ``__main__`` does), which is fast; one case runs the real command to
check the exit status and that no traceback reaches the user.
"""
import csv
import logging
import os
import runpy
import shutil
from pathlib import Path

import pytest

from privasr.cli import run_cli
from privasr.cli.hparams import RECIPE_ERRORS

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
    status = run_cli(recipe_main, argv, prog="train.py", user_errors=RECIPE_ERRORS)
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
    write_wav(table[2]["wav"], 8000, seconds=float(table[2]["duration"]))  # the same length, another rate


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


def test_an_empty_manifest_key_is_refused_naming_it(recipe_main, capsys, data, tmp_path):
    """`--canaries_csv ""` (a canary-free pre-training) then `--mode decode` was a TypeError traceback."""
    out = tmp_path / "run"
    status, lines = run_recipe(recipe_main, capsys, data, out, "--train_csv", "")
    assert_refused(status, lines, out, "train_csv is empty, but --mode train reads that set: give its manifest")


def test_real_command_exits_2_with_one_line_and_no_traceback(data, tmp_path):
    out = tmp_path / "run"
    proc = run_python(*with_options(recipe_argv(data, out), "--train_csv", tmp_path / "nowhere.csv"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"train.py: error: {tmp_path / 'nowhere.csv'}: file not found"], lines
    assert not out.exists()


# -- issue 13: manifests, batches, output folders, audio length, unknown characters, vocabulary, --help ---------
def _header_only(table, tmp_path):
    del table[:]


def _duration_far_off(table, tmp_path):
    table[2]["duration"] = str(float(table[2]["duration"]) + 10)


def _lower_case(table, tmp_path):
    table[2]["wrd"] = table[2]["wrd"].lower()


def write_manifest_copy(data, tmp_path, edit):
    """Like :func:`broken_copy`, also for an edit that leaves no row (the header is kept)."""
    table = rows(data / "train16.csv")
    header = list(table[0])
    edit(table, tmp_path)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(table)
    return tmp_path / "train.csv"


@pytest.mark.parametrize("edit, fragments", [
    (_header_only, ["train.csv: no utterances (nothing after the header)"]),
    (_duration_far_off, ["train.csv:4: duration", "disagrees with its audio", "rewrite the manifest"]),
    (_lower_case, ["train.csv:4: the tokenizer does not know 100% of the characters", "'a'", "(case?)"]),
], ids=["empty-after-header", "duration-disagrees-with-audio", "unknown-characters"])
def test_manifest_content_is_refused_naming_the_line(edit, fragments, data, tmp_path, recipe_main, capsys):
    manifest = write_manifest_copy(data, tmp_path, edit)
    out = tmp_path / "run"
    status, lines = run_recipe(recipe_main, capsys, data, out, train_csv=manifest)
    assert_refused(status, lines, out, *fragments)


def _unwritable_parent(tmp_path):
    if os.geteuid() == 0:  # root writes through any permission bits: a folder no one can create a file in
        return Path("/proc") / "privasr-test-run"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "run"


@pytest.mark.parametrize("overrides, fragments", [
    (["--max_duration", "0.5"], ["no utterance of at most max_duration 0.5 s", "raise --max_duration"]),
    (["--batch_size", "0"], ["--batch_size must be a positive integer, got 0"]),
    (["--valid_dataloader_opts", "{batch_size: 0}"], ["valid_dataloader_opts: batch_size must be a positive"]),
    (["--batch_size", "4", "--virtual_cores", "8", "--clipping", "pcc"],
     ["--batch_size 4 is smaller than --virtual_cores 8", "at least one example"]),
    (["--batch_size", "32"], ["train16.csv: 16 training utterances, fewer than one batch (batch_size 32)"]),
    (["--number_of_epochs", "0"], ["--number_of_epochs must be a positive integer to train, got 0"]),
    (["--vocab_size", "50"], ["--vocab_size 50 but the tokenizer in", "was trained with vocab_size 40"]),
    (["--tokenizer_type", "unigram"], ["--tokenizer_type unigram but", "was trained with model_type char"]),
    (["--lr", "-1"], ["--lr must be a positive number, got -1"]),
    (["--loss_reduction", "avg"], ["unknown loss_reduction 'avg'; accepted: mean, sum"]),
    (["--beam_size", "0"], ["--beam_size must be a positive integer, got 0"]),
    (["--train_eval_size", "0"], ["--train_eval_size must be a positive integer, got 0"]),
    (["--max_duration", "0"], ["--max_duration must be a positive number of seconds (null: no limit)"]),
    (["--num_workers", "-1"], ["--num_workers must be >= 0, got -1"]),
], ids=["empty-after-max-duration", "batch-size-0", "valid-batch-size-0", "fewer-examples-than-cores",
        "fewer-utterances-than-a-batch", "zero-epochs", "vocab-size-of-another-tokenizer",
        "tokenizer-type-of-another-tokenizer", "negative-lr", "unknown-loss-reduction", "beam-size-0",
        "train-eval-size-0", "max-duration-0", "negative-workers"])
def test_impossible_settings_are_refused(overrides, fragments, data, tmp_path, recipe_main, capsys):
    out = tmp_path / "run"
    status, lines = run_recipe(recipe_main, capsys, data, out, *overrides)
    assert_refused(status, lines, out, *fragments)


@pytest.mark.parametrize("where, fragments", [
    ("file", ["is a file, not a folder"]),
    ("under-file", ["cannot be created", "is a file"]),
    ("unwritable", ["cannot write in"]),
])
def test_output_folder_that_cannot_be_written_is_refused(where, data, tmp_path, recipe_main, capsys, fragments):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    out = {"file": blocker, "under-file": blocker / "run", "unwritable": _unwritable_parent(tmp_path)}[where]
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() and where != "unwritable" else None
    status, lines = run_recipe(recipe_main, capsys, data, out)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: --output_folder "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines
    assert blocker.read_text() == "not a folder\n"
    if before is not None:  # not even the write probe is left behind
        assert sorted(p.name for p in out.parent.iterdir()) == before
    assert where == "file" or not out.exists()


def test_model_output_size_comes_from_the_tokenizer(data, tmp_path):
    from privasr.cli.hparams import load_hparams
    from privasr.tokenizer import Tokenizer

    argv = recipe_argv(data, tmp_path / "run")
    overrides = "\n".join(f"{k[2:]}: {v}" for k, v in zip(argv[2::2], argv[3::2]) if k != "--noprogressbar")
    hparams = load_hparams(argv[1], overrides)
    classes = Tokenizer.load(data / "tokenizer").vocab_size
    assert hparams["vocab_size"] == 40 and classes == 29  # the char tokenizer: 26 letters, word boundary, unk, blank
    assert hparams["model"].vocab_size == classes
    assert not (tmp_path / "run").exists()


def test_model_built_with_another_output_size_is_refused(data, tmp_path, recipe_main, capsys):
    text = (RECIPE / "hparams" / "conformer_ctc.yaml").read_text()
    fixed = text.replace("vocab_size: !apply:privasr.tokenizer.model_output_size [!ref <tokenizer>, !ref <vocab_size>]",
                         "vocab_size: !ref <vocab_size>")
    assert fixed != text
    (tmp_path / "fixed.yaml").write_text(fixed)
    out = tmp_path / "run"
    argv = recipe_argv(data, out)[1:]
    argv[0] = str(tmp_path / "fixed.yaml")
    status = run_cli(recipe_main, argv, prog="train.py", user_errors=RECIPE_ERRORS)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert_refused(status, lines, out, "the model has 40 output classes but the tokenizer in", "has 29")


# warnings: training goes on; checked on the shared data code (no training run)
def _dataset(data, tmp_path, edit, **kwargs):
    from privasr.asr import make_dataset
    from privasr.tokenizer import Tokenizer

    manifest = broken_copy(data, tmp_path, edit)
    return make_dataset(str(manifest), Tokenizer.load(data / "tokenizer"), **kwargs), manifest


def test_small_duration_disagreement_and_unknown_characters_are_warned_about(data, tmp_path, caplog):
    def edit(table, tmp_path):
        table[2]["duration"] = str(float(table[2]["duration"]) + 0.2)  # within the error bound
        table[4]["wrd"] = table[4]["wrd"] + " O'NEILL"  # the apostrophe is not in the char tokenizer

    with caplog.at_level(logging.WARNING):
        dataset, manifest = _dataset(data, tmp_path, edit)
    assert len(dataset) == 16
    messages = [r.getMessage() for r in caplog.records]
    duration = [m for m in messages if "differs from the audio" in m]
    assert len(duration) == 1 and f"{manifest}:4 '{rows(manifest)[2]['ID']}'" in duration[0], messages
    unknown = [m for m in messages if "does not know" in m]
    assert len(unknown) == 1 and "(\"'\")" in unknown[0] and f"{manifest}:6 '{rows(manifest)[4]['ID']}'" in unknown[0]


def test_utterances_beyond_max_duration_are_left_out_whatever_the_sorting(data, tmp_path, caplog):
    durations = sorted(float(row["duration"]) for row in rows(data / "train16.csv"))
    limit = (durations[7] + durations[8]) / 2
    with caplog.at_level(logging.WARNING):
        dataset, manifest = _dataset(data, tmp_path, lambda table, path: None, sort="random", max_duration=limit)
    assert len(dataset) == 8
    assert any("8 of 16 utterances are longer than max_duration" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("recipe, keys", [
    (RECIPE, ["--clipping none", "--clip_bound 1.0", "b for pcc / pec", "--virtual_cores 8",
              "per-core batch = batch_size / virtual_cores", "--output_folder exp/<clipping>/seed<seed>"]),
    (RECIPE.parents[1] / "SSL" / "bestrq", ["--noise_multiplier 1.0", "--dp_clip_mode dim", "--public_fraction 0.01"]),
], ids=["asr", "ssl"])
def test_help_lists_the_recipe_keys_with_defaults_and_meanings(recipe, keys, capsys):
    main = runpy.run_path(str(recipe / "train.py"))["main"]
    for argv in (["--help"], [str(sorted((recipe / "hparams").glob("*.yaml"))[0]), "--help"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert "--max_grad_norm" in text  # SpeechBrain's own options, still there
        for key in keys:
            assert key in text, key
        assert "--model " not in text and "--modules" not in text  # built objects are not options


@pytest.mark.parametrize("case, fragments", [
    ("warm-start-batch-0", ["--warm_start_batch_size must be a positive integer, got 0"]),
    ("dp-batch-0", ["--dp_batch_size must be a positive integer, got 0"]),
    ("output-under-a-file", ["--output_folder", "cannot be created", "is a file"]),
    ("empty-after-max-duration", ["no utterances of at most 0.5 s"]),
    ("empty-after-header", ["train.csv: no utterances"]),
])
def test_ssl_recipe_refuses_bad_input_before_anything_is_written(case, fragments, data, tmp_path, capsys):
    recipe = RECIPE.parents[1] / "SSL" / "bestrq"
    main = runpy.run_path(str(recipe / "train.py"))["main"]
    out = tmp_path / "run"
    options = {"warm-start-batch-0": ["--warm_start_batch_size", "0"], "dp-batch-0": ["--dp_batch_size", "0"],
               "empty-after-max-duration": ["--max_duration", "0.5"]}.get(case, [])
    if case == "output-under-a-file":
        (tmp_path / "blocker").write_text("")
        out = tmp_path / "blocker" / "run"
    if case == "empty-after-header":
        options = ["--train_csv", str(write_manifest_copy(data, tmp_path, _header_only))]
    argv = [str(recipe / "hparams" / "bestrq_dp_quick.yaml"), "--data_folder", str(data), "--output_folder", str(out),
            "--noprogressbar", *options]
    status = run_cli(main, argv, prog="bestrq/train.py", user_errors=RECIPE_ERRORS)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("bestrq/train.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()
