"""Training and evaluation: the loop, the learning-rate schedule, checkpoints of training state,
exact resume, and distributed data parallel under torchrun.

A run directory holds everything a run wrote:

```
RUN/
  config.yaml         the resolved TrainConfig (what `--resume` and `--config` read)
  command.txt         the command line, the host and the library versions
  metrics.jsonl       one JSON object per line: {"kind": "step" | "epoch" | "eval" | "stop", ...}
  state.pt            training state for `--resume`: weights, optimizer, schedule, RNG, data order
  last.safetensors    the model at the end of the last epoch (or at the interruption)
  best.safetensors    the model with the best evaluation score so far
  report.json         the final evaluation report (official VQA accuracy)
  predictions.jsonl   the final per-question predictions on the evaluation split
```

Every file is written to a temporary name and renamed into place, so a kill or a full disk leaves
the previous version, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from ban import configs, metrics
from ban.configs import TrainConfig
from ban.files import atomic_write, atomic_write_text
from ban.model import bad_token_rows

STATE_FILE = "state.pt"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); a plain `python` start is a one-process job. On CUDA, NCCL
    for CUDA tensors and gloo for CPU tensors: the per-step stop flag is exchanged between the
    hosts without waiting for the GPU. gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
    )
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return env


def resolve_device(name: str | None, env: DistEnv = DistEnv()) -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:1', 'mps'), or the best available. Under torchrun each
    process takes the GPU of its LOCAL_RANK."""
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", env.local_rank if env.distributed else 0)
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on `device`, or nothing."""
    if amp is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Data


def resolve_data(data: str | Path | None) -> Path:
    """The prepared directory to use: `data`, or the built-in benchmark (generated and prepared
    on first use, then cached)."""
    if data is None:
        from ban.data import scenes

        return Path(scenes.default_prepared())
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} does not exist; prepare one with `ban data prepare RAW --out "
            f"{path}` (or leave out --data to use the built-in benchmark)"
        )
    for name in ("manifest.json", "dictionary.json", "answers.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not a prepared data directory: {name} is missing (expected the output "
                "of `ban data prepare RAW --out DIR`; see docs/DESIGN.md)"
            )
    return path


def available_splits(data_dir: Path) -> list[str]:
    from ban.data.prepare import read_manifest

    return list(read_manifest(data_dir)["splits"])


def open_split(data_dir: Path, split: str | list[str]) -> Dataset:
    """The `VQADataset` of prepared split(s): a name, `a+b`, or a list of names joined."""
    from ban.data.prepare import load_prepared

    names = split if isinstance(split, str) else "+".join(split)
    known = available_splits(data_dir)
    for name in names.split("+"):
        if name not in known:
            raise ValueError(
                f"split {name!r} is not in {data_dir}; prepared splits: {', '.join(known)}"
            )
    return load_prepared(data_dir, names)


def collate(samples: list[dict]) -> dict:
    from ban.data.vqa import collate as vqa_collate

    return vqa_collate(samples)


def visual_dim(data_dir: Path) -> int:
    """The region feature size of a prepared directory."""
    from ban.data.prepare import read_manifest

    return int(read_manifest(data_dir)["feature_dim"])


def build_model(config: TrainConfig, data_dir: Path) -> nn.Module:
    """The model of `config` sized for the prepared data: vocabulary, answers, feature size, and
    the word embedding initialised from the prepared GloVe (and tf-idf, for the 'c' embedding)."""
    from ban import model as model_lib
    from ban.data.prepare import load_answers, load_dictionary, load_embeddings

    dictionary = load_dictionary(data_dir)
    answers = load_answers(data_dir)
    embeddings = load_embeddings(data_dir)
    overrides = dict(config.model_overrides)
    if embeddings is not None:
        overrides.setdefault("embedding_dim", int(embeddings[0].shape[1]))
    model_config = model_lib.preset(
        config.model,
        vocab_size=len(dictionary),
        num_answers=len(answers),
        visual_dim=visual_dim(data_dir),
        **overrides,
    )
    if model_config.task != "vqa":
        raise ValueError(f"model preset {config.model!r} is a {model_config.task} model")
    model = model_lib.build(model_config)
    if embeddings is not None and model_config.embedding_dim == embeddings[0].shape[1]:
        glove, tfidf = embeddings
        model.init_embeddings(glove=glove, tfidf=tfidf if model_config.tfidf_embedding else None)
    model.vocabulary = list(dictionary.words)
    model.answers = list(answers)
    return model


class _SkipBatches:
    """A batch sampler without its first `skip` batches (the part of an epoch already done)."""

    def __init__(self, batches: BatchSampler, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


def epoch_batches(
    dataset: Dataset, batch_size: int, epoch: int, seed: int, env: DistEnv, shuffle: bool = True
) -> BatchSampler:
    """This process's batches of `epoch`: a permutation drawn from (seed, epoch) alone, so any
    epoch's order can be rebuilt on resume; under DDP rank r takes every world_size-th sample, so
    the union of the ranks' i-th batches is the i-th batch of one process at the global size."""
    sampler = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed
    )
    sampler.set_epoch(epoch)
    return BatchSampler(sampler, batch_size, drop_last=False)


