"""Visual Genome QA augmentation, as the release does it (``_load_visualgenome``).

A VG question is kept when its image has a COCO id (``image_data.json``), that COCO image has
features in the split's feature file, and its normalised answer is in the answer vocabulary; the
target is the single answer with score 1.0.
"""

from __future__ import annotations

import sys
from collections.abc import Container
from pathlib import Path

from ban.data.vqa import normalize_answer
from ban.files import read_json


def _read(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list")
    return data


def coco_ids(image_data_path: str | Path) -> dict[int, int]:
    """VG image id -> COCO image id, from ``image_data.json`` (``image_id``, or the v1.0 key
    ``id``; images with a null ``coco_id`` are left out)."""
    path = Path(image_data_path)
    out = {}
    for row, image in enumerate(_read(path)):
        if not isinstance(image, dict):
            raise ValueError(f"{path}: record {row} is not an object")
        vg_id = image.get("image_id", image.get("id"))
        if vg_id is None:
            raise ValueError(f"{path}: record {row}: no 'image_id' (or 'id') field")
        if image.get("coco_id"):
            out[int(vg_id)] = int(image["coco_id"])
    return out


def load_vg_questions(question_answers_path: str | Path) -> list[dict]:
    """Flatten ``question_answers.json`` to ``{"qa_id", "vg_image_id", "question", "answer"}``."""
    path = Path(question_answers_path)
    out = []
    for row, image in enumerate(_read(path)):
        if not isinstance(image, dict) or not isinstance(image.get("qas"), list):
            raise ValueError(f"{path}: record {row}: expected an object with a 'qas' list")
        vg_id = image.get("id", image.get("image_id"))
        for k, qa in enumerate(image["qas"]):
            try:
                item = {
                    "qa_id": int(qa.get("qa_id", qa.get("id"))),
                    "vg_image_id": int(qa.get("image_id", vg_id)),
                    "question": str(qa["question"]),
                    "answer": sys.intern(str(qa["answer"])),  # shared: answers repeat
                }
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise ValueError(
                    f"{path}: record {row}, qas[{k}]: expected qa_id, image_id, "
                    f"question and answer ({error!r})"
                ) from None
            out.append(item)
    return out


def vg_entries(
    vg_questions: list[dict],
    coco_of: dict[int, int],
    has_features: Container[int],
    ans2label: dict[str, int],
) -> tuple[list[dict], dict[str, int]]:
    """VG questions usable with one feature split, as ``(entries, counts)``.

    ``vg_questions`` from :func:`load_vg_questions`, ``coco_of`` from :func:`coco_ids`,
    ``has_features`` the COCO image ids of the split (a ``FeatureStore`` will do).

    Each entry: ``question_id`` (VG ``qa_id``), ``image_id`` (COCO), ``vg_image_id``,
    ``question``, ``answers`` ([the raw answer]), ``labels`` ([label]), ``scores`` ([1.0]).
    ``counts`` reports ``questions`` (all), ``coco`` (on images with a COCO id), ``in_split``
    (... with features here), ``empty_question`` (skipped: no words) and ``used`` (... with an
    answer in the vocabulary).
    """
    counts = {"questions": 0, "coco": 0, "in_split": 0, "empty_question": 0, "used": 0}
    entries = []
    for qa in vg_questions:
        counts["questions"] += 1
        coco = coco_of.get(qa["vg_image_id"])
        if coco is None:
            continue
        counts["coco"] += 1
        if coco not in has_features:
            continue
        counts["in_split"] += 1
        label = ans2label.get(normalize_answer(qa["answer"]))
        if label is None:
            continue
        if not qa["question"].strip():
            counts["empty_question"] += 1
            continue
        counts["used"] += 1
        entries.append(
            {
                "question_id": qa["qa_id"],
                "image_id": coco,
                "vg_image_id": qa["vg_image_id"],
                "question": qa["question"],
                "answers": [qa["answer"]],
                "labels": [label],
                "scores": [1.0],
            }
        )
    return entries, counts
