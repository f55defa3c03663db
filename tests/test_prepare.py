"""`prepare` end to end on a tiny raw folder written in the exact real formats."""

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ban.cli import main as cli_main
from ban.data.features import FeatureStore, Region, write_tsv
from ban.data.prepare import MissingFilesError, load_embeddings, load_prepared, prepare
from ban.data.vqa import soft_score
from ban.text import UNK, Dictionary, read_glove, tfidf_init
from tests.test_metrics import official_process_digit_article, official_process_punctuation

DIM = 8
IMAGES = {"train2014": [1, 2, 3], "val2014": [4, 5], "test2015": [6, 7]}
TEMPLATES = [  # question, answer type, question type, 10 human answers
    ("What color is the cat?", "other", "what color is the", ["black"] * 6 + ["Black."] * 4),
    ("How many dogs are there?", "number", "how many", ["2"] * 3 + ["two"] * 5 + ["3"] * 2),
    ("Is this a café?", "yes/no", "is this a", ["yes"] * 9 + ["no"]),
    ("What's the man's drink?", "other", "what is the", ["café"] * 6 + ["coffee"] * 4),
]


def _questions(split, images):
    qs = [
        {"image_id": i, "question": TEMPLATES[(i + k - 1) % 4][0], "question_id": i * 1000 + k}
        for i in images
        for k in range(3)
    ]
    return {
        "info": {"description": "This is v2.0 of the VQA dataset."},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"},
        "data_subtype": split,
        "questions": qs,
    }


def _annotations(questions):
    anns = []
    for q in questions["questions"]:
        _, answer_type, question_type, human = TEMPLATES[
            (q["question_id"] % 1000 + q["image_id"] - 1) % 4
        ]
        counts = {a: human.count(a) for a in human}
        anns.append(
            {
                "question_type": question_type,
                "multiple_choice_answer": max(counts, key=counts.get),
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, a in enumerate(human)
                ],
                "image_id": q["image_id"],
                "answer_type": answer_type,
                "question_id": q["question_id"],
            }
        )
    return {
        "info": {},
        "license": {},
        "data_subtype": questions["data_subtype"],
        "annotations": anns,
        "data_type": "mscoco",
    }


def _regions(images):
    rng = np.random.default_rng(images[0])
    out = []
    for i in images:
        n = 2 if i == 2 else 4  # image 2 has fewer boxes than the others
        x1 = rng.uniform(0, 100, n)
        boxes = np.stack([x1, x1, x1 + 50, x1 + 80], 1).astype(np.float32)
        out.append(Region(i, 320, 240, boxes, rng.standard_normal((n, DIM)).astype(np.float32)))
    return out


