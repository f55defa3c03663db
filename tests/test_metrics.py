"""The official VQA accuracy against hand-computed examples and against a plain restatement of the
official evaluator (property-based); the server's rounded view; the training-score approximation.
"""

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ban import metrics
from ban.data.vqa import CONTRACTIONS


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


# ----------------------------------------------------------------------------------------------
# The official evaluator, restated plainly from GT-Vision-Lab/VQA
# PythonEvaluationTools/vqaEvaluation/vqaEval.py (VQAEval.evaluate, processPunctuation,
# processDigitArticle, setAccuracy), on answer dicts as the annotation files hold them. Only the
# contraction table is shared with the code under test (it is the release's, checked against the
# official one in tests/test_vqa_data.py's normalisation cases).

OFFICIAL_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                  "<", "@", "`", ",", "?", "!"]  # fmt: skip
OFFICIAL_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                       "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                       "nine": "9", "ten": "10"}  # fmt: skip
OFFICIAL_ARTICLES = ["a", "an", "the"]
OFFICIAL_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
OFFICIAL_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def official_process_punctuation(in_text):
    out_text = in_text
    for p in OFFICIAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (
            re.search(OFFICIAL_COMMA_STRIP, in_text) is not None
        ):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return OFFICIAL_PERIOD_STRIP.sub("", out_text, re.UNICODE)  # re.UNICODE lands in `count`


def official_process_digit_article(in_text):
    out_text = []
    for word in in_text.lower().split():
        word = OFFICIAL_MANUAL_MAP.setdefault(word, word)
        if word not in OFFICIAL_ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def official_question_accuracy(res_ans, gt_answers):
    """VQAEval.evaluate for one question: `gt_answers` are the annotation's answer dicts."""
    gts = [dict(a) for a in gt_answers]
    for ans_dic in gts:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ")
        ans_dic["answer"] = ans_dic["answer"].replace("\t", " ")
        ans_dic["answer"] = ans_dic["answer"].strip()
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    gt_acc = []
    gt_answer_strings = [ans["answer"] for ans in gts]
    if len(set(gt_answer_strings)) > 1:
        for ans_dic in gts:
            ans_dic["answer"] = official_process_punctuation(ans_dic["answer"])
            ans_dic["answer"] = official_process_digit_article(ans_dic["answer"])
        res_ans = official_process_punctuation(res_ans)
        res_ans = official_process_digit_article(res_ans)
    for gt_ans_datum in gts:
        other_gt_ans = [item for item in gts if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching_ans)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def official_set_accuracy(acc_qa, acc_ques_type, acc_ans_type, n=2):
    return {
        "overall": round(100 * float(sum(acc_qa)) / len(acc_qa), n),
        "perQuestionType": {
            t: round(100 * float(sum(v)) / len(v), n) for t, v in acc_ques_type.items()
        },
        "perAnswerType": {
            t: round(100 * float(sum(v)) / len(v), n) for t, v in acc_ans_type.items()
        },
    }


def as_dicts(answers):
    return [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
    ]


# ----------------------------------------------------------------------------------------------
# The four cases (prediction; human answers; the official figure)


def test_number_words_in_human_answers_are_digits():
    answers = ["two"] * 2 + ["2"] * 2 + ["no"] * 6
    assert metrics.vqa_accuracy("2", answers) == pytest.approx(1.0)
    assert official_question_accuracy("2", as_dicts(answers)) == pytest.approx(1.0)


def test_articles_in_human_answers_are_dropped():
    answers = ["a dog"] * 3 + ["dog"] + ["cat"] * 6
    assert metrics.vqa_accuracy("dog", answers) == pytest.approx(1.0)
    assert official_question_accuracy("dog", as_dicts(answers)) == pytest.approx(1.0)


def test_contractions_in_human_answers_are_restored():
    answers = ["dont know"] * 3 + ["no"] * 7
    assert metrics.vqa_accuracy("don't know", answers) == pytest.approx(0.9)
    assert official_question_accuracy("don't know", as_dicts(answers)) == pytest.approx(0.9)


def test_human_answers_are_stripped_before_the_unanimity_test():
    answers = ["yes "] * 9 + ["yes"]
    assert metrics.vqa_accuracy("yes", answers) == pytest.approx(1.0)
    assert official_question_accuracy("yes", as_dicts(answers)) == pytest.approx(1.0)


def test_unanimous_answers_are_compared_unprocessed():
    # The official code processes nothing when the humans agree: case and articles then count.
    assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert metrics.vqa_accuracy("a dog", ["dog"] * 10) == 0.0
    assert metrics.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert metrics.vqa_accuracy("yes", ["yes\t"] * 10) == 1.0