# --------------------------------------------------------------------------------------------
# Files


def save_model(model: nn.Module, path: str | Path) -> None:
    """The project's checkpoint format (`ban.checkpoint.save` writes atomically)."""
    from ban import checkpoint

    checkpoint.save(model, path)


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed) on the main process."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------
# Training state


@dataclass
class Progress:
    """Where training stands; saved in state.pt."""

    epoch: int = 0  # the epoch in progress (or the next one)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    examples: int = 0  # training examples seen, all processes
    best_score: float | None = None
    best_epoch: int | None = None
    # running sums of the epoch in progress (this process): loss*n, score, upper bound, n, grad norm
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    config: TrainConfig,
    env: DistEnv,
) -> None:
    """Everything `--resume` needs. Collective under DDP (every rank's RNG state and running
    epoch sums are kept)."""
    ranks = _gather({"rng": _rng_state(), "sums": list(progress.sums)}, env)
    if not env.is_main:
        return
    state = {
        "version": STATE_VERSION,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": progress.__dict__,
        "ranks": ranks,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: nothing to resume (a run directory holds state.pt once a "
            "step has been checkpointed)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file
        raise ValueError(f"{path} is not a readable training state: {error}") from error
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')} is not supported")
    return state


# --------------------------------------------------------------------------------------------
# Signals


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next optimizer step, after a checkpoint; a
    second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\nban: {signal.Signals(signum).name} received, stopping after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
        )


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """Per-question predictions of a split and its summary."""

    predictions: list[dict[str, Any]]  # question_id, image_id, answer, confidence, top_k, ...
    summary: dict[str, float]  # approximate score and upper bound (when targets exist), loss


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    num_workers: int = 0,
    top_k: int = 1,
    env: DistEnv = DistEnv(),
    progress: bool = False,
) -> EvalResult:
    """Run `model` over `dataset` (sharded across processes under DDP, gathered on every rank).

    Returns each question's top answer with its sigmoid confidence and, when the split has
    targets, the summary of the training-score approximation (argmax soft score, `min(1,
    0.3*count)`) and the upper bound (mean of the best target), both in percent.
    """
    device = torch.device(device)
    answers = getattr(model, "answers", None)
    was_training = model.training
    model.eval()
    batches = epoch_batches(dataset, batch_size, 0, 0, env, shuffle=False)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator(),
    )
    # Nothing is read back while batches run (a read would make the host wait for the device):
    # the sums stay on the device, and each batch's top answers are read once, after the loop.
    sums = torch.zeros(4, dtype=torch.float64, device=_stats_device(device))
    pending = []  # per batch: question ids, image ids, top answers and confidences (on device)
    for batch in _progress(loader, progress and env.is_main, "evaluate"):
        logits = _forward(model, batch, device, amp, model.config.vocab_size).float()
        probs = torch.sigmoid(logits)
        conf, top = probs.topk(min(top_k, probs.size(1)), dim=1)
        if "target" in batch:
            target = batch["target"].to(device)
            sums[0] += metrics.approximate_score(logits, target).sum().double().to(sums.device)
            sums[1] += target.max(dim=1).values.sum().double().to(sums.device)
            sums[2] += _loss(logits, target).double().to(sums.device) * len(target)
            sums[3] += len(target)
        pending.append((batch["question_id"], batch["image_id"], top, conf))
    rows: list[dict[str, Any]] = []
    for question_ids, image_ids, top, conf in pending:
        for qid, image_id, index, confidences in zip(
            question_ids, image_ids, top.tolist(), conf.tolist(), strict=True
        ):
            row = {
                "question_id": int(qid),
                "image_id": int(image_id),
                "answer": answers[index[0]] if answers else str(index[0]),
                "confidence": round(confidences[0], 6),
            }
            if top_k > 1:
                row["top_k"] = [
                    [answers[j] if answers else str(j), round(c, 6)]
                    for j, c in zip(index, confidences, strict=True)
                ]
            rows.append(row)
    model.train(was_training)
    sums = sums.cpu()
    if env.distributed:
        sums = sums.to(_comm_device(device))
        dist.all_reduce(sums)
        sums = sums.cpu()
        merged: dict[int, dict] = {}
        for part in _gather(rows, env):
            for row in part:  # DistributedSampler pads with repeats: keep one of each
                merged.setdefault(row["question_id"], row)
        rows = list(merged.values())
    rows.sort(key=lambda row: row["question_id"])
    summary: dict[str, float] = {"questions": float(len(rows))}
    if sums[3] > 0:
        n = sums[3].item()
        summary.update(
            approx_score=100 * sums[0].item() / n,
            upper_bound=100 * sums[1].item() / n,
            loss=sums[2].item() / n,
        )
    return EvalResult(rows, summary)


