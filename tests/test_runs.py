"""A run directory under faults: a second process, kill -9 and resume, non-finite values, a
failed start, and old training states."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ban import engine
from ban.engine import loop, runs
from ban.files import write_jsonl
from ban.tasks import vqa
from tests.test_engine import assert_same_weights, make_tiny_data, tiny_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("runs"))


def records(run, drop=("time", "examples_per_s")):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def test_a_second_process_on_the_same_run_is_refused_naming_the_holder(tiny_data, tmp_path):
    run = tmp_path / "run"
    engine.train(tiny_config(tiny_data, epochs=1), run, progress=False, max_steps=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from ban.engine.runs import RunLock
            RunLock({str(run)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RuntimeError, match=f"in use by another training process \\(PID {holder.pid}\\)"
        ):
            engine.train(tiny_config(tiny_data, epochs=1), run, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is gone with it, and the run continues
    assert (run / "lock").read_text().strip() == str(holder.pid)
    result = engine.train(tiny_config(tiny_data, epochs=1), run, resume=True, progress=False)
    assert result.status == "finished"


def test_after_kill_and_resume_the_log_equals_an_uninterrupted_run(tiny_data, tmp_path):
    config = tiny_config(tiny_data, epochs=2)
    engine.train(config, tmp_path / "full", progress=False)
    engine.train(config, tmp_path / "part", progress=False, max_steps=3)
    # kill -9 after the checkpoint: records of steps the resumed run does again, a cut line
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "step", "step": 4, "loss": 1.0}) + "\n")
        f.write(json.dumps({"kind": "step", "step": 5, "loss": 1.0}) + "\n")
        f.write('{"kind": "step", "st')
    engine.train(config, tmp_path / "part", resume=True, progress=False)
    assert records(tmp_path / "full") == records(tmp_path / "part")
    assert_same_weights(
        tmp_path / "full" / "last.safetensors", tmp_path / "part" / "last.safetensors"
    )
    assert len((tmp_path / "part" / "command.txt").read_text().splitlines()) == 2  # two starts


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    config = engine.resume_config  # noqa: F841 (the module is importable without data)
    from ban import configs

    bad = configs.resolve("vqa-small", overrides={"data": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.train(bad, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


class PoisonedTask(vqa.VQATask):
    """The VQA task with NaN features in the batches of the given steps (counted from 1)."""

    poisoned = {2}

    def __init__(self, config):
        super().__init__(config)
        self.calls = 0

    def step(self, module, batch, device):
        self.calls += 1
        if self.calls in self.poisoned:
            batch["features"][:] = float("nan")
        return super().step(module, batch, device)


def test_a_non_finite_loss_stops_training_before_any_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "task_for", PoisonedTask)
    with pytest.raises(loop.NonFiniteError, match="between step 2 and step 2 .*nothing was saved"):
        engine.train(tiny_config(tiny_data, epochs=2), tmp_path / "run", progress=False)
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert not written & {"state.pt", "last.safetensors", "best.safetensors", "report.json"}
    # found at the end of an epoch too, where no step record reads it
    monkeypatch.setattr(PoisonedTask, "poisoned", {3})
    config = tiny_config(tiny_data, epochs=1, log_every=1000)
    with pytest.raises(loop.NonFiniteError, match="epoch 1"):
        engine.train(config, tmp_path / "quiet", progress=False)
    assert not (tmp_path / "quiet" / "state.pt").exists()


def test_skip_nonfinite_skips_and_counts_the_steps(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "task_for", PoisonedTask)
    config = tiny_config(tiny_data, epochs=1, skip_nonfinite=True)
    result = engine.train(config, tmp_path / "run", progress=False)
    assert result.status == "finished"
    epoch = [r for r in records(tmp_path / "run") if r["kind"] == "epoch"][0]
    assert epoch["skipped_steps"] == 1 and epoch["loss"] == epoch["loss"]  # finite
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_poisoned_model_is_refused_at_evaluation_and_predictions_stay_json(tiny_data, tmp_path):
    engine.train(tiny_config(tiny_data, epochs=1), tmp_path / "run", progress=False)
    path, _ = engine.resolve_checkpoint(tmp_path / "run")
    from ban.checkpoint import load_any

    model = load_any(path)
    with torch.no_grad():
        model.classifier.output.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="question .*not finite"):
        vqa.evaluate(model, tiny_data, "val2014")
    with pytest.raises(ValueError, match="row 1 holds a non-finite number"):
        write_jsonl([{"a": 1.0}, {"a": float("nan")}], tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()


def test_an_old_vqa_state_resumes_exactly_and_an_old_grounding_state_is_refused(
    tiny_data, tmp_path
):
    config = tiny_config(tiny_data, epochs=1)
    engine.train(config, tmp_path / "full", progress=False)
    engine.train(config, tmp_path / "old", progress=False, max_steps=2)
    state = torch.load(tmp_path / "old" / "state.pt", weights_only=True)
    state["version"] = 1  # the layout of ban 0.1: loss*n, score, upper bound, n, grad, steps
    for holder in [state["progress"], *state["ranks"]]:
        loss, n, grad, steps, _skipped, score, upper = holder["sums"]
        holder["sums"] = [loss, score, upper, n, grad, steps]
    torch.save(state, tmp_path / "old" / "state.pt")
    engine.train(config, tmp_path / "old", resume=True, progress=False)
    assert_same_weights(
        tmp_path / "full" / "last.safetensors", tmp_path / "old" / "last.safetensors"
    )
    torch.save({"version": 1, "at": {"epoch": 0}, "sums": []}, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="separate grounding loop of ban 0.1"):
        runs.load_state(tmp_path / "g.pt")
