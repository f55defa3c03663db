"""The metrics: VQA accuracy (the official metric, overall, by answer type, by question type, and
the release's training-score approximation, named as such wherever it is reported) and Recall@K
for phrase grounding.

The official metric is the evaluation server's, computed exactly as its evaluator does
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py; docs/reference.md section 5),
with the server's two-decimal view beside the unrounded figures. Reported numbers are percentages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ban.data.vqa import process_digit_article, process_punctuation

OFFICIAL_NAME = "VQA accuracy (official metric: min(1, matches/3) over 10 leave-one-out subsets)"
APPROXIMATE_NAME = (
    "training-score approximation (soft score of the argmax answer, min(1, 0.3*count) over the "
    "raw human answers; not the official metric)"
)
DECIMALS = 2  # the evaluation server's rounding (vqaEval.py's n=2)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers, in [0, 1].

    The official flow, step for step:

    1. every human answer and the prediction: newlines and tabs become spaces, outer spaces go;
    2. if the (cleaned) human answers are not all equal, every human answer and the prediction
       get ``process_punctuation`` then ``process_digit_article`` (lowercase, number words ->
       digits, articles dropped, contractions restored); unanimous answers are compared as they
       are, so ``"Yes"`` scores 0 against ten ``"yes"``;
    3. for each human answer i, ``min(1, #(other answers equal to the prediction) / 3)``,
       averaged over i.

    Step 3 leaves out answer i by position; the official code leaves out the answer dicts equal
    to answer i's, which is the same thing since every dict of an annotation file has its own
    ``answer_id``.

    >>> vqa_accuracy("2", ["two", "two", "2", "2"] + ["no"] * 6)
    1.0
    """
    if not answers:
        raise ValueError("vqa_accuracy: no human answers")
    prediction = _clean(prediction)
    answers = [_clean(a) for a in answers]
    if len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        prediction = process_digit_article(process_punctuation(prediction))
    matches = sum(1 for a in answers if a == prediction)
    # answer i's own vote is not among "the others" when it matches
    per_answer = [min(1, (matches - (a == prediction)) / 3) for a in answers]
    return float(sum(per_answer)) / len(per_answer)


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

    Returns {"metric", "overall", "by_answer_type", "by_question_type", "rounded", "counts",
    "per_question"}: percentages unrounded, "rounded" the same three figures rounded to two
    decimals as the evaluation server prints them (the evaluator's own expression,
    `round(100 * sum(accuracies) / n, 2)`, over the questions in annotation order), and
    per-question accuracies in [0, 1].
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
    # vqaEval.py's setAccuracy: 100 * float(sum(acc)) / len(acc), summed in question order
    overall = 100 * float(sum(per_question.values())) / n if n else float("nan")
    by_answer_type = _means(by_answer)
    by_question_type = _means(by_question)
    return {
        "metric": OFFICIAL_NAME,
        "overall": overall,
        "by_answer_type": by_answer_type,
        "by_question_type": by_question_type,
        "rounded": {
            "decimals": DECIMALS,
            "overall": round(overall, DECIMALS),
            "by_answer_type": {k: round(v, DECIMALS) for k, v in by_answer_type.items()},
            "by_question_type": {k: round(v, DECIMALS) for k, v in by_question_type.items()},
        },
        "counts": {
            "questions": len(per_question),
            "by_answer_type": {k: len(v) for k, v in sorted(by_answer.items())},
            "by_question_type": {k: len(v) for k, v in sorted(by_question.items())},
        },
        "per_question": per_question,
    }


