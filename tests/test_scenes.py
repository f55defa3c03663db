"""The built-in scene benchmark: determinism, the real file formats, and that every answer and
every grounding box agrees with the scene (checked by re-reading the text, not by reusing the
generator's code)."""

from __future__ import annotations

import base64
import csv
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from ban import metrics
from ban.data import scenes
from ban.data.scene_world import ATTRIBUTES, VALUES

SMALL = {"train_images": 60, "val_images": 30, "test_images": 10, "feature_dim": 16}
VALUE_OF = {v: a for a in ATTRIBUTES for v in VALUES[a]}
PLURAL = {"squares": "square", "circles": "circle", "triangles": "triangle", "diamonds": "diamond"}
NUMBERS = {w: i for i, w in enumerate(scenes.NUMBER_WORDS)}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return scenes.generate(tmp_path_factory.mktemp("scenes") / "raw", seed=5, workers=1, **SMALL)


@pytest.fixture(scope="module")
def truth(raw) -> dict:
    """image_id -> scene (objects with attributes and boxes) from scenes.json."""
    data = json.loads((raw / "scenes.json").read_text())
    return {s["image_id"]: s for split in data["splits"].values() for s in split["images"]}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def parse_phrase(words: list[str]) -> dict[str, str]:
    """'large red metal circles' -> {'size': 'large', 'color': 'red', ...}."""
    description = {}
    for word in words:
        word = PLURAL.get(word, word)
        if word in ("object", "objects"):
            continue
        assert word in VALUE_OF, f"unknown word {word!r} in {words}"
        description[VALUE_OF[word]] = word
    return description


def matching(scene: dict, description: dict[str, str]) -> list[dict]:
    return [o for o in scene["objects"] if all(o[a] == v for a, v in description.items())]


def the(scene: dict, text: str) -> dict:
    """The one object a singular description names."""
    found = matching(scene, parse_phrase(text.split()))
    assert len(found) == 1, f"{text!r} names {len(found)} objects"
    return found[0]


def named_objects(scene: dict, words: str, before: list[str]) -> list[dict]:
    """The objects a caption's phrase names, worked out from its words and the phrases before it
    in the caption: "one red" (after "Two circles , ...") is the member of the caption's first
    phrase that is red; "another circle" is the circle that the phrase just before is not."""
    tokens = words.lower().split()
    if tokens[0] == "one":
        value = PLURAL.get(tokens[1], tokens[1])
        named = [o for o in named_objects(scene, before[0], []) if o[VALUE_OF[value]] == value]
    elif tokens[0] == "another":
        previous = named_objects(scene, before[-1], before[:-1])
        named = [o for o in matching(scene, parse_phrase(tokens[1:])) if o not in previous]
    else:
        number = NUMBERS.get(tokens[1] if tokens[0] == "the" else tokens[0])
        tokens = [t for t in tokens if t not in ("a", "the") and t not in NUMBERS]
        named = matching(scene, parse_phrase(tokens))
        assert len(named) == (number or 1), words
        return named
    assert len(named) == 1, (words, before)
    return named


