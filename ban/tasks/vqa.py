"""The VQA task: prepared VQA v2 data (or the built-in benchmark), the BAN model sized for it,
the release's loss, and evaluation with the official VQA accuracy.

What the engine (`ban.engine.loop.train`) asks of a task is listed in `ban/tasks/__init__.py`;
this module also holds the functions that `ban evaluate` and the predictor call directly.

Why it is long (about 470 lines): data, model, loss, evaluation and report of one task, as the
engine's plug-in contract asks; the evaluation functions are also the `ban evaluate` command's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ban import metrics, presets
from ban.configs import TrainConfig
from ban.data import scenes
from ban.data.prepare import (
    load_answers,
    load_dictionary,
    load_embeddings,
    load_prepared,
    read_manifest,
)
from ban.data.vqa import collate
from ban.distributed import (
    ONE_PROCESS,
    DistEnv,
    all_reduce_sum,
    autocast,
    epoch_batches,
    gather,
    stats_device,
)
from ban.files import atomic_write_text
from ban.model import bad_token_rows

# --------------------------------------------------------------------------------------------
# Data


def resolve_data(data: str | Path | None, progress: bool = False) -> Path:
    """The prepared directory to use: `data`, or the built-in benchmark (generated and prepared
    on first use, then cached; `progress`: shown while that runs)."""
    if data is None:
        return Path(scenes.default_prepared(progress=progress))
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
    return list(read_manifest(data_dir)["splits"])


def open_split(data_dir: Path, split: str | list[str], in_memory: bool = False) -> Dataset:
    """The `VQADataset` of prepared split(s): a name, `a+b`, or a list of names joined; with
    `in_memory`, their region features are read into RAM first (said, and refused when they
    would not fit)."""
    names = split if isinstance(split, str) else "+".join(split)
    known = available_splits(data_dir)
    for name in names.split("+"):
        if name not in known:
            raise ValueError(
                f"split {name!r} is not in {data_dir}; prepared splits: {', '.join(known)}"
            )
    return load_prepared(data_dir, names, in_memory=in_memory)


def visual_dim(data_dir: Path) -> int:
    """The region feature size of a prepared directory."""
    return int(read_manifest(data_dir)["feature_dim"])


def build_model(config: TrainConfig, data_dir: Path) -> nn.Module:
    """The model of `config` sized for the prepared data: vocabulary, answers, feature size, and
    the word embedding initialised from the prepared GloVe (and tf-idf, for the 'c' embedding)."""
    dictionary = load_dictionary(data_dir)
    answers = load_answers(data_dir)
    embeddings = load_embeddings(data_dir)
    overrides = dict(config.model_overrides)
    if embeddings is not None:
        overrides.setdefault("embedding_dim", int(embeddings[0].shape[1]))
    model_config = presets.preset(
        config.model,
        vocab_size=len(dictionary),
        num_answers=len(answers),
        visual_dim=visual_dim(data_dir),
        **overrides,
    )
    if model_config.task != "vqa":
        raise ValueError(f"model preset {config.model!r} is a {model_config.task} model")
    model = presets.build(model_config)
    if embeddings is not None and model_config.embedding_dim == embeddings[0].shape[1]:
        glove, tfidf = embeddings
        model.init_embeddings(glove=glove, tfidf=tfidf if model_config.tfidf_embedding else None)
    model.vocabulary = list(dictionary.words)
    model.answers = list(answers)
    return model


def check_compatible(model: nn.Module, data_dir: Path) -> None:
    """A model and a prepared directory must agree on vocabulary, answers and feature size."""
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


# --------------------------------------------------------------------------------------------
# A batch through the model


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


def forward(
    model: nn.Module, batch: dict, device: torch.device, amp: str | None, vocab_size: int
) -> torch.Tensor:
    """Answer logits `[B, A]` of a batch (checked on the host first)."""
    check_batch(batch, vocab_size)
    v = batch["features"].to(device, non_blocking=True)
    b = batch["spatials"].to(device, non_blocking=True)
    q = batch["question"].to(device, non_blocking=True)
    mask = batch["box_mask"].to(device, non_blocking=True)
    with autocast(device, amp):
        return model(v, b, q, box_mask=mask, check_values=False).logits


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The release's loss: BCE with logits averaged over batch and answers, times the number of
    answers (the sum over answers, averaged over the batch)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target) * target.size(1)


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
    env: DistEnv = ONE_PROCESS,
    progress: bool = False,
) -> EvalResult:
    """Run `model` over `dataset` (sharded across processes under DDP, gathered on every rank).

    Returns each question's top answer with its sigmoid confidence and, when the split has
    targets, the summary of the training-score approximation (argmax soft score, `min(1,
    0.3*count)`) and the upper bound (mean of the best target), both in percent. A non-finite
    score (a poisoned checkpoint) is an error naming the question.
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
    sums = torch.zeros(4, dtype=torch.float64, device=stats_device(device))
    pending = []  # per batch: question ids, image ids, top answers and confidences (on device)
    show = progress and env.is_main
    for batch in tqdm(loader, desc="evaluate", disable=not show, leave=False, dynamic_ncols=True):
        logits = forward(model, batch, device, amp, model.config.vocab_size).float()
        probs = torch.sigmoid(logits)
        conf, top = probs.topk(min(top_k, probs.size(1)), dim=1)
        if "target" in batch:
            target = batch["target"].to(device)
            sums[0] += metrics.approximate_score(logits, target).sum().double().to(sums.device)
            sums[1] += target.max(dim=1).values.sum().double().to(sums.device)
            sums[2] += loss_fn(logits, target).double().to(sums.device) * len(target)
            sums[3] += len(target)
        pending.append((batch["question_id"], batch["image_id"], top, conf))
    rows: list[dict[str, Any]] = []
    for question_ids, image_ids, top, conf in pending:
        for qid, image_id, index, confidences in zip(
            question_ids, image_ids, top.tolist(), conf.tolist(), strict=True
        ):
            if confidences[0] != confidences[0]:  # NaN
                raise ValueError(
                    f"question {qid} (image {image_id}): the model's answer scores are not finite "
                    "(NaN); the checkpoint or the region features hold non-finite values"
                )
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
    sums = all_reduce_sum(sums, env, device)
    if env.distributed:
        merged: dict[int, dict] = {}
        for part in gather(rows, env):
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
    env: DistEnv = ONE_PROCESS,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate on one prepared split: (report, per-question predictions).

    The report has the official VQA accuracy (docs/reference.md) overall, by answer type and by
    question type when the split has human answers, and the training-score approximation,
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
        "task": "vqa",
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