def format_official(official: Mapping[str, Any], width: int = 100) -> str:
    """The server's view of a :func:`vqa_report` as text: overall, per answer type and per
    question type (a table in columns), each rounded to two decimals, with question counts."""
    rounded = official.get("rounded") or {
        "overall": round(official["overall"], DECIMALS),
        "by_answer_type": {k: round(v, DECIMALS) for k, v in official["by_answer_type"].items()},
        "by_question_type": {
            k: round(v, DECIMALS) for k, v in official["by_question_type"].items()
        },
    }
    counts = official.get("counts", {})
    lines = [
        f"VQA accuracy (official evaluator, as the server rounds it): overall "
        f"{rounded['overall']:.2f} ({counts.get('questions', '?')} questions)"
    ]
    if rounded["by_answer_type"]:
        n = counts.get("by_answer_type", {})
        cells = [
            f"{k} {v:.2f} ({n[k]})" if k in n else f"{k} {v:.2f}"
            for k, v in rounded["by_answer_type"].items()
        ]
        lines.append("per answer type: " + "   ".join(cells))
    if rounded["by_question_type"]:
        n = counts.get("by_question_type", {})
        cells = [
            (f"{k}", f"{v:6.2f}", f"({n[k]})" if k in n else "")
            for k, v in rounded["by_question_type"].items()
        ]
        name_w = max(len(c[0]) for c in cells)
        count_w = max(len(c[2]) for c in cells)
        cell_w = name_w + 1 + 6 + 1 + count_w
        columns = max(1, (width + 3) // (cell_w + 3))
        rows = -(-len(cells) // columns)
        lines.append("per question type:")
        for r in range(rows):
            row = [cells[i] for i in range(r, len(cells), rows)]
            lines.append(
                "  "
                + "   ".join(
                    f"{name:<{name_w}} {acc} {count:<{count_w}}" for name, acc, count in row
                ).rstrip()
            )
    return "\n".join(lines)


def _means(groups: Mapping[str, list[float]]) -> dict[str, float]:
    return {key: 100 * sum(values) / len(values) for key, values in sorted(groups.items())}


# --------------------------------------------------------------------------------------------
# Recall@K for phrase grounding

KS = (1, 5, 10)


def ranked_boxes(scores: torch.Tensor, box_mask: torch.Tensor, k: int) -> torch.Tensor:
    """`[..., min(k, N)]` indices of the k best boxes; padded boxes last; ties go to the lower
    index (a stable sort)."""
    masked = scores.float().masked_fill(~box_mask, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def phrase_hits(
    scores: torch.Tensor, positives: torch.Tensor, box_mask: torch.Tensor, ks=KS
) -> torch.Tensor:
    """`[P, len(ks)]` bool: whether a positive box is among phrase p's top-k real boxes.

    `scores`, `positives [P, N]`, `box_mask [P, N]` (True = a real box). A padded box never counts
    (it is ranked last and is never positive); with fewer than k real boxes all of them count.
    """
    positives = positives.bool() & box_mask
    order = ranked_boxes(scores, box_mask, max(ks))
    hit_at = positives.gather(1, order)  # [P, k] positives in rank order
    found = torch.cumsum(hit_at.int(), dim=1) > 0  # [P, k]: a positive within the first j+1
    return torch.stack([found[:, min(k, found.shape[1]) - 1] for k in ks], dim=1)


def recall_report(
    hits, covered, types: list[list[str]], protocol: str, ks=KS, type_order=()
) -> dict[str, Any]:
    """Recall@K (percent) over all phrases, the upper bound, and per-type recall (a phrase counts
    once in each of its types; 'all' once). `hits [P, len(ks)]`, `covered [P]` bool; per-type
    rows in `type_order` first, then any other type alphabetically."""
    hits = np.asarray(hits, dtype=bool).reshape(-1, len(ks))
    covered = np.asarray(covered, dtype=bool)

    def summary(rows: np.ndarray) -> dict[str, Any]:
        n = int(rows.sum())
        out: dict[str, Any] = {"phrases": n}
        for j, k in enumerate(ks):
            out[f"R@{k}"] = 100.0 * float(hits[rows, j].mean()) if n else float("nan")
        out["upper_bound"] = 100.0 * float(covered[rows].mean()) if n else float("nan")
        return out

    everything = np.ones(len(covered), dtype=bool)
    report = {"protocol": protocol, **summary(everything), "per_type": {}}
    names = list(type_order) + sorted({t for ts in types for t in ts} - set(type_order))
    for name in names:
        rows = np.array([name in ts for ts in types], dtype=bool)
        if rows.any():
            report["per_type"][name] = summary(rows)
    return report
