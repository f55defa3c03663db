import json
from itertools import combinations

import pytest
import torch

from ban.data.vqa import (
    answer_scores,
    answer_vocabulary,
    collate,
    load_annotations,
    load_questions,
    normalize_answer,
    soft_score,
)
from ban.metrics import vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("two", "2"),
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("yes.", "yes"),
        ("yes!", "yes"),
        ("t-shirt", "t shirt"),
        ("black and white", "black and white"),
        ("3,000", "3000"),
        ("hello,world", "hello world"),
        ("5.5", "5.5"),
        ("(left)", "left"),
        ("café", "café"),
        ("狗", "狗"),
    ],
)
def test_official_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def official_leave_one_out(prediction, answers):
    """The metric as its definition: min(1, matches / 3) averaged over the 10 subsets of 9."""
    subsets = list(combinations(range(len(answers)), len(answers) - 1))
    accs = [min(1.0, sum(answers[i] == prediction for i in s) / 3) for s in subsets]
    return sum(accs) / len(accs)


@pytest.mark.parametrize("count", range(11))
def test_soft_scores_equal_the_official_metric(count):
    answers = ["red"] * count + [f"other{i}" for i in range(10 - count)]
    assert soft_score(count) == pytest.approx(official_leave_one_out("red", answers), abs=1e-12)
    assert vqa_accuracy("red", answers) == pytest.approx(soft_score(count), abs=1e-12)


def test_vqa_accuracy_normalizes_like_the_official_eval():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two\n", answers) == pytest.approx(0.9)
    assert vqa_accuracy("three", answers) == pytest.approx(1.0)
    # answers that all agree are not processed (official behaviour)
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


def test_answer_scores_raw_or_normalized():
    ans2label = {"yes": 0, "2": 1}
    human = ["yes", "Yes.", "yes", "two", "2", "no", "yes", "yes", "2", "no"]
    assert answer_scores(human, ans2label) == ([0, 1], [1.0, 0.6])
    labels, scores = answer_scores(human, ans2label, normalize=True)
    assert dict(zip(labels, scores, strict=True)) == {0: 1.0, 1: 0.9}


def test_answer_vocabulary_counts_distinct_questions():
    annotations = [
        {"question_id": i, "multiple_choice_answer": a}
        for i, a in enumerate(["Yes", "yes.", "no", "two", "2", "2", "no", "cat"])
    ] + [{"question_id": 0, "multiple_choice_answer": "cat"}]
    assert answer_vocabulary(annotations, min_count=2) == ["yes", "no", "2", "cat"]
    assert answer_vocabulary(annotations, min_count=3) == ["2"]


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_question_file_errors_name_file_record_and_field(tmp_path):
    good = {"question_id": 1, "image_id": 5, "question": "What?"}
    with pytest.raises(
        ValueError,
        match=r"q.json: record 1 \(question_id 2\): field 'question' "
        "is empty",
    ):
        load_questions(
            _write(
                tmp_path / "q.json",
                {"questions": [good, {**good, "question_id": 2, "question": "  "}]},
            )
        )
    with pytest.raises(ValueError, match="q.json: record 0: missing field 'image_id'"):
        load_questions(_write(tmp_path / "q.json", {"questions": [{"question_id": 1}]}))
    with pytest.raises(ValueError, match="expected a JSON object with a list under 'questions'"):
        load_questions(_write(tmp_path / "q.json", [good]))
    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(ValueError, match="broken.json: corrupt JSON"):
        load_questions(tmp_path / "broken.json")
    (tmp_path / "latin1.json").write_bytes('{"questions": ["caf\xe9"]}'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8"):
        load_questions(tmp_path / "latin1.json")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_questions(tmp_path / "nowhere.json")


def test_annotation_errors(tmp_path):
    a = {
        "question_id": 1,
        "image_id": 5,
        "answers": [{"answer": "x"}, {"answer_id": 2}],
        "multiple_choice_answer": "x",
        "answer_type": "other",
        "question_type": "what",
    }
    with pytest.raises(ValueError, match=r"record 0 \(question_id 1\): answers\[1\]"):
        load_annotations(_write(tmp_path / "a.json", {"annotations": [a]}))


def _sample(n, dv=4, target=True, qid=0):
    s = {
        "features": torch.randn(n, dv),
        "spatials": torch.rand(n, 6),
        "question": torch.arange(14),
        "question_id": qid,
        "image_id": 100 + qid,
        "answer_type": "other",
        "question_type": "what",
    }
    if target:
        s["target"] = torch.rand(7)
    return s


def test_collate_pads_with_zero_rows():
    samples = [_sample(3, qid=1), _sample(5, qid=2)]
    batch = collate(samples)
    assert set(batch) == {
        "features",
        "spatials",
        "box_mask",
        "question",
        "target",
        "question_id",
        "image_id",
    }
    assert batch["features"].shape == (2, 5, 4) and batch["spatials"].shape == (2, 5, 6)
    torch.testing.assert_close(batch["features"][0, :3], samples[0]["features"])
    assert batch["features"][0, 3:].abs().sum() == 0 and batch["spatials"][0, 3:].sum() == 0
    torch.testing.assert_close(batch["features"][1], samples[1]["features"])
    assert batch["box_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch["question"].dtype == torch.int64 and batch["question"].shape == (2, 14)
    torch.testing.assert_close(batch["target"][1], samples[1]["target"])
    assert batch["question_id"] == [1, 2] and batch["image_id"] == [101, 102]
    assert "target" not in collate([_sample(2, target=False)])
