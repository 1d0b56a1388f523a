"""egs/librispeech/run.sh end to end on a fabricated LibriSpeech tree (the real layout, noise audio).

The paper's model is the Conformer XL transducer; on 2 CPU cores this test overrides it with the
`tiny` size (the XL configuration itself is built and counted in tests/test_models.py).
"""
import os
import subprocess

import numpy as np
import soundfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "egs", "librispeech", "run.sh")
WORDS = "THE CAT SAT ON A MAT WITH HER OLD DOG AND RAN HOME AT NIGHT".split()


def fabricate_librispeech(root, splits, speakers=2, chapters=1, utterances=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for spk in range(speakers):
            for chapter in range(chapters):
                d = root / "LibriSpeech" / split / str(100 + spk) / str(10 + chapter)
                d.mkdir(parents=True)
                lines = []
                for u in range(utterances):
                    uid = f"{100 + spk}-{10 + chapter}-{u:04d}"
                    soundfile.write(d / f"{uid}.flac", rng.normal(0, 0.1, 16000 + 4000 * u).astype("float32"), 16000)
                    lines.append(f"{uid} " + " ".join(rng.choice(WORDS, 4)))
                (d / f"{100 + spk}-{10 + chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root / "LibriSpeech"


def run(*args):
    return subprocess.run(["bash", RUN, *args], capture_output=True, text=True, timeout=600)


def test_fabricated_librispeech_end_to_end(tmp_path):
    corpus = fabricate_librispeech(tmp_path, ["train-clean-100", "dev-clean", "test-clean"])
    result = run("--librispeech_root", str(corpus), "--train_splits", "train-clean-100",
                 "--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--methods", "pcc",
                 "--vocab_size", "20", "--canary_args", "--per-count 1 --counts 1 2 --holdout 4",
                 "--train_args", "--model_size=tiny --number_of_epochs=1 --batch_size=4 --virtual_cores=2 "
                                 "--train_eval_size=4 --num_workers=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(tmp_path / "exp" / "pcc" / "seed1" / "train_log.txt").read()
    assert "epoch: 1" in log
    results = open(tmp_path / "exp" / "RESULTS.md").read()
    assert "| pcc |" in results


def test_missing_corpus_is_named(tmp_path):
    result = run("--librispeech_root", str(tmp_path), "--stop_stage", "0")
    assert result.returncode == 2
    assert "split 'train-clean-100' not found" in result.stderr and "Traceback" not in result.stderr