def evaluate(
    model: nn.Module,
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    num_workers: int = 0,
    top_k: int = 1,
    env: DistEnv = DistEnv(),
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate on one prepared split: (report, per-question predictions).

    The report has the official VQA accuracy (shared/SPEC.md section 5) overall, by answer type and
    by question type when the split has human answers, and the training-score approximation,
    named as such. A test split without answers gives predictions only.
    """
    data_dir = Path(data_dir)
    dataset = open_split(data_dir, split)
    check_compatible(model, data_dir)
    result = predict_dataset(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        amp=amp,
        num_workers=num_workers,
        top_k=top_k,
        env=env,
        progress=progress,
    )
    report: dict[str, Any] = {
        "split": split,
        "data": str(data_dir),
        "questions": len(result.predictions),
    }
    annotations = dataset.annotations()
    if annotations:
        official = metrics.vqa_report(
            {row["question_id"]: row["answer"] for row in result.predictions}, annotations
        )
        report["official"] = official
        per_question = official.pop("per_question")
        for row in result.predictions:
            if row["question_id"] in per_question:
                row["accuracy"] = per_question[row["question_id"]]
    if "approx_score" in result.summary:
        report["approximate"] = {
            "metric": metrics.APPROXIMATE_NAME,
            "score": result.summary["approx_score"],
            "upper_bound": result.summary["upper_bound"],
            "loss": result.summary["loss"],
        }
    return report, result.predictions


def check_compatible(model: nn.Module, data_dir: Path) -> None:
    """A model and a prepared directory must agree on vocabulary, answers and feature size."""
    from ban.data.prepare import load_answers, load_dictionary

    answers = load_answers(data_dir)
    model_answers = getattr(model, "answers", None)
    if model_answers is not None and list(model_answers) != list(answers):
        raise ValueError(
            f"the checkpoint's answer list ({len(model_answers)} answers) differs from "
            f"{data_dir / 'answers.json'} ({len(answers)} answers): the model was trained on other "
            "data; evaluate it on the prepared directory it was trained on"
        )
    words = load_dictionary(data_dir).words
    model_words = getattr(model, "vocabulary", None)
    if model_words is not None and list(model_words) != list(words):
        raise ValueError(
            f"the checkpoint's vocabulary ({len(model_words)} words) differs from "
            f"{data_dir / 'dictionary.json'} ({len(words)} words): question token ids would not "
            "line up"
        )
    config = model.config
    if model_answers is None and config.num_answers != len(answers):
        raise ValueError(
            f"the checkpoint has {config.num_answers} answers, {data_dir} has {len(answers)}"
        )
    if model_words is None and config.vocab_size != len(words):
        raise ValueError(
            f"the checkpoint has {config.vocab_size} words, {data_dir} has {len(words)}"
        )
    if config.visual_dim != visual_dim(data_dir):
        raise ValueError(
            f"the checkpoint expects {config.visual_dim}-d region features, {data_dir} has "
            f"{visual_dim(data_dir)}-d"
        )


def write_predictions(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Per-question predictions, one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_submission(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The VQA server's format: a JSON list of {"question_id": int, "answer": str}."""
    payload = [{"question_id": row["question_id"], "answer": row["answer"]} for row in rows]
    atomic_write_text(path, json.dumps(payload))


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [f"split {report['split']}: {report['questions']} questions"]
    official = report.get("official")
    if official:
        types = "  ".join(f"{k} {v:.2f}" for k, v in official["by_answer_type"].items())
        lines.append(f"VQA accuracy (official metric): {official['overall']:.2f}   {types}")
    approx = report.get("approximate")
    if approx:
        lines.append(
            f"training-score approximation: {approx['score']:.2f} "
            f"(upper bound {approx['upper_bound']:.2f}, loss {approx['loss']:.4f})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Training


def check_batch(batch: dict, vocab_size: int) -> None:
    """The model's value checks (token ids in 0..V, a box in every image), done on the host batch
    before it moves, so that the model can skip them and the step never waits for the device."""
    q, box_mask = batch["question"], batch["box_mask"]
    bad_tokens = bad_token_rows(q, vocab_size)
    bad = bad_tokens | ~box_mask.any(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0])
        question, image = batch["question_id"][i], batch["image_id"][i]
        if bad_tokens[i]:
            raise ValueError(
                f"question {question}: token ids must be in 0..{vocab_size} (the last is "
                f"padding), got {q[i].tolist()}"
            )
        raise ValueError(f"image {image} (question {question}) has no boxes")


def _forward(
    model: nn.Module, batch: dict, device: torch.device, amp: str | None, vocab_size: int
) -> torch.Tensor:
    check_batch(batch, vocab_size)
    v = batch["features"].to(device, non_blocking=True)
    b = batch["spatials"].to(device, non_blocking=True)
    q = batch["question"].to(device, non_blocking=True)
    mask = batch["box_mask"].to(device, non_blocking=True)
    with autocast(device, amp):
        return model(v, b, q, box_mask=mask, check_values=False).logits


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The release's loss: BCE with logits averaged over batch and answers, times the number of
    answers (the sum over answers, averaged over the batch)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target) * target.size(1)


