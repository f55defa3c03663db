"""`ban train / evaluate / predict` end to end on a tiny benchmark, asserting on files/values."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ban.cli import main
from tests.test_engine import TINY_MODEL, make_tiny_data

TINY = [f"--set={k}={v}" for k, v in TINY_MODEL.items()] + ["--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny-cli"))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    code = main(["train", "--data", str(tiny_data), "--epochs", "1", "--out", str(run), *TINY])
    assert code == 0
    return run


def test_train_makes_a_run_directory(trained, capsys):
    config = (trained / "config.yaml").read_text()
    assert "model: ban-small" in config and "hidden: 16" in config
    command = json.loads((trained / "command.txt").read_text().splitlines()[0])
    assert {"command", "cwd", "torch", "started", "world_size"} <= set(command)
    report = json.loads((trained / "report.json").read_text())
    assert report["split"] == "val2014" and "official" in report and "approximate" in report


def test_evaluate_writes_report_predictions_and_submission(trained, tiny_data, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", str(trained), "--out", str(out), "--submission",
                 str(tmp_path / "sub.json")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "VQA accuracy (official evaluator" in printed and "approximation" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"].endswith("best.safetensors")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["questions"]
    assert report["official"]["overall"] == pytest.approx(
        100 * sum(r["accuracy"] for r in rows) / len(rows)
    )
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert [s["question_id"] for s in sub] == [r["question_id"] for r in rows]
    # the test split has no answers: predictions and a submission only
    code = main(["evaluate", str(trained / "last.safetensors"), "--data", str(tiny_data),
                 "--split", "test-dev2015", "--out", str(tmp_path / "t"),
                 "--submission", str(tmp_path / "test.json")])  # fmt: skip
    assert code == 0
    assert "official" not in json.loads((tmp_path / "t" / "report.json").read_text())
    assert len(json.loads((tmp_path / "test.json").read_text())) > 0


def test_predict_answers_with_boxes(trained, tiny_data, capsys):
    entry = json.loads((tiny_data / "val2014.jsonl").read_text().splitlines()[0])
    code = main(["predict", str(trained), "--image-id", str(entry["image_id"]), "--question",
                 entry["question"], "--top-k", "3", "--boxes", "2", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["answers"]) == 3
    scores = [a["score"] for a in result["answers"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert len(result["boxes"]) == TINY_MODEL["model.glimpses"]
    assert all(len(g) == 2 and len(g[0]["box"]) == 4 for g in result["boxes"])
    # the Python API gives the same answer
    from ban.predict import Predictor  # exported as ban.Predictor by ban/__init__.py

    predictor = Predictor.from_checkpoint(trained / "best.safetensors", data=tiny_data)
    again = predictor(entry["question"], entry["image_id"], top_k=3)
    assert [a for a, _ in again.answers] == [a["answer"] for a in result["answers"]]


def test_errors_are_clear(trained, tiny_data, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--preset", "ban-huge", *TINY]) == 2
    assert "unknown training preset 'ban-huge'" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_data), "--set", "lrate=1", *TINY]) == 2
    assert "unknown training setting 'lrate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])
    assert main(["evaluate", str(tmp_path / "nothing.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # a checkpoint of other data (other answers) on this data directory
    from ban import checkpoint

    model = checkpoint.load(trained / "best.safetensors")
    model.answers = list(reversed(model.answers))
    checkpoint.save(model, tmp_path / "other.safetensors")
    assert main(["evaluate", str(tmp_path / "other.safetensors"), "--data", str(tiny_data)]) == 2
    assert "answer list" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained), "--lr", "0.1"]) == 2
    assert "--resume takes the run's own config" in capsys.readouterr().err


@pytest.mark.slow
def test_sigint_checkpoints_and_resume_is_bitwise_identical(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--epochs", "3", "--set", "log_every=1", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, "-m", "ban", "train", "--out", str(tmp_path / "full"),
                           *args], env=env, capture_output=True, text=True)  # fmt: skip
    assert full.returncode == 0, full.stderr

    run = tmp_path / "part"
    command = [sys.executable, "-m", "ban", "train", "--out", str(run), *args]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "--resume" in err
    assert (run / "state.pt").is_file() and (run / "last.safetensors").is_file()
    assert '"kind": "stop"' in metrics.read_text()
    command = [sys.executable, "-m", "ban", "train", "--resume", str(run), "--quiet"]
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(run / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "report.json").read_text() == (tmp_path / "full" / "report.json").read_text()
