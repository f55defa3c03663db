"""VQA accuracy: the official metric (overall, by answer type, by question type) and the release's
training-score approximation, named as such wherever it is reported.

The official metric (shared/SPEC.md section 5) scores a predicted answer against the ten human
answers: `min(1, #matches / 3)` averaged over the ten leave-one-out subsets of nine, after the
official answer normalisation (`ban.data.vqa.vqa_accuracy`). Reported numbers are percentages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from ban.data.vqa import vqa_accuracy

OFFICIAL_NAME = "VQA accuracy (official metric: min(1, matches/3) over 10 leave-one-out subsets)"
APPROXIMATE_NAME = (
    "training-score approximation (soft score of the argmax answer, min(1, 0.3*count) over the "
    "raw human answers; not the official metric)"
)


def approximate_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The release's training score per example `[B]`: the soft-score target of the argmax answer.

    `logits [B, A]`, `target [B, A]` soft scores. This equals the official accuracy only when the
    targets were computed from normalised human answers and the argmax is in the vocabulary; it
    is an approximation, and is reported as one.
    """
    index = logits.argmax(dim=1, keepdim=True)
    return target.gather(1, index).squeeze(1)


def vqa_report(
    predictions: Mapping[int, str], annotations: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """The official VQA accuracy of `predictions` (question id -> answer string).

    `annotations` maps question id -> {"answers": [10 human answer strings, or dicts with an
    "answer" key], "answer_type": str, "question_type": str}. Questions without annotations are
    ignored; annotated questions without a prediction are an error.

    Returns {"metric", "overall", "by_answer_type", "by_question_type", "counts",
    "per_question"} with percentages (unrounded) and per-question accuracies in [0, 1].
    """
    missing = [qid for qid in annotations if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} annotated questions have no prediction (first: question_id "
            f"{missing[0]})"
        )
    per_question: dict[int, float] = {}
    by_answer: dict[str, list[float]] = defaultdict(list)
    by_question: dict[str, list[float]] = defaultdict(list)
    for qid, annotation in annotations.items():
        answers = [a["answer"] if isinstance(a, Mapping) else a for a in annotation["answers"]]
        accuracy = vqa_accuracy(predictions[qid], answers)
        per_question[qid] = accuracy
        if annotation.get("answer_type"):
            by_answer[annotation["answer_type"]].append(accuracy)
        if annotation.get("question_type"):
            by_question[annotation["question_type"]].append(accuracy)
    n = len(per_question)
    return {
        "metric": OFFICIAL_NAME,
        "overall": 100 * sum(per_question.values()) / n if n else float("nan"),
        "by_answer_type": _means(by_answer),
        "by_question_type": _means(by_question),
        "counts": {
            "questions": n,
            "by_answer_type": {k: len(v) for k, v in sorted(by_answer.items())},
        },
        "per_question": per_question,
    }


def _means(groups: Mapping[str, list[float]]) -> dict[str, float]:
    return {key: 100 * sum(values) / len(values) for key, values in sorted(groups.items())}