def center(obj: dict) -> tuple[float, float]:
    x1, y1, x2, y2 = obj["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def true_answer(scene: dict, question: str) -> str:
    """The answer to a question, worked out from the scene alone."""
    yes_no = {True: "yes", False: "no"}
    if m := re.fullmatch(r"How many (.+) are (there|in the picture)\?", question):
        return str(len(matching(scene, parse_phrase(m[1].split()))))
    if m := re.fullmatch(r"(Is there a|Are there any) (.+)\?", question):
        return yes_no[bool(matching(scene, parse_phrase(m[2].split())))]
    if m := re.fullmatch(r"What (\w+) is the (.+)\?", question):
        return the(scene, m[2])[m[1]]
    if m := re.fullmatch(r"Is the (.+) the same (\w+) as the (.+)\?", question):
        return yes_no[the(scene, m[1])[m[2]] == the(scene, m[3])[m[2]]]
    if m := re.fullmatch(r"Is the (.+) (left of|right of|above|below) the (.+)\?", question):
        (xa, ya), (xb, yb) = center(the(scene, m[1])), center(the(scene, m[3]))
        return yes_no[
            {"left of": xa < xb, "right of": xa > xb, "above": ya < yb}.get(m[2], ya > yb)
        ]
    if m := re.fullmatch(r"Are there more (.+) than (.+)\?", question):
        counts = [len(matching(scene, parse_phrase(p.split()))) for p in (m[1], m[2])]
        return yes_no[counts[0] > counts[1]]
    raise AssertionError(f"unknown question form: {question!r}")


def read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, newline="") as f:
        for image_id, w, h, n, boxes, features in csv.reader(f, delimiter="\t"):
            n = int(n)
            rows.append(
                {
                    "image_id": int(image_id),
                    "w": int(w),
                    "h": int(h),
                    "boxes": np.frombuffer(base64.b64decode(boxes), "<f4").reshape(n, 4),
                    "features": np.frombuffer(base64.b64decode(features), "<f4").reshape(n, -1),
                }
            )
    return rows


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(scenes, "CHUNK", 7)  # several chunks per split
    args = dict(train_images=20, val_images=9, test_images=3, feature_dim=8, seed=1)
    one = files(scenes.generate(tmp_path / "a", workers=1, **args))
    two = files(scenes.generate(tmp_path / "b", workers=2, **args))
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []
    assert not any(".part" in name for name in one)
    other = files(scenes.generate(tmp_path / "c", workers=1, **{**args, "seed": 2}))
    assert (
        other["v2_mscoco_train2014_annotations.json"] != one["v2_mscoco_train2014_annotations.json"]
    )


