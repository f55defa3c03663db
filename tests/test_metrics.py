"""The official VQA accuracy against hand-computed examples; the training-score approximation."""

import pytest
import torch

from ban import metrics


def report_of(predictions, annotations):
    return metrics.vqa_report(predictions, annotations)


def test_unanimous_answer_scores_one():
    r = report_of({1: "yes"}, {1: {"answers": ["yes"] * 10, "answer_type": "yes/no"}})
    assert r["overall"] == pytest.approx(100.0)


def test_leave_one_out_average():
    # 1 of 10 humans said red: leaving that one out gives 0 matches (9 subsets give 1/3 each).
    answers = ["red"] + ["blue"] * 9
    r = report_of({1: "red"}, {1: {"answers": answers}})
    assert r["overall"] == pytest.approx(100 * 9 * (1 / 3) / 10)  # 30.0
    # 3 of 10: the 3 subsets without one of them give 2/3, the other 7 give 1.
    answers = ["2"] * 3 + ["3"] * 7
    r = report_of({1: "2"}, {1: {"answers": answers}})
    assert r["overall"] == pytest.approx(100 * (3 * 2 / 3 + 7) / 10)  # 90.0


def test_prediction_is_normalised_when_humans_disagree():
    # "Two" -> "2" and "a dog." -> "dog" under the official processing.
    answers = ["2"] * 3 + ["3"] * 7
    assert report_of({1: "Two"}, {1: {"answers": answers}})["overall"] == pytest.approx(90.0)
    answers = ["dog"] * 4 + ["cat"] * 6
    assert report_of({1: "a dog."}, {1: {"answers": answers}})["overall"] == pytest.approx(100.0)
    # answers given as the annotation files' dicts
    answers = [{"answer": "dog", "answer_id": i} for i in range(4)] + [{"answer": "cat"}] * 6
    assert report_of({1: "dog"}, {1: {"answers": answers}})["overall"] == pytest.approx(100.0)


def test_breakdown_by_answer_and_question_type():
    annotations = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is there a"},
        2: {"answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        3: {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"},
        4: {
            "answers": ["red"] + ["blue"] * 9,
            "answer_type": "other",
            "question_type": "what color",
        },
    }
    predictions = {1: "yes", 2: "yes", 3: "two", 4: "red", 99: "ignored: not annotated"}
    r = report_of(predictions, annotations)
    assert r["overall"] == pytest.approx((100 + 0 + 90 + 30) / 4)
    assert r["by_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 90.0, "other": 30.0})
    assert r["by_question_type"]["how many"] == pytest.approx(90.0)
    assert r["by_question_type"]["is the"] == pytest.approx(0.0)
    assert r["counts"]["by_answer_type"] == {"number": 1, "other": 1, "yes/no": 2}
    assert r["per_question"][3] == pytest.approx(0.9)
    assert "official" in r["metric"]


def test_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="question_id 7"):
        report_of({}, {7: {"answers": ["yes"] * 10}})


def test_approximate_score_is_soft_score_of_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.6, 1.0], [0.3, 1.0, 0.0]])
    assert metrics.approximate_score(logits, target).tolist() == pytest.approx([0.6, 0.3])
    assert "approximation" in metrics.APPROXIMATE_NAME