def test_no_answers_is_an_error():
    with pytest.raises(ValueError, match="no human answers"):
        metrics.vqa_accuracy("yes", [])


# ----------------------------------------------------------------------------------------------
# Property-based: the metric equals the restated evaluator on generated answer sets

WORDS = ["2", "two", "Two", "TWO", "0", "none", "zero", "ten", "10", "1", "one", "a", "an",
         "The", "the", "dog", "Dog", "dogs", "dont", "don't", "Dont", "know", "isnt", "yes",
         "Yes", "no", "t-shirt", "t shirt", "3,000", "3000", "5.5", "yes.", "no!", "(left)",
         "left", "red/white", "black", "white", "and", "I", "Im", "ma'am", "maam", "café",
         "e.g.", "1.", "1,2", "x;y", "[blue]", '"quoted"', "who's", "whos", "oclock"]  # fmt: skip
PUNCT_MARKS = list(";/[]\"{}()=+\\_-><@`,?!.:'") + [" ,", ", ", " ?", "..."]
SPACES = ["", "", "", " ", "  ", "\t", "\n", " \n", "\t "]


@st.composite
def answer_texts(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))
    joiner = draw(st.sampled_from([" ", " ", "  ", "\t", "-", ","]))
    text = joiner.join(words)
    if draw(st.booleans()):
        mark = draw(st.sampled_from(PUNCT_MARKS))
        at = draw(st.integers(0, len(text)))
        text = text[:at] + mark + text[at:]
    return draw(st.sampled_from(SPACES)) + text + draw(st.sampled_from(SPACES))


@st.composite
def questions(draw):
    """(prediction, human answers): unanimous sets (up to outer whitespace) or split sets drawn
    from a small pool, so that matches happen; the prediction often comes from the pool."""
    pool = draw(st.lists(answer_texts(), min_size=1, max_size=4))
    n = draw(st.sampled_from([10, 10, 10, 1, 3, 9, 11]))
    if draw(st.booleans()):
        base = pool[0].strip()
        answers = [
            draw(st.sampled_from(SPACES)) + base + draw(st.sampled_from(SPACES)) for _ in range(n)
        ]
    else:
        answers = [draw(st.sampled_from(pool)) for _ in range(n)]
    prediction = draw(st.one_of(st.sampled_from(pool), answer_texts()))
    return prediction, answers


@settings(max_examples=250, deadline=None)
@given(questions())
def test_accuracy_equals_the_official_evaluator(question):
    prediction, answers = question
    expected = official_question_accuracy(prediction, as_dicts(answers))
    assert metrics.vqa_accuracy(prediction, answers) == expected  # exactly, not approximately


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("aA2. ,-;!'\t\n?/0tTwoneh")), max_size=12),
    st.lists(st.text(alphabet=st.sampled_from(list("aA2. ,-;!'\t\n?/0tTwoneh")), max_size=12),
             min_size=1, max_size=10),
)  # fmt: skip
def test_accuracy_equals_the_official_evaluator_on_arbitrary_text(prediction, answers):
    expected = official_question_accuracy(prediction, as_dicts(answers))
    assert metrics.vqa_accuracy(prediction, answers) == expected


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(questions(), st.sampled_from(["yes/no", "number", "other"]),
                  st.sampled_from(["how many", "is the", "what color is the", "why"])),
        min_size=1, max_size=25,
    )
)  # fmt: skip
def test_report_rounds_as_the_server(rows):
    predictions, annotations = {}, {}
    acc_qa, acc_ques, acc_ans = [], {}, {}
    for qid, ((prediction, answers), answer_type, question_type) in enumerate(rows):
        predictions[qid] = prediction
        annotations[qid] = {
            "answers": as_dicts(answers),
            "answer_type": answer_type,
            "question_type": question_type,
        }
        acc = official_question_accuracy(prediction, as_dicts(answers))
        acc_qa.append(acc)
        acc_ques.setdefault(question_type, []).append(acc)
        acc_ans.setdefault(answer_type, []).append(acc)
    server = official_set_accuracy(acc_qa, acc_ques, acc_ans)
    report = metrics.vqa_report(predictions, annotations)
    assert report["rounded"]["overall"] == server["overall"]
    assert report["rounded"]["by_answer_type"] == server["perAnswerType"]
    assert report["rounded"]["by_question_type"] == server["perQuestionType"]
    assert report["overall"] == 100 * float(sum(acc_qa)) / len(acc_qa)  # unrounded kept