def _comm_device(device: torch.device) -> torch.device:
    """Where a small collective's tensor goes: the CPU, unless the process group is NCCL alone."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)


def _grouped(iterable: Iterable, size: int) -> Iterator[list]:
    group: list = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # 'finished' | 'stopped' (max_steps) | 'interrupted' (signal)
    progress: Progress
    report: dict[str, Any] | None = None
    signal: int | None = None


def write_run_header(run_dir: Path, config: TrainConfig, argv: list[str] | None) -> None:
    configs.save_yaml(config, run_dir / "config.yaml")
    command = " ".join(argv) if argv is not None else " ".join(sys.argv)
    info = {
        "command": command,
        "cwd": os.getcwd(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    with open(run_dir / "command.txt", "a") as f:
        f.write(json.dumps(info) + "\n")


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
) -> TrainResult:
    """Train `config` into `run_dir`; evaluate each epoch on `config.eval_split` and at the end.

    `resume=True` continues the run in `run_dir` exactly where its state.pt left it (the config
    comes from the caller; use `configs.from_yaml(run_dir / 'config.yaml')`). `max_steps` stops
    (with a checkpoint) once that many optimizer steps have been taken in total. SIGINT and SIGTERM
    stop after the current step, with a checkpoint. Under torchrun every process calls this;
    rank 0 writes the files.
    """
    if config.task == "flickr":
        from ban import grounding

        result = grounding.train(
            config, run_dir, resume=resume, max_steps=max_steps, progress=progress, argv=argv
        )
        at = Progress(
            epoch=result.epoch, step_in_epoch=result.step_in_epoch, best_epoch=result.best_epoch
        )
        return TrainResult(result.run_dir, result.status, at, result.report, result.signal)
    if config.task != "vqa":
        raise ValueError(f"task {config.task!r} is not available; expected 'vqa' or 'flickr'")
    env = init_distributed(config.device)
    device = resolve_device(config.device, env)
    run_dir = Path(_gather(str(run_dir), env)[0])  # rank 0 names the run
    state_path = run_dir / STATE_FILE
    if env.is_main:
        if not resume and state_path.exists():
            raise ValueError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose "
                "another --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_header(run_dir, config, argv)
    state = load_state(state_path) if resume else None
    if state is not None:
        _check_resume_config(state, config, state_path)

    local_batch, accum = _local_batch(config, env)
    seed_everything(config.seed)
    data_dir = resolve_data(config.data)
    train_set = open_split(data_dir, config.train_splits)
    eval_set = open_split(data_dir, config.eval_split) if config.eval_split else None
    model = build_model(config, data_dir).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer != "adamax":
        raise ValueError(f"optimizer {config.optimizer!r} is not supported; expected 'adamax'")
    optimizer = torch.optim.Adamax(params, lr=configs.lr_at(config, 0))
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    prog = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        prog = Progress(**state["progress"])
        ranks = state["ranks"]
        if len(ranks) == env.world_size:  # the same job shape: continue exactly
            _set_rng_state(ranks[env.rank]["rng"])
            prog.sums = list(ranks[env.rank]["sums"])
        else:  # another number of processes: continue, not bit for bit
            _set_rng_state(ranks[0]["rng"])
            if env.rank > 0:
                seed_everything(config.seed + 1000 * prog.global_step + env.rank)
            prog.sums = list(ranks[0]["sums"]) if env.is_main else [0.0] * 6
    elif env.rank > 0:
        seed_everything(config.seed + env.rank)  # different dropout per rank, same weights

    module: nn.Module = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Every trainable parameter takes part in every step (the counter's unused maps are
        # frozen), so DDP needs no search for unused parameters.
        module = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        module = torch.compile(module)

    log = MetricsLog(run_dir, env.is_main)
    eval_batch = config.eval_batch_size or config.batch_size
    status, signum = "finished", None
    with StopFlag() as stop:
        while prog.epoch < config.epochs:
            epoch = prog.epoch
            lr = configs.lr_at(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = epoch_batches(train_set, local_batch, epoch, config.seed, env)
            steps_in_epoch = math.ceil(len(batches) / accum)
            loader = DataLoader(
                train_set,
                batch_sampler=_SkipBatches(batches, prog.step_in_epoch * accum),
                collate_fn=collate,
                num_workers=config.num_workers,
                generator=torch.Generator().manual_seed(config.seed + epoch),
                pin_memory=device.type == "cuda",
            )
            module.train()
            bar = _progress(
                _grouped(loader, accum),
                progress and env.is_main,
                f"epoch {epoch + 1}/{config.epochs}",
                total=steps_in_epoch - prog.step_in_epoch,
            )
            tick, tick_examples = time.perf_counter(), 0
            # The epoch's sums stay on the device while it runs: reading a loss every step would
            # make the host wait for the device. prog.sums is brought up to date after the loop.
            running = torch.tensor(prog.sums, dtype=torch.float64, device=_stats_device(device))
            for micro_batches in bar:
                n_local = sum(len(mb["question_id"]) for mb in micro_batches)
                step = torch.zeros(2, dtype=torch.float64, device=running.device)  # loss*n, score
                for i, batch in enumerate(micro_batches):
                    sync = i == len(micro_batches) - 1
                    ctx = (
                        module.no_sync()
                        if env.distributed and not sync and hasattr(module, "no_sync")
                        else contextlib.nullcontext()
                    )
                    with ctx:
                        target = batch["target"].to(device, non_blocking=True)
                        logits = _forward(
                            module, batch, device, config.amp, model.config.vocab_size
                        )
                        loss = _loss(logits, target)
                        scaled = loss * (len(target) / n_local)
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    with torch.no_grad():
                        score = metrics.approximate_score(logits.detach().float(), target).sum()
                        step[0] += loss.detach().double().to(running.device) * len(target)
                        step[1] += score.double().to(running.device)
                        running[2] += target.max(dim=1).values.sum().double().to(running.device)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = _clip(params, config.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                running[0] += step[0]
                running[1] += step[1]
                running[3] += n_local
                running[4] += grad_norm.to(running.device)
                running[5] += 1
                prog.step_in_epoch += 1
                prog.global_step += 1
                prog.examples += n_local * env.world_size
                tick_examples += n_local * env.world_size
                if prog.global_step % max(1, config.log_every) == 0 or prog.step_in_epoch == 1:
                    elapsed = max(time.perf_counter() - tick, 1e-9)
                    step_loss, step_score = step.tolist()
                    record = {
                        "epoch": epoch,
                        "lr": lr,
                        "loss": step_loss / n_local,
                        "score": 100 * step_score / n_local,
                        "grad_norm": grad_norm.item(),
                        "examples_per_s": tick_examples / elapsed,
                    }
                    log.write("step", prog.global_step, **record)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}",
                            score=f"{record['score']:.1f}",
                            ex_s=f"{record['examples_per_s']:.0f}",
                        )
                    tick, tick_examples = time.perf_counter(), 0
                stop_now = _any(stop.signal is not None, env, device) or (
                    max_steps is not None and prog.global_step >= max_steps
                )
                if stop_now and prog.step_in_epoch < steps_in_epoch:
                    signum = stop.signal
                    status = "interrupted" if signum is not None else "stopped"
                    break
            prog.sums = running.tolist()
            if status != "finished":
                save_state(state_path, model, optimizer, scaler, prog, config, env)
                if env.is_main:
                    save_model(model, run_dir / "last.safetensors")
                    log.write(
                        "stop",
                        prog.global_step,
                        epoch=epoch,
                        step_in_epoch=prog.step_in_epoch,
                        reason=status,
                    )
                break

            # End of epoch: metrics over all processes, evaluation, checkpoints.
            sums = torch.tensor(prog.sums, dtype=torch.float64)
            if env.distributed:
                sums = sums.to(_comm_device(device))
                dist.all_reduce(sums)
                sums = sums.cpu()
            n = max(sums[3].item(), 1.0)
            epoch_record = {
                "epoch": epoch,
                "lr": lr,
                "loss": sums[0].item() / n,
                "score": 100 * sums[1].item() / n,
                "upper_bound": 100 * sums[2].item() / n,
                "grad_norm": sums[4].item() / max(sums[5].item(), 1.0),
                "examples": prog.examples,
            }
            eval_score = None
            if eval_set is not None:
                result = predict_dataset(
                    model,
                    eval_set,
                    batch_size=eval_batch,
                    device=device,
                    amp=config.amp,
                    num_workers=config.num_workers,
                    env=env,
                )
                eval_score = result.summary.get("approx_score")
                if eval_score is not None:
                    epoch_record.update(
                        eval_score=eval_score,
                        eval_upper_bound=result.summary["upper_bound"],
                        eval_loss=result.summary["loss"],
                    )
            log.write("epoch", prog.global_step, **epoch_record)
            if env.is_main and progress:
                print(_format_epoch(epoch_record, config.epochs), file=sys.stderr)
            improved = eval_score is not None and (
                prog.best_score is None or eval_score > prog.best_score
            )
            if improved:
                prog.best_score, prog.best_epoch = eval_score, epoch
            prog.epoch += 1
            prog.step_in_epoch = 0
            prog.sums = [0.0] * 6
            save_state(state_path, model, optimizer, scaler, prog, config, env)
            if env.is_main:
                save_model(model, run_dir / "last.safetensors")
                if improved or eval_set is None:
                    save_model(model, run_dir / "best.safetensors")
            if (
                max_steps is not None
                and prog.global_step >= max_steps
                and prog.epoch < config.epochs
            ):
                status = "stopped"
                break
            if _any(stop.signal is not None, env, device) and prog.epoch < config.epochs:
                status, signum = "interrupted", stop.signal
                break

    report = None
    if status == "finished" and eval_set is not None:
        report, rows = evaluate(
            model,
            data_dir,
            config.eval_split,
            batch_size=eval_batch,
            device=device,
            amp=config.amp,
            num_workers=config.num_workers,
            env=env,
        )
        report.update(model="last.safetensors", best_epoch=prog.best_epoch)
        if env.is_main:
            atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
            write_predictions(rows, run_dir / "predictions.jsonl")
            log.write("eval", prog.global_step, **_flat(report))
    log.close()
    return TrainResult(run_dir, status, prog, report, signum)


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """`runs/<model preset>-<YYYYmmdd-HHMMSS>`."""
    return Path(root) / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_config(run_dir: str | Path, runtime: dict[str, Any] | None = None) -> TrainConfig:
    """The config of the run in `run_dir`, with runtime settings (device, workers, compile, ...)
    changed; anything that would change what is computed is refused."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    runtime = {k: v for k, v in (runtime or {}).items() if v is not None}
    refused = sorted(set(runtime) - configs.RUNTIME_FIELDS)
    if refused:
        raise ValueError(
            f"--resume continues {run_dir} with its own config.yaml; only "
            f"{', '.join(sorted(configs.RUNTIME_FIELDS))} may change, not {', '.join(refused)}"
        )
    return configs.override(configs.from_yaml(path), runtime, source="--resume")


