"""A kept pre-training (privasr.pretrained, privasr-pretrained): kept, verified, refused when altered, installed.

The folders here are made by hand (a fingerprint, a SpeechBrain-style checkpoint folder, a tokenizer); coreutils'
``sha256sum -c`` is the independent check of the digest list. The recipe end to end (run.sh --pretrained) is in
tests/test_recipe_mini_tts.py.
"""
import json
import shutil
import subprocess

import pytest

from privasr import pretrained
from privasr.cli.pretrained import main as cli
from privasr.provenance import ProvenanceError, check_same_model, dir_digest


def make_run(root, epochs=2, last_epoch=2, end_of_epoch=True):
    """A finished run's folder as train.py leaves it, and its tokenizer."""
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.model").write_bytes(b"units")
    run = root / "run"
    ckpt = run / "save" / "CKPT+2026-12-02+00-00-00+00"
    ckpt.mkdir(parents=True)
    (ckpt / "model.ckpt").write_bytes(b"weights" * 100)
    (ckpt / "CKPT.yaml").write_text(f"end-of-epoch: {str(end_of_epoch).lower()}\nepoch: {last_epoch}\nunixtime: 1.0\n")
    fingerprint = {"settings": {"number_of_epochs": epochs, "subsampling_factor": 2, "tokenizer_type": "char",
                                "model_size": "mini", "lr": 0.001},
                   "tokenizer": dir_digest(tokenizer), "data": {}, "code": "privasr test"}
    (run / "fingerprint.json").write_text(json.dumps(fingerprint))
    return run, tokenizer, fingerprint


@pytest.fixture
def kept(tmp_path):
    run, tokenizer, fingerprint = make_run(tmp_path)
    dest = tmp_path / "kept"
    assert pretrained.keep(run, tokenizer, dest, notes="made by hand\n") == fingerprint
    return dest, fingerprint


def test_keep_lists_every_file_with_the_digest_sha256sum_checks(kept):
    dest, fingerprint = kept
    listed = sorted(line.split("  ", 1)[1] for line in (dest / "SHA256SUMS").read_text().splitlines())
    assert listed == ["README.md", "fingerprint.json", "save/CKPT+2026-12-02+00-00-00+00/CKPT.yaml",
                      "save/CKPT+2026-12-02+00-00-00+00/model.ckpt", "tokenizer/tokenizer.model"]
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=dest, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 5
    assert pretrained.verify(dest) == fingerprint and pretrained.epochs(dest) == 2
    assert pretrained.model_overrides(dest) == ["--model_size=mini", "--subsampling_factor=2", "--tokenizer_type=char"]


@pytest.mark.parametrize("alter, message", [
    (lambda d: (d / "save/CKPT+2026-12-02+00-00-00+00/model.ckpt").write_bytes(b"other weights"), "model.ckpt differs"),
    (lambda d: (d / "tokenizer/tokenizer.model").unlink(), "tokenizer.model is listed in SHA256SUMS but missing"),
    (lambda d: (d / "save/extra.ckpt").write_bytes(b"x"), "save/extra.ckpt is not listed"),
    (lambda d: (d / "SHA256SUMS").unlink(), "has no SHA256SUMS"),
])
def test_an_altered_kept_pre_training_is_refused_in_one_line(kept, alter, message, capsys):
    dest, _ = kept
    alter(dest)
    with pytest.raises(ProvenanceError, match=message):
        pretrained.verify(dest)
    assert cli(["verify", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("privasr-pretrained: error: ") and message in err


def test_a_consistent_but_wrong_folder_is_refused_even_with_matching_sums(kept):
    """Re-listing the digests does not make another tokenizer the model's."""
    dest, _ = kept
    (dest / "tokenizer/tokenizer.model").write_bytes(b"other units")
    pretrained.write_sums(dest)
    with pytest.raises(ProvenanceError, match="not the tokenizer the model was trained with"):
        pretrained.verify(dest)


@pytest.mark.parametrize("last_epoch, end_of_epoch, found", [(1, True, "epoch 1"), (2, False, "an intra-epoch one")])
def test_only_a_finished_run_can_be_kept(tmp_path, last_epoch, end_of_epoch, found):
    run, tokenizer, _ = make_run(tmp_path, epochs=2, last_epoch=last_epoch, end_of_epoch=end_of_epoch)
    with pytest.raises(ProvenanceError, match=f"its last checkpoint is {found}, not the end of the run's 2 epochs"):
        pretrained.keep(run, tokenizer, tmp_path / "kept")
    assert not (tmp_path / "kept").exists() and not (tmp_path / "kept.partial").exists()


def test_keep_refuses_another_tokenizer_and_an_existing_folder(tmp_path):
    run, tokenizer, _ = make_run(tmp_path)
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tokenizer, other)
    (other / "tokenizer.model").write_bytes(b"other")
    with pytest.raises(ProvenanceError, match="is not the tokenizer"):
        pretrained.keep(run, other, tmp_path / "kept")
    (tmp_path / "kept").mkdir()
    with pytest.raises(pretrained.UserError, match="exists"):
        pretrained.keep(run, tokenizer, tmp_path / "kept")


def test_install_is_idempotent_and_never_overwrites_something_else(kept, tmp_path):
    dest, fingerprint = kept
    run_dir, tok_dir = tmp_path / "exp" / "pretrain", tmp_path / "data" / "tokenizer"
    assert cli(["install", str(dest), "--tokenizer", str(tok_dir), "--run", str(run_dir)]) == 0
    assert json.loads((run_dir / "fingerprint.json").read_text()) == fingerprint and (run_dir / ".trained").is_file()
    assert (run_dir / "save/CKPT+2026-12-02+00-00-00+00/model.ckpt").read_bytes() == b"weights" * 100
    assert dir_digest(tok_dir) == fingerprint["tokenizer"]
    assert not pretrained.install_run(dest, run_dir) and not pretrained.install_tokenizer(dest, tok_dir)
    (tok_dir / "tokenizer.model").write_bytes(b"mine")
    with pytest.raises(ProvenanceError, match="holds another tokenizer"):
        pretrained.install_tokenizer(dest, tok_dir)
    other = tmp_path / "exp" / "other"
    other.mkdir()
    (other / "fingerprint.json").write_text("{}")
    with pytest.raises(ProvenanceError, match="holds another run"):
        pretrained.install_run(dest, other)


def test_a_fine_tuning_must_keep_the_model_and_tokenizer_it_starts_from():
    init = {"settings": {"subsampling_factor": 2, "model_size": "mini", "lr": 1e-3}, "tokenizer": "aaaa"}
    same = {"settings": {"subsampling_factor": 2, "model_size": "mini", "lr": 5e-4, "clipping": "pcc"},
            "tokenizer": "aaaa"}
    check_same_model(init, same, "run")  # the optimisation and clipping may change
    with pytest.raises(ProvenanceError, match="trained with subsampling_factor 2, but this run asks for 4"):
        check_same_model(init, {**same, "settings": {**same["settings"], "subsampling_factor": 4}}, "run")
    with pytest.raises(ProvenanceError, match="tokenizer aaaa, but this run's tokenizer is bbbb"):
        check_same_model(init, {**same, "tokenizer": "bbbb"}, "run")