# ----------------------------------------------------------------------------------------------
# The server's view: rounded figures and their printout


def server_annotations():
    return {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        2: {"answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        3: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        4: {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"},
        5: {"answers": ["red"] + ["blue"] * 9, "answer_type": "other", "question_type": "what"},
        6: {"answers": ["red"] * 2 + ["blue"] * 8, "answer_type": "other", "question_type": "what"},
    }


def test_report_keeps_unrounded_and_adds_the_rounded_view():
    predictions = {1: "yes", 2: "yes", 3: "yes", 4: "two", 5: "red", 6: "red"}
    r = metrics.vqa_report(predictions, server_annotations())
    # per question: 1, 0, 1, 0.9, 0.3, 0.6
    assert r["overall"] == pytest.approx(100 * 3.8 / 6)  # 63.333...
    assert r["rounded"]["overall"] == 63.33
    assert r["by_answer_type"]["yes/no"] == pytest.approx(200 / 3)
    assert r["rounded"]["by_answer_type"] == {"number": 90.0, "other": 45.0, "yes/no": 66.67}
    assert r["rounded"]["by_question_type"] == {"how many": 90.0, "is the": 66.67, "what": 45.0}
    assert r["rounded"]["decimals"] == 2
    assert r["counts"]["by_question_type"] == {"how many": 1, "is the": 3, "what": 2}


def test_format_official_prints_two_decimals_per_type():
    predictions = {1: "yes", 2: "yes", 3: "yes", 4: "two", 5: "red", 6: "red"}
    text = metrics.format_official(metrics.vqa_report(predictions, server_annotations()))
    lines = text.splitlines()
    assert "overall 63.33 (6 questions)" in lines[0]
    assert lines[1] == "per answer type: number 90.00 (1)   other 45.00 (2)   yes/no 66.67 (3)"
    assert lines[2] == "per question type:"
    body = "\n".join(lines[3:])
    assert re.search(r"how many\s+90\.00 \(1\)", body)
    assert re.search(r"is the\s+66\.67 \(3\)", body)
    assert re.search(r"what\s+45\.00 \(2\)", body)
    # narrow: one question type per line; wide: all three on one line
    assert len(metrics.format_official(metrics.vqa_report(predictions, server_annotations()),
                                       width=20).splitlines()) == 6  # fmt: skip
    assert len(lines) == 4


# ----------------------------------------------------------------------------------------------
# benchmarks/metric_change.py: the earlier function and the rescoring of a run


def test_metric_change_script_rescores_a_run(tmp_path, capsys):
    from ban import configs
    from ban.data.prepare import load_prepared, prepare
    from tests.benchmark_scripts import load
    from tests.test_prepare import make_raw

    script = load("metric_change")
    # the figures for the earlier function
    assert script.earlier_vqa_accuracy("2", ["two"] * 2 + ["2"] * 2 + ["no"] * 6) == pytest.approx(
        0.6
    )
    assert script.earlier_vqa_accuracy("yes", ["yes "] * 9 + ["yes"]) == pytest.approx(0.3)

    raw = tmp_path / "raw"
    make_raw(raw, vg=False, glove=False)
    data = prepare(raw, tmp_path / "data", min_answer_count=2, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    config = configs.override(configs.recipe("vqa-small"), {"data": str(data)})
    configs.save_yaml(config, run / "config.yaml")
    annotations = load_prepared(data, "val2014").annotations()
    # "two" everywhere: the "how many" questions (2 x3, two x5, 3 x2) score 1.0 officially but
    # 0.9 earlier, since the human "two"s were not turned into "2"
    answers = {qid: "two" for qid in annotations}
    rows = [{"question_id": q, "answer": a} for q, a in answers.items()]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.main([str(run)]) == 0
    out = capsys.readouterr().out
    official = metrics.vqa_report(answers, annotations)
    earlier = [
        script.earlier_vqa_accuracy(answers[q], a["answers"]) for q, a in annotations.items()
    ]
    assert official["overall"] > 100 * sum(earlier) / len(earlier)
    line = next(x for x in out.splitlines() if x.startswith("overall"))
    assert line.split()[1:3] == [f"{100 * sum(earlier) / len(earlier):.2f}",
                                 f"{official['overall']:.2f}"]  # fmt: skip
    assert "questions scored lower by the earlier metric" in out
    assert "human answers not in normal form: 18 of 60" in out  # 2x "Black." x4, 2x "two" x5
    assert "per question type:" in out