def make_raw(root, vg=True, glove=True, drop_image=None):
    root.mkdir(parents=True, exist_ok=True)
    for split, images in IMAGES.items():
        qs = _questions(split, images)
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
            json.dumps(qs), encoding="utf-8"
        )
        if split != "test2015":
            (root / f"v2_mscoco_{split}_annotations.json").write_text(
                json.dumps(_annotations(qs), ensure_ascii=False), encoding="utf-8"
            )
    dev = _questions("test-dev2015", [6])
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(dev))
    (root / "features").mkdir()
    regions = {r.image_id: r for s in IMAGES.values() for r in _regions(s)}
    kept = [r for i, r in regions.items() if i != drop_image]
    write_tsv(root / "features" / "karpathy_train_genome.tsv.0", kept[:3])
    write_tsv(root / "features" / "karpathy_train_genome.tsv.1", kept[3:5])
    write_tsv(root / "features" / "test2015_genome.tsv", kept[5:])
    if glove:
        (root / "glove").mkdir()
        rng = np.random.default_rng(7)
        words = ["what", "color", "is", "the", "cat", "dogs", "café", "'s", "drink", "zebra"]
        lines = [w + " " + " ".join(f"{x:.5f}" for x in rng.standard_normal(6)) for w in words]
        (root / "glove" / "glove.6B.6d.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if vg:
        (root / "vg").mkdir()
        image_data = [
            {
                "width": 800,
                "url": "u",
                "height": 600,
                "image_id": 10,
                "coco_id": 1,
                "flickr_id": None,
            },
            {
                "width": 800,
                "url": "u",
                "height": 600,
                "image_id": 11,
                "coco_id": None,
                "flickr_id": 5,
            },
            {
                "width": 800,
                "url": "u",
                "height": 600,
                "image_id": 12,
                "coco_id": 4,
                "flickr_id": None,
            },
        ]
        qa = [
            {
                "id": 10,
                "qas": [
                    {
                        "a_objects": [],
                        "question": "What color is the zebra?",
                        "image_id": 10,
                        "qa_id": 900,
                        "answer": "Black.",
                        "q_objects": [],
                    },
                    {
                        "a_objects": [],
                        "question": "Where is it?",
                        "image_id": 10,
                        "qa_id": 901,
                        "answer": "On a table.",
                        "q_objects": [],
                    },
                ],
            },
            {
                "id": 11,
                "qas": [
                    {
                        "a_objects": [],
                        "question": "Is it a café?",
                        "image_id": 11,
                        "qa_id": 902,
                        "answer": "yes",
                        "q_objects": [],
                    },
                ],
            },
            {
                "id": 12,
                "qas": [
                    {
                        "a_objects": [],
                        "question": "What drink?",
                        "image_id": 12,
                        "qa_id": 903,
                        "answer": "Café",
                        "q_objects": [],
                    },
                ],
            },
        ]
        (root / "vg" / "image_data.json").write_text(json.dumps(image_data))
        (root / "vg" / "question_answers.json").write_text(json.dumps(qa, ensure_ascii=False))
    return regions


def test_prepare_end_to_end(tmp_path):
    raw = tmp_path / "raw"
    regions = make_raw(raw)
    out = prepare(raw, tmp_path / "data", min_answer_count=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ban-prepared-v1"
    assert set(manifest["splits"]) == {
        "train2014",
        "val2014",
        "test2015",
        "test-dev2015",
        "vg_train2014",
        "vg_val2014",
    }
    assert manifest["splits"]["test-dev2015"]["features"] == "features/test2015.h5"
    assert manifest["features"]["train2014"] == {
        "file": "features/train2014.h5",
        "images": 3,
        "boxes": 10,
    }
    assert manifest["feature_dim"] == DIM

    dictionary = Dictionary.load(out / "dictionary.json")
    assert dictionary.words[:5] == ["what", "color", "is", "the", "cat"]
    assert dictionary.words[-1] == UNK
    answers = json.loads((out / "answers.json").read_text(encoding="utf-8"))
    assert answers == ["black", "2", "yes", "café"]  # normalised, first-occurrence order

    train = [json.loads(line) for line in (out / "train2014.jsonl").read_text().splitlines()]
    assert len(train) == 9
    first = train[0]
    assert (
        first["question_id"] == 1000
        and first["tokens"][:5] == dictionary.encode(first["question"])[:5]
    )
    assert len(first["tokens"]) == 14
    # raw human answers are matched as the release does: "Black." (4) is not "black" (6)
    assert dict(zip(first["labels"], first["scores"], strict=True)) == {0: soft_score(6)}
    assert len(first["answers"]) == 10 and first["answer_type"] == "other"
    cafe = next(e for e in train if e["question"].startswith("What's"))
    assert dict(zip(cafe["labels"], cafe["scores"], strict=True)) == {3: 1.0}

    # the VG questions: COCO image 1 (train) and 4 (val), answers in the vocabulary only
    vg_train = [json.loads(x) for x in (out / "vg_train2014.jsonl").read_text().splitlines()]
    assert [(e["question_id"], e["image_id"], e["labels"], e["scores"]) for e in vg_train] == [
        (900, 1, [0], [1.0])
    ]
    assert vg_train[0]["tokens"][4] == dictionary.word2idx[UNK]  # "zebra" is not a VQA word
    vg_val = [json.loads(x) for x in (out / "vg_val2014.jsonl").read_text().splitlines()]
    assert [(e["question_id"], e["image_id"]) for e in vg_val] == [(903, 4)]

    # embeddings
    glove, tfidf = load_embeddings(out)
    expected, _ = read_glove(raw / "glove" / "glove.6B.6d.txt", dictionary.words)
    np.testing.assert_array_equal(glove, expected)
    assert glove.shape == tfidf.shape == (len(dictionary), 6)
    texts = [
        q["question"]
        for s in ("train2014", "val2014", "test2015")
        for q in json.loads((raw / f"v2_OpenEnded_mscoco_{s}_questions.json").read_text())[
            "questions"
        ]
    ]
    texts += ["What color is the zebra?", "Where is it?", "Is it a café?", "What drink?"]
    np.testing.assert_allclose(
        tfidf, tfidf_init(texts, dictionary, raw / "glove" / "glove.6B.6d.txt"), rtol=1e-6
    )

    # TSV -> HDF5 -> dataset -> batch, numbers compared
    dataset = load_prepared(out, "train2014+vg_train2014")
    assert len(dataset) == 10 and dataset.num_answers == 4
    loader = DataLoader(dataset, batch_size=4, collate_fn=dataset_collate(), num_workers=2)
    seen = 0
    for batch in loader:
        assert batch["target"].shape == (len(batch["question_id"]), 4)
        for row, image_id in enumerate(batch["image_id"]):
            r = regions[image_id]
            n = len(r.boxes)
            torch.testing.assert_close(batch["features"][row, :n], torch.from_numpy(r.features))
            assert batch["box_mask"][row].sum() == n
            assert batch["features"][row, n:].abs().sum() == 0
            torch.testing.assert_close(
                batch["spatials"][row, :n, :2],
                torch.from_numpy(r.boxes[:, :2] / [320, 240]).float(),
            )
        seen += len(batch["image_id"])
    assert seen == 10
    first_item = dataset[0]
    assert first_item["target"][0] == pytest.approx(soft_score(6))
    assert first_item["question"].dtype == torch.int64
    assert dataset.annotations()[1000]["answer_type"] == "other"

    test = load_prepared(out, "test-dev2015")
    assert len(test) == 3 and "target" not in test[0]
    assert len(FeatureStore(out / "features" / "test2015.h5")) == 2


def dataset_collate():
    from ban.data.vqa import collate

    return collate


def test_missing_files_are_listed_at_once(tmp_path):
    with pytest.raises(MissingFilesError) as error:
        prepare(tmp_path, tmp_path / "out", progress=False)
    message = str(error.value)
    assert "5 raw file(s) missing" in message
    for name in [
        "v2_OpenEnded_mscoco_train2014_questions.json",
        "v2_mscoco_train2014_annotations.json",
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_mscoco_val2014_annotations.json",
        "features/*.tsv",
    ]:
        assert name in message
    assert "visualqa.org" in message and "bottom-up-attention" in message
    assert not (tmp_path / "out").exists()


def test_missing_files_partial(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw)
    (raw / "v2_mscoco_val2014_annotations.json").unlink()
    (raw / "vg" / "image_data.json").unlink()
    with pytest.raises(MissingFilesError) as error:
        prepare(raw, tmp_path / "out", progress=False)
    assert [p.split("/")[-1] for p, _ in error.value.missing] == [
        "v2_mscoco_val2014_annotations.json",
        "image_data.json",
    ]


def test_question_without_features_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw, vg=False, glove=False, drop_image=5)
    with pytest.raises(
        ValueError,
        match=r"val2014_questions.json: 3 question\(s\) on 1 image"
        r"\(s\) with no features .*question_id 5000, image_id 5",
    ):
        prepare(raw, tmp_path / "out", min_answer_count=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.warns(UserWarning, match="dropped"):
        out = prepare(
            raw, tmp_path / "out", min_answer_count=2, allow_missing_features=True, progress=False
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val2014"]["dropped_no_features"] == 3
    assert manifest["embeddings"] is None and load_embeddings(out) is None


def test_empty_question_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw, vg=False, glove=False)
    path = raw / "v2_OpenEnded_mscoco_train2014_questions.json"
    data = json.loads(path.read_text())
    data["questions"][4]["question"] = ""
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError,
        match=r"train2014_questions.json: record 4 \(question_id "
        r"2001\): field 'question' is empty",
    ):
        prepare(raw, tmp_path / "out", min_answer_count=2, progress=False)


def test_cli_prepare_and_convert(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw(raw, vg=False, glove=False)
    assert (
        cli_main(
            [
                "data",
                "prepare",
                str(raw),
                "--out",
                str(tmp_path / "d"),
                "--min-answer-count",
                "2",
                "--fp16",
                "--release-unk",
                "--no-tfidf",
                "--captions",
            ]
        )
        == 0
    )
    assert Dictionary.load(tmp_path / "d" / "dictionary.json").release_unk
    options = json.loads((tmp_path / "d" / "manifest.json").read_text())["options"]
    assert options["tfidf"] is False
    tsv = raw / "features" / "test2015_genome.tsv"
    assert cli_main(["data", "convert-features", str(tsv), "--out", str(tmp_path / "t.h5")]) == 0
    assert "2 images" in capsys.readouterr().out
    assert cli_main(["data", "prepare", str(tmp_path / "empty"), "--out", "x"]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The release's dictionary, answer list and tf-idf texts (docs/release_differences.md)


def _rewrite_question(raw, split, index, text):
    path = raw / f"v2_OpenEnded_mscoco_{split}_questions.json"
    data = json.loads(path.read_text())
    data["questions"][index]["question"] = text
    path.write_text(json.dumps(data))


def test_dictionary_and_answers_come_from_every_split_present(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw, vg=False, glove=False)
    _rewrite_question(raw, "val2014", 0, "Where is the giraffe?")
    _rewrite_question(raw, "test2015", 1, "Why is the sky blue?")
    _rewrite_question(raw, "test-dev2015", 2, "Is it raining?")
    # Over train alone no answer is given for 4 questions; over train+val three are.
    full = prepare(raw, tmp_path / "full", min_answer_count=4, progress=False)
    train_only = prepare(
        raw, tmp_path / "train", splits=["train2014"], min_answer_count=4, progress=False
    )
    words = Dictionary.load(train_only / "dictionary.json").words
    assert words == Dictionary.load(full / "dictionary.json").words
    assert {"giraffe", "sky", "raining"} <= set(words)
    assert words.index("giraffe") < words.index("sky") < words.index("raining")  # release order
    answers = json.loads((train_only / "answers.json").read_text(encoding="utf-8"))
    assert answers == json.loads((full / "answers.json").read_text(encoding="utf-8"))
    assert answers == ["black", "2", "yes"]
    manifest = json.loads((train_only / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train2014"]
    assert manifest["options"]["dictionary_splits"] == [
        "train2014",
        "val2014",
        "test2015",
        "test-dev2015",
    ]
    assert manifest["options"]["answer_splits"] == ["train2014", "val2014"]
    assert "val2014 annotations" in manifest["sources"]
    # an explicit answer split still narrows the vocabulary
    with pytest.raises(ValueError, match="no answer is given for >= 4 questions in train2014"):
        prepare(
            raw,
            tmp_path / "x",
            splits=["train2014"],
            answer_splits=["train2014"],
            min_answer_count=4,
            progress=False,
        )


def _write_captions(path, captions, first_id=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "info": {"description": "COCO 2017 Dataset", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1}],
        "images": [
            {"license": 1, "file_name": "000000000001.jpg", "height": 480, "width": 640, "id": 1}
        ],
        "annotations": [
            {"image_id": 1, "id": first_id + k, "caption": c} for k, c in enumerate(captions)
        ],
    }
    path.write_text(json.dumps(data))


def test_coco_captions_join_the_tfidf_texts(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw)
    plain = prepare(raw, tmp_path / "plain", min_answer_count=2, progress=False)
    train_caps = ["A cat is drinking from a cup.", "Two dogs and a zebra on the grass"]
    val_caps = ["The man's drink is a café au lait."]
    _write_captions(raw / "annotations" / "captions_train2017.json", train_caps)
    _write_captions(raw / "annotations" / "captions_val2017.json", val_caps, first_id=10)
    out = prepare(raw, tmp_path / "data", min_answer_count=2, progress=False)
    dictionary = Dictionary.load(out / "dictionary.json")
    assert dictionary == Dictionary.load(plain / "dictionary.json")  # captions add no words
    texts = [
        q["question"]
        for s in ("train2014", "val2014", "test2015")
        for q in json.loads((raw / f"v2_OpenEnded_mscoco_{s}_questions.json").read_text())[
            "questions"
        ]
    ]
    texts += ["What color is the zebra?", "Where is it?", "Is it a café?", "What drink?"]
    glove_path = raw / "glove" / "glove.6B.6d.txt"
    _, tfidf = load_embeddings(out)
    expected = tfidf_init(texts + train_caps + val_caps, dictionary, glove_path)
    np.testing.assert_allclose(tfidf, expected, rtol=1e-6)
    assert not np.allclose(tfidf, load_embeddings(plain)[1])
    info = json.loads((out / "manifest.json").read_text())["embeddings"]["tfidf"]
    assert list(info["captions"].values()) == [2, 1]
    assert info["texts"] == len(texts) + 3 and info["vg"] is True
    # captions=[] leaves them out; a caption file given by path is read as well
    none = prepare(raw, tmp_path / "none", min_answer_count=2, captions=[], progress=False)
    np.testing.assert_array_equal(load_embeddings(none)[1], load_embeddings(plain)[1])
    only_val = prepare(
        raw,
        tmp_path / "val",
        min_answer_count=2,
        captions=[raw / "annotations" / "captions_val2017.json"],
        progress=False,
    )
    np.testing.assert_allclose(
        load_embeddings(only_val)[1],
        tfidf_init(texts + val_caps, dictionary, glove_path),
        rtol=1e-6,
    )


def test_bad_caption_file_is_named(tmp_path):
    raw = tmp_path / "raw"
    make_raw(raw, vg=False)
    path = raw / "annotations" / "captions_train2014.json"
    _write_captions(path, ["fine", "also fine"])
    data = json.loads(path.read_text())
    del data["annotations"][1]["caption"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"captions_train2014.json: annotations\[1\] has no"):
        prepare(raw, tmp_path / "out", min_answer_count=2, progress=False)
    assert not (tmp_path / "out").exists()  # checked before the feature conversion
    with pytest.raises(MissingFilesError, match="captions_val2017.json"):
        prepare(raw, tmp_path / "out", captions=[raw / "captions_val2017.json"], progress=False)


def test_without_tfidf_the_c_embedding_is_frozen_glove(tmp_path):
    import ban
    from ban.model import BANConfig

    raw = tmp_path / "raw"
    make_raw(raw, vg=False)
    out = prepare(raw, tmp_path / "data", min_answer_count=2, tfidf=False, progress=False)
    glove, tfidf = load_embeddings(out)
    assert tfidf is None and not (out / "tfidf.npy").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embeddings"]["tfidf"] is None and manifest["options"]["tfidf"] is False
    # what the VQA task's build_model does with a prepared directory's embeddings
    config = BANConfig(vocab_size=glove.shape[0], embedding_dim=glove.shape[1], hidden=16,
                       glimpses=2, num_answers=4, visual_dim=DIM)  # fmt: skip
    model = ban.build(config)
    model.init_embeddings(glove=glove, tfidf=tfidf if config.tfidf_embedding else None)
    np.testing.assert_array_equal(model.embedding.tfidf.weight[:-1].detach().numpy(), glove)
    assert not model.embedding.tfidf.weight.requires_grad


# ----------------------------------------------------------------------------------------------
# The answer order equals the release's trainval_label2ans.pkl built from the same files


def release_label2ans(annotation_files, min_occurence=9):
    """tools/compute_softscore.py, restated: `filter_answers` over train + val annotations (a
    dict of preprocessed multiple-choice answer -> question ids, rare ones popped), then
    `create_ans2label`'s label order (the dict's iteration order; insertion order since Python
    3.7 -- the released pickle itself came from Python 3.5's hash order)."""

    def preprocess_answer(answer):  # the release copies the official evaluator's processing
        return official_process_digit_article(official_process_punctuation(answer)).replace(",", "")

    answers_dset = []
    for path in annotation_files:
        answers_dset += json.loads(path.read_text(encoding="utf-8"))["annotations"]
    occurence = {}
    for ans_entry in answers_dset:
        gtruth = preprocess_answer(ans_entry["multiple_choice_answer"])
        occurence.setdefault(gtruth, set()).add(ans_entry["question_id"])
    for answer in list(occurence):
        if len(occurence[answer]) < min_occurence:
            occurence.pop(answer)
    label2ans = []
    for answer in occurence:
        label2ans.append(answer)
    return label2ans


MC_ANSWERS = ["yes", "Yes", "yes.", "no", "No!", "2", "two", "Two", "3", "three", "a dog",
              "dog", "the dog", "Dog.", "white", "black and white", "3,000", "3000", "don't know",
              "dont know", "t-shirt", "t shirt", "(left)", "left", "red", "blue",
              "café"]  # fmt: skip


def test_answer_order_equals_the_releases_label2ans(tmp_path):
    from ban.official import read_plain_pickle

    rng = np.random.default_rng(3)
    raw = tmp_path / "raw"
    (raw / "features").mkdir(parents=True)
    regions = []
    for split, first_image, count in (("train2014", 1, 120), ("val2014", 500, 80)):
        qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
              "data_subtype": split, "questions": []}  # fmt: skip
        anns = {"info": {}, "license": {}, "data_subtype": split, "annotations": [],
                "data_type": "mscoco"}  # fmt: skip
        for k in range(count):
            image_id, qid = first_image + k // 3, (first_image + k // 3) * 1000 + k % 3
            # skewed so that some answers pass the threshold of 9 and some do not
            mc = MC_ANSWERS[min(int(rng.exponential(7)), len(MC_ANSWERS) - 1)]
            qs["questions"].append({"image_id": image_id, "question": "What is it?",
                                    "question_id": qid})  # fmt: skip
            anns["annotations"].append(
                {
                    "question_type": "what is",
                    "multiple_choice_answer": mc,
                    "answers": [
                        {"answer": mc, "answer_confidence": "yes", "answer_id": j + 1}
                        for j in range(10)
                    ],
                    "image_id": image_id,
                    "answer_type": "other",
                    "question_id": qid,
                }
            )
        (raw / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(qs))
        (raw / f"v2_mscoco_{split}_annotations.json").write_text(
            json.dumps(anns, ensure_ascii=False), encoding="utf-8"
        )
        images = sorted({q["image_id"] for q in qs["questions"]})
        regions += _regions(images)
    write_tsv(raw / "features" / "trainval.tsv", regions)

    assert cli_main(["data", "prepare", str(raw), "--out", str(tmp_path / "d")]) == 0
    ours = json.loads((tmp_path / "d" / "answers.json").read_text(encoding="utf-8"))

    label2ans = release_label2ans(
        [raw / "v2_mscoco_train2014_annotations.json", raw / "v2_mscoco_val2014_annotations.json"]
    )
    with open(tmp_path / "trainval_label2ans.pkl", "wb") as f:  # as create_ans2label dumps it
        pickle.dump(label2ans, f)
    assert ours == list(read_plain_pickle(tmp_path / "trainval_label2ans.pkl"))
    assert 4 <= len(ours) < len(set(MC_ANSWERS))  # the threshold kept some and dropped some
