"""Provenance: a run folder or transcripts made otherwise than asked are refused, naming what differs."""
import csv
import json

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from privasr import provenance as pv


def write_csv(path, rows, header=("ID", "duration", "wav", "spk_id", "wrd")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def hparams(tmp_path):
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "tokenizer.json").write_text('{"model_type": "char"}')
    rows = [("u1", "1.0", "a.wav", "s", "hello world"), ("u2", "1.0", "b.wav", "s", "good day")]
    return {
        "seed": 1, "clipping": "pcc", "clip_bound": 1.0, "virtual_cores": 4, "batch_size": 8, "lr": 0.001,
        "mode": "train", "beam_size": 1, "log_every_n_steps": 10,  # operational: not part of the fingerprint
        "output_folder": str(tmp_path / "exp" / "pcc" / "seed1"), "save_folder": str(tmp_path / "exp" / "pcc" /
                                                                                       "seed1" / "save"),
        "data_folder": str(data), "tokenizer_dir": str(data / "tokenizer"),
        "train_csv": write_csv(data / "train.csv", rows), "dev_csv": write_csv(data / "dev.csv", rows[:1]),
        "canaries_csv": write_csv(data / "canaries.csv", rows[1:]),
        "model": object(),  # built objects are not settings
    }


def claim_and_record(hparams, **kwargs):
    fingerprint = pv.claim_run_folder(hparams, **kwargs)
    import os

    os.makedirs(hparams["output_folder"], exist_ok=True)
    pv.record_run(hparams["output_folder"], fingerprint)
    return fingerprint


def test_fingerprint_holds_what_determines_the_model(hparams):
    fp = pv.training_fingerprint(hparams, {"precision": "fp32"}, world_size=2)
    assert fp["settings"] == {"batch_size": 8, "clip_bound": 1.0, "clipping": "pcc", "lr": 0.001, "seed": 1,
                              "virtual_cores": 4}
    assert fp["cores"] == {"processes": 2, "virtual_cores": 4, "grad_accumulation": 1, "total": 8}
    assert set(fp["data"]) == {"train_csv", "dev_csv", "canaries_csv"} and all(fp["data"].values())
    assert fp["tokenizer"] and fp["code"].startswith("privasr")
    # SpeechBrain's options as they take effect: max_grad_norm only when given (its default is not applied)
    assert fp["run_options"] == {"precision": "fp32", "skip_nonfinite_grads": False, "grad_accumulation_factor": 1}
    given = pv.training_fingerprint(hparams, {"max_grad_norm": 0.5}, world_size=1)["run_options"]
    assert given["max_grad_norm"] == 0.5
    pec = pv.training_fingerprint({**hparams, "clipping": "pec"}, world_size=2)
    assert pec["cores"]["total"] == 16  # one core per example of each process's batch of 8


def test_same_settings_reuse_the_folder_other_settings_are_refused_by_name(hparams):
    claim_and_record(hparams)
    assert pv.claim_run_folder(dict(hparams))  # the same run again (resume, "already trained?")
    assert pv.claim_run_folder({**hparams, "log_every_n_steps": 1, "mode": "decode"}, needs_checkpoint=False)
    with pytest.raises(pv.ProvenanceError, match=r"other settings \(settings.clip_bound: 1.0 there, 0.5 here\)"):
        pv.claim_run_folder({**hparams, "clip_bound": 0.5})
    with pytest.raises(pv.ProvenanceError, match=r"cores.processes: 1 there, 2 here; cores.total: 4 there, 8 here"):
        pv.check_run_folder(hparams["output_folder"], pv.training_fingerprint(hparams, world_size=2))


def test_changed_manifest_or_canaries_content_is_refused(hparams):
    claim_and_record(hparams)
    with open(hparams["canaries_csv"], "a", encoding="utf-8") as handle:
        handle.write("u3,1.0,c.wav,s,new canary\n")
    with pytest.raises(pv.ProvenanceError, match=r"data.canaries_csv: '[0-9a-f]{16}' there, '[0-9a-f]{16}' here"):
        pv.claim_run_folder(hparams)


def test_checkpoints_without_a_fingerprint_cannot_be_proved(hparams, tmp_path):
    save = tmp_path / "exp" / "pcc" / "seed1" / "save"
    Checkpointer(save, {"model": torch.nn.Linear(2, 2)}).save_checkpoint(meta={"WER": 50.0, "epoch": 1})
    with pytest.raises(pv.ProvenanceError, match="no fingerprint.json .* cannot be proved"):
        pv.claim_run_folder(hparams)
    # a fine-tuning started from a copied checkpoint says which run it came from: accepted, and recorded
    # (the run it came from: the same model and tokenizer, another seed)
    init = pv.training_fingerprint(hparams)
    init["settings"]["seed"] = 9
    (save.parent / pv.INIT_FINGERPRINT_FILE).write_text(json.dumps(init))
    fingerprint = pv.claim_run_folder(hparams)
    assert fingerprint["init"] == pv.digest_of(init)