def write_submission(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The VQA server's format: a JSON list of {"question_id": int, "answer": str}."""
    payload = [{"question_id": row["question_id"], "answer": row["answer"]} for row in rows]
    atomic_write_text(path, json.dumps(payload))


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [f"split {report['split']}: {report['questions']} questions"]
    if report.get("official"):
        lines.append(metrics.format_official(report["official"]))
    approx = report.get("approximate")
    if approx:
        lines.append(
            f"training-score approximation: {approx['score']:.2f} "
            f"(upper bound {approx['upper_bound']:.2f}, loss {approx['loss']:.4f})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The task, as the engine sees it


class VQATask:
    """VQA for the engine: BCE against soft scores; per epoch the training-score approximation
    on the evaluation split selects best.safetensors; the final report scores the model at the
    end of training (as the release reports its last epoch) with the official metric."""

    name = "vqa"
    final_model = "last"
    select_key = "eval_score"
    sums = ("score", "upper_bound")  # the task's running sums, after the engine's

    def __init__(self, config: TrainConfig):
        self.config = config
        self.vocab_size = 0

    def resolve_data(self, progress: bool = False) -> Path:
        return resolve_data(self.config.data, progress)

    def datasets(self, data_dir: Path) -> tuple[Dataset, Dataset | None]:
        in_memory = self.config.in_memory
        train_set = open_split(data_dir, self.config.train_splits, in_memory)
        eval_set = (
            open_split(data_dir, self.config.eval_split, in_memory)
            if self.config.eval_split
            else None
        )
        return train_set, eval_set

    def build_model(self, data_dir: Path) -> nn.Module:
        model = build_model(self.config, data_dir)
        self.vocab_size = model.config.vocab_size
        return model

    collate = staticmethod(collate)

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["question_id"])

    def step(
        self, module: nn.Module, batch: dict, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss averaged over the batch, this batch's task sums [2] on the device)."""
        target = batch["target"].to(device, non_blocking=True)
        logits = forward(module, batch, device, self.config.amp, self.vocab_size)
        loss = loss_fn(logits, target)
        with torch.no_grad():
            score = metrics.approximate_score(logits.detach().float(), target).sum()
            upper = target.max(dim=1).values.sum()
        return loss, torch.stack([score, upper]).double()

    @staticmethod
    def summarize(sums: list[float], examples: float) -> dict[str, float]:
        n = max(examples, 1.0)
        return {"score": 100 * sums[0] / n, "upper_bound": 100 * sums[1] / n}

    def evaluate_epoch(
        self, model: nn.Module, eval_set: Dataset, device: torch.device, env: DistEnv
    ) -> dict[str, float]:
        result = predict_dataset(
            model,
            eval_set,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            device=device,
            amp=self.config.amp,
            num_workers=self.config.num_workers,
            env=env,
        )
        if "approx_score" not in result.summary:
            return {}
        return {
            "eval_score": result.summary["approx_score"],
            "eval_upper_bound": result.summary["upper_bound"],
            "eval_loss": result.summary["loss"],
        }

    def evaluate_final(
        self, model: nn.Module, data_dir: Path, device: torch.device, env: DistEnv
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return evaluate(
            model,
            data_dir,
            self.config.eval_split,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            device=device,
            amp=self.config.amp,
            num_workers=self.config.num_workers,
            env=env,
        )

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        text = f"score {record['score']:.2f}"
        if "eval_score" in record:
            text += (
                f" | eval score {record['eval_score']:.2f} "
                f"(upper bound {record['eval_upper_bound']:.2f})"
            )
        return text

    format_report = staticmethod(format_report)
