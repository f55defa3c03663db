"""The training engine: schedule, exact resume, atomic checkpoints, evaluation, DDP (2 gloo
processes against 1 with the same global batch)."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ban import configs, engine, presets
from ban.checkpoint import load_any
from ban.files import atomic_write, atomic_write_text
from ban.tasks import vqa
from tests.test_metrics import official_question_accuracy

# A tiny model: seconds per epoch on one CPU core.
TINY_MODEL = {"model.hidden": 16, "model.glimpses": 2, "model.embedding_dim": 8}


def make_tiny_data(root: Path, train_images: int = 24) -> Path:
    from ban.data import scenes
    from ban.data.prepare import prepare

    raw = scenes.generate(
        root / "raw",
        train_images=train_images,
        val_images=6,
        test_images=4,
        feature_dim=16,
        images=False,
        captions_per_image=1,
    )
    return prepare(raw, root / "prepared", min_answer_count=1, progress=False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


def tiny_config(data, **overrides):
    values = {"data": str(data), "epochs": 2, "batch_size": 16, "log_every": 1, **TINY_MODEL}
    values.update(overrides)
    return configs.resolve("vqa-small", overrides=values)


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ---------------------------------------------------------------------------- schedule


def test_paper_schedule_epoch_by_epoch():
    config = configs.recipe("vqa-paper")  # train2014 -> val2014: base 1e-3
    assert (config.epochs, config.batch_size, config.grad_clip, config.seed) == (
        13,
        256,
        0.25,
        1204,
    )
    assert config.optimizer == "adamax"
    factors = [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.125]
    lrs = [configs.lr_at(config, e) for e in range(13)]
    assert lrs == pytest.approx([1e-3 * f for f in factors])
    trainval = configs.override(
        config, {"train_splits": ["train2014", "val2014"], "eval_split": None}
    )
    lrs = [configs.lr_at(trainval, e) for e in range(13)]
    assert lrs == pytest.approx([7e-4 * f for f in factors])
    assert lrs[3] == pytest.approx(1.4e-3) and lrs[12] == pytest.approx(8.75e-5)


def test_config_layers_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: vqa-paper\nepochs: 3\nmodel_overrides: {glimpses: 4}\n")
    config = configs.resolve(None, path, {"lr": 5e-4, "model.hidden": 64})
    assert (config.model, config.epochs, config.lr) == ("ban-8-vqa", 3, 5e-4)
    assert config.model_overrides == {"glimpses": 4, "hidden": 64}
    with pytest.raises(ValueError, match="unknown training recipe"):
        configs.resolve("ban-huge")
    with pytest.raises(ValueError, match="unknown training setting 'lrate'"):
        configs.resolve(None, None, {"lrate": 1})
    with pytest.raises(ValueError, match="epochs must be an integer"):
        configs.resolve(None, None, {"epochs": "ten"})
    configs.save_yaml(config, tmp_path / "saved.yaml")
    assert configs.from_yaml(tmp_path / "saved.yaml") == config


# ---------------------------------------------------------------------------- training


def test_train_writes_the_run_directory(tiny_data, tmp_path):
    config = tiny_config(tiny_data, lr_warmup=[0.5, 1.0])
    result = engine.train(config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.status == "finished"
    for name in ("config.yaml", "command.txt", "metrics.jsonl", "state.pt", "last.safetensors",
                 "best.safetensors", "report.json", "predictions.jsonl"):  # fmt: skip
        assert (run / name).is_file(), name
    assert not list(run.glob(".*tmp*")), "temporary files left behind"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert [r["lr"] for r in epochs] == pytest.approx([2e-3 * 0.5, 2e-3 * 1.0])
    assert all("eval_score" in r and "examples_per_s" not in r for r in epochs)
    assert all(r["examples_per_s"] > 0 for r in records if r["kind"] == "step")
    report = json.loads((run / "report.json").read_text())
    assert (report["model"], report["epoch"]) == ("last.safetensors", 1)  # what it scores
    assert set(report["official"]["by_answer_type"]) <= {"yes/no", "number", "other"}
    assert 0 <= report["official"]["overall"] <= 100
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["questions"] and all("accuracy" in r for r in rows)
    # the report is the official evaluator's figure for these answers: restated from the raw
    # annotation file (tests/test_metrics.py holds the restatement of vqaEval.py)
    raw = json.loads((tiny_data.parent / "raw" / "v2_mscoco_val2014_annotations.json").read_text())
    humans = {a["question_id"]: a["answers"] for a in raw["annotations"]}
    official = [official_question_accuracy(r["answer"], humans[r["question_id"]]) for r in rows]
    assert report["official"]["overall"] == pytest.approx(100 * sum(official) / len(official))
    assert [r["accuracy"] for r in rows] == pytest.approx(official)
    # a second run into the same directory is refused
    with pytest.raises(ValueError, match="already holds a run"):
        engine.train(tiny_config(tiny_data), run, progress=False)


def test_a_decay_within_an_epoch_starts_at_its_step_and_resumes_exactly(tiny_data, tmp_path):
    config = tiny_config(tiny_data, epochs=2, lr_warmup=[1.0], lr_decay_epochs=[0.5, 1])
    full = engine.train(config, tmp_path / "full", progress=False)
    steps = full.progress.global_step // 2  # per epoch
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    rate = {r["step"]: r["lr"] for r in records if r["kind"] == "step"}
    # the rate each step ran with: x0.25 from half-way through epoch 0, again from epoch 1
    half = math.ceil(steps / 2)
    assert [rate[s] for s in range(1, 2 * steps + 1)] == pytest.approx(
        [2e-3] * half + [5e-4] * (steps - half) + [1.25e-4] * steps
    )
    # stopped after the decay point, resumed: the same run
    engine.train(config, tmp_path / "part", progress=False, max_steps=half + 1)
    engine.train(config, tmp_path / "part", resume=True, progress=False)
    assert_same_weights(
        tmp_path / "full" / "last.safetensors", tmp_path / "part" / "last.safetensors"
    )


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bitwise_identical(tiny_data, tmp_path):
    config = tiny_config(tiny_data, epochs=2)
    full = engine.train(config, tmp_path / "full", progress=False)
    steps_per_epoch = full.progress.global_step // 2
    # stop mid-epoch 1, then at its end (an epoch boundary), then run to the end
    part = engine.train(config, tmp_path / "part", progress=False, max_steps=2)
    assert part.status == "stopped" and (part.progress.epoch, part.progress.step_in_epoch) == (0, 2)
    part = engine.train(
        config, tmp_path / "part", resume=True, progress=False, max_steps=steps_per_epoch
    )
    assert part.status == "stopped" and (part.progress.epoch, part.progress.step_in_epoch) == (1, 0)
    # a stop at an epoch's end is logged like one within it
    last = json.loads((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["kind"], last["epoch"], last["step_in_epoch"]) == ("stop", 1, 0)
    assert (last["step"], last["reason"]) == (steps_per_epoch, "stopped")
    part = engine.train(config, tmp_path / "part", resume=True, progress=False)
    assert part.status == "finished"
    assert_same_weights(
        tmp_path / "full" / "last.safetensors", tmp_path / "part" / "last.safetensors"
    )
    a = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "state.pt", weights_only=True)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert all(torch.equal(state_a[k][name], state_b[k][name]) for name in state_a[k])

    def epochs(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in r.items() if k != "time"}
            for r in map(json.loads, lines)
            if r["kind"] == "epoch"
        ]

    assert epochs("full") == epochs("part")  # the same epoch metrics, interrupted or not
    assert json.loads((tmp_path / "full" / "report.json").read_text()) == json.loads(
        (tmp_path / "part" / "report.json").read_text()
    )


def test_check_batch_names_the_question_and_the_image():
    batch = {
        "question": torch.tensor([[1, 2], [3, 31]]),
        "box_mask": torch.tensor([[True, False], [True, True]]),
        "question_id": [11, 12],
        "image_id": [21, 22],
    }
    with pytest.raises(ValueError, match=r"question 12: token ids must be in 0..30 .*\[3, 31\]"):
        vqa.check_batch(batch, vocab_size=30)
    batch["question"][1, 1] = 30  # the padding index
    batch["box_mask"][0] = False
    with pytest.raises(ValueError, match=r"image 21 \(question 11\) has no boxes"):
        vqa.check_batch(batch, vocab_size=30)
    batch["box_mask"][0, 1] = True
    vqa.check_batch(batch, vocab_size=30)


def test_resume_refuses_another_config(tiny_data, tmp_path):
    engine.train(tiny_config(tiny_data), tmp_path / "run", progress=False, max_steps=1)
    with pytest.raises(ValueError, match="seed"):
        engine.train(tiny_config(tiny_data, seed=7), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match="only .* may change, not lr"):
        engine.resume_config(tmp_path / "run", {"lr": 0.1})
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        engine.train(tiny_config(tiny_data), tmp_path / "empty", resume=True, progress=False)


def test_gradient_accumulation_matches_the_full_batch(tiny_data, tmp_path):
    no_dropout = {"model.dropout": 0.0, "model.attention_dropout": 0.0,
                  "model.classifier_dropout": 0.0, "epochs": 1}  # fmt: skip
    engine.train(tiny_config(tiny_data, **no_dropout), tmp_path / "a", progress=False)
    engine.train(tiny_config(tiny_data, grad_accum=4, **no_dropout), tmp_path / "b", progress=False)
    wa, wb = (
        weights(tmp_path / "a" / "last.safetensors"),
        weights(tmp_path / "b" / "last.safetensors"),
    )
    # Equal up to the order of floating-point sums, which differs between CPUs' kernels: the
    # glimpse biases' gradient sums over every logit, 1.7e-4 apart (relative) on an AVX2-only AMD
    # EPYC (Zen 3), under 1e-4 on AVX-512 CPUs. Stepping each micro-batch instead of accumulating
    # ends up to 17% apart there.
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-5, msg=key)


def test_bf16_autocast_trains(tiny_data, tmp_path):
    result = engine.train(
        tiny_config(tiny_data, amp="bf16", epochs=1), tmp_path / "r", progress=False
    )
    assert result.status == "finished"
    assert all(
        torch.isfinite(w).all() for w in weights(tmp_path / "r" / "last.safetensors").values()
    )


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_text(path, "old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_clear_errors_for_data_and_checkpoints(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vqa.resolve_data(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        vqa.resolve_data(tmp_path / "empty")
    with pytest.raises(ValueError, match="split 'val2017' is not in"):
        vqa.open_split(tiny_data, "val2017")
    # a model of other data: another answer list
    model = presets.build(presets.preset("ban-small", visual_dim=16, hidden=8, glimpses=1))
    model.answers = ["a", "b"]
    with pytest.raises(ValueError, match="answer list"):
        vqa.evaluate(model, tiny_data, "val2014")
    model.answers = None
    with pytest.raises(ValueError, match="answers"):
        vqa.evaluate(model, tiny_data, "val2014")


def test_evaluate_and_submission(tiny_data, tmp_path):
    engine.train(tiny_config(tiny_data, epochs=1), tmp_path / "run", progress=False)
    path, config = engine.resolve_checkpoint(tmp_path / "run")
    assert path.name == "best.safetensors" and config.data == str(tiny_data)
    model = load_any(path)
    report, rows = vqa.evaluate(model, tiny_data, "test2015", top_k=3)
    assert "official" not in report and report["questions"] == len(rows) > 0
    assert all(len(r["top_k"]) == 3 for r in rows)
    vqa.write_submission(rows, tmp_path / "sub.json")
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert sub[0].keys() == {"question_id", "answer"} and isinstance(sub[0]["question_id"], int)


# ---------------------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _even_copy(data: Path, out: Path, questions: int) -> Path:
    """The prepared directory with `questions` training questions, so that every global batch is
    full (DistributedSampler pads a remainder with repeats, which one process would not see)."""
    shutil.copytree(data, out)
    lines = (data / "train2014.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) >= questions
    (out / "train2014.jsonl").write_text("".join(lines[:questions]))
    return out


def train_in_one_and_two_processes(tmp_path: Path, args: list[str]) -> None:
    """`ban train ARGS` into tmp_path/one (one process) and tmp_path/two (torchrun, 2 gloo
    processes), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "ban", "train", "--out", str(tmp_path / "one"), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         f"--master_port={_free_port()}", "-m", "ban", "train", "--out", str(tmp_path / "two"),
         *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (local batch 8) against 1 process (batch 16): the same samples
    per step and averaged gradients, so the same gradient norms step by step and the same weights
    up to float summation order (which Adamax's sign-like steps amplify a little)."""
    data = _even_copy(tiny_data, tmp_path / "data", 96)
    common = ["--data", str(data), "--epochs", "2", "--batch-size", "16", "--quiet",
              "--set", "model.dropout=0", "--set", "model.attention_dropout=0",
              "--set", "model.classifier_dropout=0", "--set", "log_every=1"]  # fmt: skip
    common += [f"--set={k}={v}" for k, v in TINY_MODEL.items()]
    train_in_one_and_two_processes(tmp_path, common)

    def records(run, kind):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    steps_one, steps_two = records("one", "step"), records("two", "step")
    assert len(steps_one) == len(steps_two) == 12
    for a, b in zip(steps_one, steps_two, strict=True):  # the learning curve, step by step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    for a, b in zip(records("one", "epoch"), records("two", "epoch"), strict=True):
        assert a["examples"] == b["examples"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["eval_upper_bound"] == pytest.approx(b["eval_upper_bound"])
    wa = weights(tmp_path / "one" / "last.safetensors")
    wb = weights(tmp_path / "two" / "last.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-3, msg=key)
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report_one["questions"] == report_two["questions"]  # sharded eval, gathered once each