def test_decoding_needs_a_trained_model(hparams):
    with pytest.raises(pv.ProvenanceError, match="holds no trained model .*no fingerprint.json"):
        pv.claim_run_folder(hparams, needs_checkpoint=True)
    claim_and_record(hparams)
    with pytest.raises(pv.ProvenanceError, match="holds no trained model .*no checkpoint in"):
        pv.claim_run_folder(hparams, needs_checkpoint=True)
    with pytest.raises(pv.ProvenanceError, match="no best checkpoint in .* never decoded"):
        pv.trained_checkpoint(hparams["save_folder"], "best")


def test_transcripts_are_bound_to_their_checkpoint_and_manifests(hparams, tmp_path):
    fingerprint = claim_and_record(hparams)
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(hparams["save_folder"], {"model": model})
    checkpointer.save_checkpoint(meta={"WER": 50.0, "epoch": 1})
    run = tmp_path / "exp" / "pcc" / "seed1"
    hyps = run / "hyps"
    hyps.mkdir()
    write_csv(hyps / "canaries.csv", [("u2", "", "good day", "1.0")], header=("ID", "hyp", "ref", "score"))
    checkpoint = pv.trained_checkpoint(hparams["save_folder"], "best")
    record = pv.transcripts_record(fingerprint, checkpoint, {"canaries": hparams["canaries_csv"]},
                                   {"decode_checkpoint": "best", "beam_size": 1})
    assert not pv.transcripts_current(hyps, record)
    pv.record_transcripts(hyps, record)
    assert pv.transcripts_current(hyps, record)
    assert pv.check_transcripts(run, ["canaries"])["checkpoint"]["name"] == checkpoint.path.name
    pv.check_references(hyps / "canaries.csv", hparams["canaries_csv"])

    # a better checkpoint appeared since decoding: the transcripts are not the run's best model's
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointer.save_checkpoint(meta={"WER": 40.0, "epoch": 2})
    with pytest.raises(pv.ProvenanceError, match="come from checkpoint CKPT.*best checkpoint is now CKPT"):
        pv.check_transcripts(run, ["canaries"])


def test_canaries_remade_with_the_same_ids_are_refused(hparams, tmp_path):
    hyps = write_csv(tmp_path / "hyps.csv", [("u2", "", "good day", "1.0")], header=("ID", "hyp", "ref", "score"))
    remade = write_csv(tmp_path / "canaries.csv", [("u2", "1.0", "b.wav", "s", "other words")])
    with pytest.raises(pv.ProvenanceError, match="reference of u2 is 'good day', but .* now says 'other words'"):
        pv.check_references(hyps, remade)
    more = write_csv(tmp_path / "more.csv", [("u2", "1.0", "b.wav", "s", "good day"), ("u9", "1", "c", "s", "x")])
    with pytest.raises(pv.ProvenanceError, match="1 of its IDs missing"):
        pv.check_references(hyps, more)


def test_transcripts_without_a_record_cannot_be_scored(hparams, tmp_path):
    claim_and_record(hparams)
    (tmp_path / "exp" / "pcc" / "seed1" / "hyps").mkdir()
    with pytest.raises(pv.ProvenanceError, match="no provenance.json: .* cannot be traced"):
        pv.check_transcripts(tmp_path / "exp" / "pcc" / "seed1", ["canaries"])


def test_describe_run_names_bound_per_core_batch_and_cores(hparams):
    assert pv.describe_run(pv.training_fingerprint(hparams, world_size=2)) == "pcc, b=1.0, B=2, C=8"
    assert pv.describe_run(pv.training_fingerprint({**hparams, "clipping": "apcc"})) == "apcc, B=2, C=4"
    assert pv.describe_run(pv.training_fingerprint({**hparams, "clipping": "pec"})) == "pec, b=1.0, B=1, C=8"
    assert pv.describe_run(None) == "–"


def test_env_log_lists_what_pip_freeze_lists_without_running_it(tmp_path):
    """record_run's env.log (recipes pass save_env_desc=False to SpeechBrain) names every package pip freeze names."""
    import re
    import subprocess
    import sys

    from privasr.provenance import ENV_FILE, code_version, record_run

    record_run(tmp_path, {"settings": {}})
    text = (tmp_path / ENV_FILE).read_text(encoding="utf-8")

    def canonical(line):
        name, _, version = line.partition("==")
        return re.sub(r"[-_.]+", "-", name).lower() + "==" + version

    ours = {canonical(line) for line in text.splitlines() if "==" in line}
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    pinned = {canonical(line) for line in freeze.splitlines() if "==" in line and " @ " not in line and not line.startswith("#")}
    assert pinned and pinned <= ours
    assert {"torch", "speechbrain", "privasr"} <= {line.partition("==")[0] for line in ours}
    assert code_version() in text and sys.version in text
