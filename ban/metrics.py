"""The metrics: VQA accuracy (the official metric, overall, by answer type, by question type, and
the release's training-score approximation, named as such wherever it is reported) and Recall@K
for phrase grounding.

The official metric is the evaluation server's, computed exactly as its evaluator does
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py; docs/reference.md section 5),
with the server's two-decimal view beside the unrounded figures. Reported numbers are percentages.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ban.data.prepare import read_manifest
from ban.data.scenes import FAMILIES
from ban.data.vqa import process_digit_article, process_punctuation
from ban.files import read_json

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


# --------------------------------------------------------------------------------------------
# The built-in benchmark: scores per question family, beside the answers that need no training


def reference_scores(raw_dir: str | Path, split: str = "val2014") -> dict[str, dict[str, float]]:
    """Two answers that need no training, scored with the official VQA metric on `split` of a
    scene benchmark: "chance", a uniformly random answer among those of the question's type in
    train2014 (its expectation, exactly), and "most-frequent", the most frequent train2014 answer
    of the question's type. Each maps "overall", every answer type and every question family to a
    percentage. Under the official metric a wrong yes/no answer still earns credit when some of
    the ten annotators gave it, so chance on yes/no questions is near 60 %, not 50 %."""
    raw = Path(raw_dir)
    families = read_json(raw / "scenes.json")["splits"][split]["families"]

    def annotations(name: str) -> list[dict]:
        path = raw / f"v2_mscoco_{name}_annotations.json"
        return read_json(path)["annotations"]

    seen: dict[str, Counter] = defaultdict(Counter)
    for a in annotations("train2014"):
        seen[a["question_type"]][a["multiple_choice_answer"]] += 1
    chance: dict[str, list[float]] = defaultdict(list)
    frequent: dict[str, list[float]] = defaultdict(list)
    for a in annotations(split):
        humans = [h["answer"] for h in a["answers"]]
        candidates = seen[a["question_type"]]
        if not candidates:
            raise ValueError(
                f"{raw}: question type {a['question_type']!r} of {split} question "
                f"{a['question_id']} never occurs in train2014"
            )
        random_answer = sum(vqa_accuracy(c, humans) for c in candidates) / len(candidates)
        top_answer = vqa_accuracy(candidates.most_common(1)[0][0], humans)
        for key in ("overall", a["answer_type"], families[str(a["question_id"])]):
            chance[key].append(random_answer)
            frequent[key].append(top_answer)
    return {
        name: {key: 100 * sum(v) / len(v) for key, v in values.items()}
        for name, values in (("chance", chance), ("most-frequent", frequent))
    }


def family_scores(
    raw_dir: str | Path, predictions: list[dict], split: str = "val2014"
) -> dict[str, tuple[int, float]]:
    """Per question family: (questions, official VQA accuracy in %) of `predictions`, rows with
    "question_id" and "accuracy" (0..1) as in a run's predictions.jsonl; families in FAMILIES
    order, those without a question left out."""
    families = read_json(Path(raw_dir) / "scenes.json")["splits"][split]["families"]
    scores: dict[str, list[float]] = defaultdict(list)
    for row in predictions:
        key = str(row["question_id"])
        if key not in families:
            raise ValueError(f"{raw_dir}/scenes.json: no question {key} in {split}")
        scores[families[key]].append(row["accuracy"])
    return {
        f: (len(scores[f]), 100 * sum(scores[f]) / len(scores[f])) for f in FAMILIES if scores[f]
    }


def family_report(data_dir: str | Path, predictions_path: str | Path) -> list[str]:
    """Lines of accuracy per question family beside chance, for a run on a scene benchmark:
    `data_dir` the prepared directory the run evaluated on (val2014), `predictions_path` its
    predictions.jsonl. Empty when the data is not a scene benchmark (no scenes.json in the raw
    directory the manifest names), so that a caller may print it after any VQA run."""
    raw = Path(read_manifest(data_dir).get("raw_dir", ""))
    if not (raw / "scenes.json").is_file():
        return []
    with open(predictions_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    scores = family_scores(raw, rows)
    chance = reference_scores(raw)["chance"]
    lines = ["by question family (official VQA accuracy; chance: a random answer of its type):"]
    for family, (n, accuracy) in scores.items():
        lines.append(
            f"  {family:<11} {accuracy:6.2f}   chance {chance[family]:6.2f}   ({n:,} questions)"
        )
    total = sum(n for n, _ in scores.values())
    overall = sum(n * a for n, a in scores.values()) / total
    lines.append(f"  {'overall':<11} {overall:6.2f}   chance {chance['overall']:6.2f}")
    return lines