def resolve_checkpoint(path: str | Path) -> tuple[Path, TrainConfig | None]:
    """A checkpoint file, or a run directory (its best.safetensors, else last.safetensors, with
    the run's config so that its data directory is known)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                config = (
                    configs.from_yaml(path / "config.yaml")
                    if (path / "config.yaml").is_file()
                    else None
                )
                return path / name, config
        raise FileNotFoundError(f"{path} holds no best.safetensors or last.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path, None


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dictionary: str | Path | None = None,
    label2ans: str | Path | None = None,
) -> nn.Module:
    """This project's checkpoint, or the original release's (`ban.load_official`)."""
    from ban.checkpoint import load_any

    return load_any(path, device, dictionary=dictionary, label2ans=label2ans)


def _local_batch(config: TrainConfig, env: DistEnv) -> tuple[int, int]:
    accum = max(1, config.grad_accum)
    parts = env.world_size * accum
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size {config.batch_size} must divide into {env.world_size} processes x "
            f"{accum} accumulation steps"
        )
    return config.batch_size // parts, accum


def _clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to `max_norm` (when > 0); returns the norm before clipping
    (float64, on the device: reading it would wait for the device)."""
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).double()
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm().double() if grads else torch.zeros((), dtype=torch.float64)


def _stats_device(device: torch.device) -> torch.device:
    """Where running float64 sums can live: the training device, except MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _any(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every process when `flag` is true on any (a signal reaches ranks at different
    steps; they must stop at the same one)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(device))
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _check_resume_config(state: dict, config: TrainConfig, path: Path) -> None:
    saved = state["config"]
    current = config.to_dict()
    changed = sorted(
        k for k in current if k not in configs.RUNTIME_FIELDS and saved.get(k) != current[k]
    )
    if changed:
        raise ValueError(
            f"{path} was written with another configuration ({', '.join(changed)} differ); "
            "resume with the run's own config.yaml"
        )


def _format_epoch(record: dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {record['epoch'] + 1}/{epochs}: loss {record['loss']:.4f} "
        f"score {record['score']:.2f} lr {record['lr']:.2e} grad norm {record['grad_norm']:.3f}"
    )
    if "eval_score" in record:
        text += (
            f" | eval score {record['eval_score']:.2f} "
            f"(upper bound {record['eval_upper_bound']:.2f})"
        )
    return text


def _flat(report: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str)) or value is None:
            out[f"{prefix}{key}"] = value
    return out
