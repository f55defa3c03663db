import json
from itertools import combinations

import pytest
import torch

from ban.data.vqa import (
    Entries,
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


def test_collate_of_equal_box_counts_matches_the_padded_layout():
    samples = [_sample(4, qid=1), _sample(4, qid=2)]
    samples[1]["features"] = samples[1]["features"].half()  # a float16 store: float32 out
    batch = collate(samples)
    assert batch["features"].dtype == batch["spatials"].dtype == torch.float32
    torch.testing.assert_close(batch["features"][0], samples[0]["features"])
    torch.testing.assert_close(batch["features"][1], samples[1]["features"].float())
    torch.testing.assert_close(batch["spatials"][1], samples[1]["spatials"])
    assert batch["box_mask"].tolist() == [[True] * 4] * 2
    padded = collate([*samples, _sample(5, qid=3)])  # the same samples through the padded path
    torch.testing.assert_close(padded["features"][:2, :4], batch["features"])
    assert padded["box_mask"][:2].tolist() == [[True] * 4 + [False]] * 2


LINES = [
    {"question_id": 1, "image_id": 7, "question": "What is it?", "tokens": [3, 4, 0],
     "answers": ["yes"] * 9 + ["no"], "multiple_choice_answer": "yes", "answer_type": "yes/no",
     "question_type": "is", "labels": [0, 1], "scores": [1.0, 0.3]},
    {"question_id": 2, "image_id": 7, "question": "Who?", "tokens": [5, 0, 0], "answers": [],
     "labels": [], "scores": []},  # other keys, empty lists
    {"question_id": 3, "image_id": 8, "vg_image_id": 99, "question": "x", "tokens": [1, 2, 3],
     "answers": ["a."], "labels": [2], "scores": [1.0]},  # a Visual Genome line
    {"question_id": 4, "image_id": 9, "question": None, "tokens": [1, 2.5], "answer_type": 5,
     "extra": {"a": [1]}, "flag": True, "labels": [2**40], "scores": [1, 0.5]},  # odd values
]  # fmt: skip


def test_entries_by_column_give_back_every_line():
    entries = Entries(json.loads(json.dumps(line)) for line in LINES)
    assert len(entries) == 4 and [entries[i] for i in range(4)] == LINES
    assert list(entries) == LINES and entries[-1] == LINES[-1] and entries[1:3] == LINES[1:3]
    assert [list(e) for e in entries] == [list(line) for line in LINES]  # the keys' order too
    assert type(entries[0]["scores"][1]) is float and entries[0]["scores"] == [1.0, 0.3]
    assert entries[3]["scores"] == [1, 0.5] and type(entries[3]["scores"][0]) is int
    assert entries[3]["labels"] == [2**40] and entries[2]["labels"] == [2]  # beyond int32
    assert entries.get(1, "answer_type") is None and entries.get(1, "answer_type", "x") == "x"
    assert entries.get(2, "answers") == ["a."] and entries.get(3, "question") is None
    with pytest.raises(IndexError):
        entries[4]
    entries.seal()  # appending after sealing still works
    entries.append(LINES[0])
    assert entries[4] == LINES[0] and entries[0] == LINES[0]


def _sealed(entries):
    entries.seal()
    return entries


def test_entries_take_a_fraction_of_the_memory_of_dicts():
    """The dataset held each question as a dict (~2.6 KB a VQA question as read from jsonl);
    by column it takes a few hundred bytes."""
    import tracemalloc

    def lines(n):
        for i in range(n):
            line = {
                "question_id": 100_000_000 + i, "image_id": 500_000 + i // 5,
                "question": f"What color is the thing number {i} here?",
                "tokens": [(i * 7 + k) % 19_000 for k in range(14)],
                "answers": [f"answer {(i + k // 4) % 300}" for k in range(10)],
                "multiple_choice_answer": f"answer {i % 300}", "answer_type": "other",
                "question_type": "what color is the", "labels": [i % 3000, 7],
                "scores": [1.0, 0.3],
            }  # fmt: skip
            yield json.loads(json.dumps(line))  # new objects, as read from a jsonl file

    def measure(build):
        tracemalloc.start()
        kept = build()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return kept, size / 3000

    dicts, per_dict = measure(lambda: list(lines(3000)))
    entries, per_entry = measure(lambda: _sealed(Entries(lines(3000))))
    assert entries[1234] == dicts[1234]
    assert per_dict > 1500 and per_entry < 400 and per_entry < per_dict / 5, (per_dict, per_entry)


def test_items_and_batches_equal_their_previous_forms(tmp_path, capsys):
    """benchmarks/cpu_changes.py --loading times the previous forms: they must make the same
    batches, so that its ratio compares like with like."""
    from ban.tasks import vqa
    from tests import benchmark_scripts
    from tests.test_engine import make_tiny_data

    changes = benchmark_scripts.load("cpu_changes")
    data = make_tiny_data(tmp_path, train_images=12)
    dataset = vqa.open_split(data, "train2014", in_memory=True)
    indices = list(range(len(dataset)))
    now = collate([dataset[i] for i in indices])
    before = changes._collate_before([changes._item_before(dataset, i) for i in indices])
    assert now.keys() == before.keys() and now["target"].abs().sum() > 0
    for key in now:
        if isinstance(now[key], torch.Tensor):
            assert now[key].dtype == before[key].dtype and torch.equal(now[key], before[key]), key
        else:
            assert now[key] == before[key], key
    changes.loading(str(data), batch=4, rounds=1, steps=2)
    assert "batches" in capsys.readouterr().out