def test_vqa_json_has_the_official_layout(raw):
    splits = ("train2014", "val2014", "test2015", "test-dev2015")
    questions = {}
    for split in splits:
        data = json.loads((raw / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        assert set(data) == {
            "info",
            "task_type",
            "data_type",
            "data_subtype",
            "license",
            "questions",
        }
        assert data["data_subtype"] == split and data["task_type"] == "Open-Ended"
        for q in data["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert isinstance(q["image_id"], int) and isinstance(q["question_id"], int)
        questions[split] = {q["question_id"]: q for q in data["questions"]}
    assert set(questions["test-dev2015"]) < set(questions["test2015"])
    all_ids = [i for s in splits[:3] for i in questions[s]]
    assert len(all_ids) == len(set(all_ids))
    for split in splits[:2]:
        data = json.loads((raw / f"v2_mscoco_{split}_annotations.json").read_text())
        assert {"info", "license", "data_subtype", "annotations", "data_type"} <= set(data)
        annotations = data["annotations"]
        assert {a["question_id"] for a in annotations} == set(questions[split])
        disagreements = 0
        for a in annotations:
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert isinstance(a["question_type"], str) and a["question_type"]
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            votes = Counter(x["answer"] for x in a["answers"])
            assert votes.most_common(1)[0] == (a["multiple_choice_answer"], max(votes.values()))
            assert votes[a["multiple_choice_answer"]] >= 7
            disagreements += len(votes) > 1
        # A little annotator noise: 45 % of the questions in expectation (0.6: about three
        # standard deviations above it for the 120 questions of the smallest split here).
        assert 0.2 * len(annotations) < disagreements < 0.6 * len(annotations)


def test_every_answer_agrees_with_the_scene(raw, truth):
    for split in ("train2014", "val2014"):
        qs = json.loads((raw / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        anns = json.loads((raw / f"v2_mscoco_{split}_annotations.json").read_text())
        answers = {a["question_id"]: a for a in anns["annotations"]}
        for q in qs["questions"]:
            a = answers[q["question_id"]]
            assert true_answer(truth[q["image_id"]], q["question"]) == a["multiple_choice_answer"]
            if q["question"].startswith("How many"):
                assert a["answer_type"] == "number" and 0 <= int(a["multiple_choice_answer"]) <= 10


def test_answers_are_balanced_within_each_family(tmp_path):
    raw = scenes.generate(
        tmp_path / "raw",
        250,
        0,
        0,
        feature_dim=8,
        images=False,
        workers=1,
        families=scenes.FAMILIES,
    )
    families = json.loads((raw / "scenes.json").read_text())["splits"]["train2014"]["families"]
    anns = json.loads((raw / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    by_family = defaultdict(Counter)
    for a in anns:
        by_family[families[str(a["question_id"])]][a["multiple_choice_answer"]] += 1
    assert set(by_family) == set(scenes.FAMILIES)
    for family in ("existence", "spatial", "comparison"):
        counts = by_family[family]
        assert set(counts) == {"yes", "no"}
        assert abs(counts["yes"] - counts["no"]) <= 0.06 * sum(counts.values()), (family, counts)
    counting = by_family["counting"]
    assert set(counting) == {str(c) for c in range(11)}
    assert max(counting.values()) - min(counting.values()) <= 12, counting
    attribute = by_family["attribute"]
    for name in ATTRIBUTES:  # within one attribute, its values come about equally often
        seen = [attribute[v] for v in VALUES[name]]
        assert max(seen) - min(seen) <= max(4, 0.35 * max(seen)), (name, seen)


def test_features_are_bottom_up_tsv(raw, truth):
    ids = set()
    for path in sorted((raw / "features").glob("*.tsv")):
        assert path.read_bytes().endswith(b"\r\n")
        for row in read_tsv(path):
            scene = truth[row["image_id"]]
            assert (row["w"], row["h"]) == (scene["width"], scene["height"])
            boxes, features = row["boxes"], row["features"]
            assert boxes.shape == (36, 4) and features.shape == (36, 16)
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= row["w"]).all()
            assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= row["h"]).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert (features > 0).all()  # no all-zero (padding-like) rows
            # Every object is found: some proposal overlaps it with IoU >= 0.5.
            for obj in scene["objects"]:
                assert _best_iou(boxes, obj["box"]) >= 0.5
            ids.add(row["image_id"])
    assert ids == set(truth)
    assert not list((raw / "features").glob(".*"))


def _best_iou(boxes: np.ndarray, box) -> float:
    x1, y1, x2, y2 = box
    iw = np.clip(np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1), 0, None)
    inter = iw * ih
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return float((inter / (areas + (x2 - x1) * (y2 - y1) - inter)).max())


def test_adaptive_boxes_and_feature_size(tmp_path):
    raw = scenes.generate(
        tmp_path / "raw", 30, 0, 0, feature_dim=24, adaptive=True, images=False, workers=1
    )
    rows = read_tsv(raw / "features" / "scenes_train2014.tsv")
    counts = [len(r["boxes"]) for r in rows]
    assert all(10 <= c <= 100 for c in counts) and len(set(counts)) > 3
    assert all(r["features"].shape[1] == 24 for r in rows)
    assert not (raw / "images").exists()


MARKUP = re.compile(r"\[/EN#(\d+)/([\w/]+) ([^\]]+)\]")


def test_flickr30k_entities_markup_and_boxes(raw, truth):
    flickr = raw / "flickr30k"
    listed = {}
    for name in ("train", "val", "test"):
        for line in (flickr / f"{name}.txt").read_text().split():
            listed[int(line)] = name
    assert set(listed) == set(truth)
    types = Counter()
    for image_id, scene in truth.items():
        lines = (flickr / "Sentences" / f"{image_id}.txt").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 5
        root = ET.parse(flickr / "Annotations" / f"{image_id}.xml").getroot()
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert (w, h) == (scene["width"], scene["height"])
        boxes, flagged = defaultdict(list), set()
        for obj in root.findall("object"):
            names = [int(n.text) for n in obj.findall("name")]
            assert names
            box = obj.find("bndbox")
            if box is None:
                assert obj.findtext("scene") == "1" and obj.findtext("nobndbox") == "0"
                flagged.update(names)
                continue
            xmin, ymin, xmax, ymax = (
                int(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h  # 1-based, inside the image
            for name in names:
                boxes[name].append((xmin - 1, ymin - 1, xmax, ymax))
        for line in lines:
            assert line.count("[") == line.count("]") == len(MARKUP.findall(line))
            plain = MARKUP.sub(lambda m: m[3], line)
            assert "[" not in plain and plain.endswith(" .")
            found = MARKUP.findall(line)
            for k, (chain, kinds, words) in enumerate(found):
                chain = int(chain)
                types[kinds] += 1
                if kinds == "notvisual":
                    assert chain == 0
                elif kinds == "scene":
                    assert chain in flagged
                else:
                    # The phrase names exactly the objects whose boxes its chain has.
                    assert chain in boxes, (image_id, chain)
                    named = named_objects(scene, words, [w for _, _, w in found[:k]])
                    assert sorted(boxes[chain]) == sorted(tuple(o["box"]) for o in named)
    assert {"other", "scene", "notvisual"} <= set(types)


def test_images_match_the_scenes(raw, truth):
    from PIL import Image

    for image_id, scene in list(truth.items())[:20]:
        with Image.open(raw / "images" / f"{image_id}.png") as image:
            assert image.format == "PNG" and image.size == (scene["width"], scene["height"])
        assert 3 <= len(scene["objects"]) <= 12


def test_the_real_readers_load_every_file(raw, tmp_path):
    prepare = pytest.importorskip("ban.data.prepare").prepare
    out = prepare(raw, tmp_path / "prepared", min_answer_count=1, progress=False)
    answers = json.loads((Path(out) / "answers.json").read_text())
    assert {"yes", "no", "0", "red", "circle"} <= set(answers)
    for split in ("train2014", "val2014", "test2015", "test-dev2015"):
        assert (Path(out) / f"{split}.jsonl").stat().st_size > 0


def test_captions_for_the_first_training_images_only_change_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(scenes, "CHUNK", 7)  # the limit falls inside a chunk
    args = dict(train_images=20, val_images=4, test_images=2, feature_dim=8, seed=1, workers=1)
    every = files(scenes.generate(tmp_path / "all", **args))
    out = scenes.generate(tmp_path / "some", captioned_train_images=9, **args)
    some = files(out)
    flickr = [k for k in every if k.startswith("flickr30k/")]
    train_ids = (out / "flickr30k" / "train.txt").read_text().split()
    assert train_ids == [str(1_000_001 + i) for i in range(9)]  # the first nine, in order
    assert sorted(k for k in flickr if k not in some) == [
        f"flickr30k/{kind}/{1_000_001 + i}.{ext}"
        for kind, ext in (("Annotations", "xml"), ("Sentences", "txt"))
        for i in range(9, 20)
    ]
    # the captions are drawn last for each scene: every other byte is the same
    differ = sorted(k for k in some if some[k] != every[k])
    assert differ == ["flickr30k/train.txt", "scenes.json"]
    options = scenes.read_json(out / "scenes.json")["options"]
    assert options["captioned_train_images"] == 9
    assert (
        scenes.read_json(tmp_path / "all" / "scenes.json")["options"]["captioned_train_images"]
        == 20
    )
    with pytest.raises(ValueError, match="captioned_train_images"):
        scenes.generate(tmp_path / "bad", captioned_train_images=-1, **args)


def test_default_benchmark_is_built_once_atomically(tmp_path, monkeypatch, capsys):
    calls, generate = [], scenes.generate

    def tiny(out_dir, **options):
        calls.append(out_dir)
        return generate(out_dir, 4, 2, 1, feature_dim=4, workers=1, **options)

    monkeypatch.setattr(scenes, "generate", tiny)
    monkeypatch.setattr(scenes, "_check_default", lambda raw: None)  # tiny is not the default
    monkeypatch.setenv("BAN_CACHE", str(tmp_path / "cache"))
    first = scenes.default_benchmark(progress=True)  # as `ban train` makes it on first use
    assert first == tmp_path / "cache" / scenes.VERSION / "raw"
    said = capsys.readouterr()  # was: a minute of silence before the first line
    assert f"generating the built-in benchmark ({scenes.VERSION}) once into {first}" in said.out
    assert "scenes: 100%" in said.err
    assert (first / "v2_mscoco_train2014_annotations.json").is_file()
    # pictures of the val and test images only: training reads the features alone
    assert sorted(int(p.stem) for p in (first / "images").glob("*.png")) == [
        2_000_001,
        2_000_002,
        3_000_001,
    ]
    assert scenes.read_json(first / "scenes.json")["options"]["pictures"] == "val+test"
    assert scenes.default_benchmark(progress=True) == first and len(calls) == 1
    assert capsys.readouterr().out == ""  # cached: nothing to say
    assert [p.name for p in first.parent.iterdir()] == ["raw"]  # no temporary left behind
    assert (
        scenes.default_benchmark(tmp_path / "other") == tmp_path / "other" / scenes.VERSION / "raw"
    )

    def broken(out_dir, **options):
        raise RuntimeError("disk full")

    monkeypatch.setattr(scenes, "generate", broken)
    with pytest.raises(RuntimeError):
        scenes.default_benchmark(tmp_path / "third")
    assert list((tmp_path / "third" / scenes.VERSION).iterdir()) == []


def test_a_cached_benchmark_that_is_not_the_default_is_refused(tmp_path):
    raw = tmp_path / scenes.VERSION / "raw"
    raw.mkdir(parents=True)
    splits = {"train2014": 5000, "val2014": 1000, "test2015": 250}  # an earlier size
    summary = {
        "version": scenes.VERSION,
        "options": {
            "seed": 0,
            "feature_dim": scenes.DEFAULT_FEATURE_DIM,
            "boxes": 36,
            "captions_per_image": 5,
            "captioned_train_images": scenes.FLICKR_TRAIN_IMAGES,
            "families": list(scenes.DEFAULT_FAMILIES),
            "pictures": "val+test",
        },
        "splits": {name: {"images": [{}] * n} for name, n in splits.items()},
    }
    (raw / "scenes.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"not the default one.*'train2014': 5000.*delete"):
        scenes.default_benchmark(tmp_path)
    sizes = (scenes.DEFAULT_TRAIN_IMAGES, scenes.DEFAULT_VAL_IMAGES, scenes.DEFAULT_TEST_IMAGES)
    for name, n in zip(splits, sizes, strict=True):
        summary["splits"][name]["images"] = [{}] * n
    (raw / "scenes.json").write_text(json.dumps(summary))
    assert scenes.default_benchmark(tmp_path) == raw
    # The previous default mix (with spatial questions) and the previous version are refused.
    summary["options"]["families"] = list(scenes.FAMILIES)
    (raw / "scenes.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"not the default one.*'spatial'"):
        scenes.default_benchmark(tmp_path)
    summary["options"]["families"] = list(scenes.DEFAULT_FAMILIES)
    summary["version"] = "scenes-v1"
    (raw / "scenes.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"version 'scenes-v1'"):
        scenes.default_benchmark(tmp_path)


def test_default_prepared_runs_prepare_once(tmp_path, monkeypatch):
    pytest.importorskip("ban.data.prepare")
    generate = scenes.generate

    def tiny(out_dir, **options):
        return generate(out_dir, 12, 4, 2, feature_dim=4, images=False, workers=1)

    monkeypatch.setattr(scenes, "generate", tiny)
    monkeypatch.setattr(scenes, "_check_default", lambda raw: None)  # tiny is not the default
    prepared = scenes.default_prepared(tmp_path)
    assert prepared == tmp_path / scenes.VERSION / "prepared"
    assert (prepared / "manifest.json").is_file() and (prepared / "train2014.jsonl").is_file()
    stamp = (prepared / "manifest.json").stat().st_mtime_ns
    assert scenes.default_prepared(tmp_path) == prepared
    assert (prepared / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["prepared", "raw"]


def test_cli_synth(tmp_path, capsys):
    from ban.cli import main

    out = tmp_path / "raw"
    args = ["data", "synth", "--out", str(out), "--train-images", "5", "--val-images", "3"]
    args += ["--test-images", "0", "--feature-dim", "8", "--boxes", "adaptive", "--no-images"]
    assert main([*args, "--captioned-train-images", "2"]) == 0
    rows = read_tsv(out / "features" / "scenes_train2014.tsv")
    assert len(rows) == 5 and rows[0]["features"].shape[1] == 8
    assert (out / "flickr30k" / "train.txt").read_text().split() == ["1000001", "1000002"]
    assert main(["data", "synth", "--out", str(out), "--boxes", "many"]) == 2


def test_the_default_mix_has_no_spatial_questions_and_families_choose_them(raw, tmp_path):
    data = json.loads((raw / "scenes.json").read_text())
    assert data["options"]["families"] == list(scenes.DEFAULT_FAMILIES)
    asked = Counter(data["splits"]["train2014"]["families"].values())
    assert set(asked) == set(scenes.DEFAULT_FAMILIES) and "spatial" not in asked
    questions = json.loads((raw / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    relations = (" left of ", " right of ", " above ", " below ")
    assert not [q for q in questions["questions"] if any(r in q["question"] for r in relations)]

    two = scenes.generate(
        tmp_path / "two", 20, 0, 0, feature_dim=4, images=False, workers=1,
        families=["spatial", "counting", "spatial"],
    )  # fmt: skip
    data = json.loads((two / "scenes.json").read_text())
    assert data["options"]["families"] == ["counting", "spatial"]  # FAMILIES order, no repeats
    asked = Counter(data["splits"]["train2014"]["families"].values())
    assert asked["counting"] == 20 and asked["spatial"] >= 15 and sum(asked.values()) < 41
    for bad in ([], ["colour"]):
        with pytest.raises(ValueError, match="families must be a non-empty subset"):
            scenes.generate(tmp_path / "bad", 2, 0, 0, feature_dim=4, images=False, families=bad)


def test_reference_scores_and_family_report(tmp_path):
    from ban.data.prepare import prepare
    from ban.metrics import vqa_accuracy

    raw = scenes.generate(tmp_path / "raw", 40, 20, 0, feature_dim=8, images=False, workers=1)
    data = prepare(raw, tmp_path / "prepared", min_answer_count=1, progress=False)
    families = json.loads((raw / "scenes.json").read_text())["splits"]["val2014"]["families"]
    train = json.loads((raw / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    val = json.loads((raw / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    seen = defaultdict(set)
    for a in train:
        seen[a["question_type"]].add(a["multiple_choice_answer"])
    counting = [a for a in val if families[str(a["question_id"])] == "counting"]
    expected = [
        sum(vqa_accuracy(c, [h["answer"] for h in a["answers"]]) for c in seen[a["question_type"]])
        / len(seen[a["question_type"]])
        for a in counting
    ]
    reference = metrics.reference_scores(raw)
    assert reference["chance"]["counting"] == pytest.approx(100 * sum(expected) / len(expected))
    assert set(reference["chance"]) == {
        "overall",
        "yes/no",
        "number",
        "other",
        *scenes.DEFAULT_FAMILIES,
    }

    # Predictions that are right on every counting question and wrong everywhere else.
    rows = [
        {"question_id": a["question_id"], "accuracy": 1.0 if a in counting else 0.0} for a in val
    ]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = metrics.family_report(data, predictions)
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(by_name) == [*scenes.DEFAULT_FAMILIES, "overall"]
    assert by_name["counting"][1] == "100.00" and by_name["existence"][1] == "0.00"
    assert float(by_name["counting"][3]) == pytest.approx(reference["chance"]["counting"], abs=0.01)
    assert by_name["overall"][1] == f"{100 * len(counting) / len(val):.2f}"
    rows[0]["question_id"] = 1
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="no question 1 in val2014"):
        metrics.family_report(data, predictions)


def test_ban_train_prints_each_family_beside_chance(tmp_path, capsys):
    from ban.cli import main
    from tests.test_engine import TINY_MODEL, make_tiny_data

    data = make_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--epochs", "1", "--out", str(run), "--quiet"]
    args += [f"--set={k}={v}" for k, v in TINY_MODEL.items()] + ["--batch-size", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    expected = metrics.family_report(data, run / "predictions.jsonl")
    assert expected[0].startswith("by question family") and len(expected) == 6
    assert "\n".join(expected) in out
    report = json.loads((run / "report.json").read_text())
    assert expected[-1].split()[1] == f"{report['official']['overall']:.2f}"
