"""The built-in benchmark's grounding captions: which objects each kind of phrase names, checked
on a hand-made scene and by re-reading the generated text against the scene; and that the
captions cannot change the VQA half (questions, answers, features)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from ban.data import scene_world as world
from ban.data import scenes
from ban.data.scene_world import ATTRIBUTES, VALUES, Scene, SceneObject

VALUE_OF = {v: a for a in ATTRIBUTES for v in VALUES[a]}
SINGULAR = {
    "squares": "square",
    "circles": "circle",
    "triangles": "triangle",
    "diamonds": "diamond",
}
NUMBERS = {w: i for i, w in enumerate(scenes.NUMBER_WORDS)}
MARKUP = re.compile(r"\[/EN#(\d+)/([\w/]+) ([^\]]+)\]")


def pairs_of(words: list[str]) -> list[tuple[str, str]]:
    """'small metal circle' -> [(size, small), (material, metal), (shape, circle)]."""
    pairs = []
    for word in words:
        word = SINGULAR.get(word, word)
        if word not in ("object", "objects"):
            pairs.append((VALUE_OF[word], word))
    return pairs


def small_scene() -> Scene:
    """0 small red metal circle, 1 small red rubber circle, 2 large blue metal circle, 3 small
    green metal square."""
    objects = (
        SceneObject("small", "red", "metal", "circle", (10, 10, 30, 30)),
        SceneObject("small", "red", "rubber", "circle", (60, 10, 80, 30)),
        SceneObject("large", "blue", "metal", "circle", (110, 10, 150, 50)),
        SceneObject("small", "green", "metal", "square", (10, 90, 30, 110)),
    )
    return Scene(7, 200, 150, (220, 220, 220), objects)


def test_minimal_descriptions_need_every_attribute():
    scene = small_scene()
    # "red metal": red alone names 0 and 1, metal alone 0, 2 and 3. "small metal circle": each
    # pair of its attributes names two objects. "red metal circle" is unique but not minimal.
    assert world.minimal_descriptions(scene, 0) == [
        (("color", "red"), ("material", "metal")),
        (("size", "small"), ("material", "metal"), ("shape", "circle")),
    ]
    assert world.minimal_descriptions(scene, 1) == [(("material", "rubber"),)]
    assert world.minimal_descriptions(scene, 2) == [(("size", "large"),), (("color", "blue"),)]
    twins = Scene(8, 200, 150, (220, 220, 220), (scene.objects[0],) * 2 + scene.objects[2:])
    assert world.minimal_descriptions(twins, 0) == []  # no description tells the twins apart


def test_groups_are_named_by_descriptions_that_need_each_attribute():
    groups = {(tuple(sorted(m)), d) for m, d in scenes._groups(small_scene())}
    assert groups == {
        ((0, 1, 3), (("size", "small"),)),
        ((0, 1), (("color", "red"),)),
        ((0, 2, 3), (("material", "metal"),)),
        ((0, 1, 2), (("shape", "circle"),)),
        ((0, 3), (("size", "small"), ("material", "metal"))),
        ((0, 1), (("size", "small"), ("shape", "circle"))),
        ((0, 2), (("material", "metal"), ("shape", "circle"))),
    }
    # Not "red circles" (the red objects are the circles 0 and 1 already), and no group of all.


def test_the_context_templates_name_the_right_objects():
    """On the hand-made scene, "Two ... , one X and one Y" and "A ... and another ..." name the
    objects the earlier words single out."""
    scene = small_scene()
    seen = Counter()
    for seed in range(30):
        chains = scenes._Chains(scene.image_id)
        for line in scenes._captions(scene, random.Random(seed), chains, 5):
            objects_of = {chain: set(m) for m, chain in chains.ids.items()}
            found = MARKUP.findall(line)
            for k, (chain, _, words) in enumerate(found):
                tokens = words.lower().split()
                if tokens[0] == "one":
                    seen["one"] += 1
                    group = objects_of[int(found[0][0])]
                    value = SINGULAR.get(tokens[1], tokens[1])
                    expected = {
                        i for i in group if scene.objects[i].value(VALUE_OF[value]) == value
                    }
                    assert objects_of[int(chain)] == expected and len(expected) == 1, line
                elif tokens[0] == "another":
                    seen["another"] += 1
                    first = objects_of[int(found[k - 1][0])]
                    described = dict(pairs_of(tokens[1:]))
                    named = {
                        i
                        for i, o in enumerate(scene.objects)
                        if all(o.value(a) == v for a, v in described.items())
                    }
                    assert len(named) == 2 and len(first) == 1 and first < named, line
                    assert objects_of[int(chain)] == named - first, line
    assert seen["one"] > 10 and seen["another"] > 10


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return scenes.generate(
        tmp_path_factory.mktemp("captions") / "raw",
        40,
        10,
        5,
        seed=3,
        feature_dim=8,
        images=False,
        workers=1,
    )


def test_generated_phrases_need_every_attribute_they_mention(raw):
    """Re-read from the text: a singular phrase names one object and dropping any of its words
    names more; a group phrase names exactly its count of objects, and dropping a word names
    more; the context phrases ("one red", "another circle") and the phrase before "another"
    (its description plus one attribute) are counted apart."""
    data = json.loads((raw / "scenes.json").read_text())
    kinds = Counter()
    for split in data["splits"].values():
        for scene in split["images"]:
            objects = scene["objects"]

            def named(pairs, objects=objects):
                return [o for o in objects if all(o[a] == v for a, v in pairs)]

            text = (raw / "flickr30k" / "Sentences" / f"{scene['image_id']}.txt").read_text()
            for line in text.splitlines():
                found = MARKUP.findall(line)
                for k, (_, kind, words) in enumerate(found):
                    tokens = words.lower().split()
                    if k + 1 < len(found) and found[k + 1][2].startswith("another"):
                        kinds["before another"] += 1  # its description plus one attribute
                        continue
                    if kind != "other" or tokens[0] in ("one", "another"):
                        kinds[tokens[0] if kind == "other" else kind] += 1
                        continue
                    number = NUMBERS.get(tokens[1] if tokens[0] == "the" else tokens[0], 1)
                    pairs = pairs_of(
                        [t for t in tokens if t not in NUMBERS and t not in ("a", "the")]
                    )
                    assert len(named(pairs)) == number, (scene["image_id"], line)
                    for drop in range(len(pairs)):
                        fewer = pairs[:drop] + pairs[drop + 1 :]
                        assert len(named(fewer)) > number, (line, words)
                    kinds["group" if number > 1 else "single"] += 1
    assert kinds["single"] and kinds["group"] and kinds["one"] and kinds["another"]
    assert kinds["scene"] and kinds["notvisual"]


def test_captions_do_not_change_the_vqa_half(tmp_path, monkeypatch):
    """The captions come last from each image's random stream, so other captions (here: none,
    after drawing from the stream) leave the questions, answers, features and scenes.json
    byte-identical."""
    args = dict(train_images=12, val_images=6, test_images=4, feature_dim=8, images=False)
    one = scenes.generate(tmp_path / "a", workers=1, **args)

    def other_captions(scene, rnd, chains, n):
        [rnd.random() for _ in range(100)]
        return []

    monkeypatch.setattr(scenes, "_captions", other_captions)
    two = scenes.generate(tmp_path / "b", workers=1, **args)
    names = [p.relative_to(one) for p in one.glob("*.json")] + [
        p.relative_to(one) for p in one.glob("features/*.tsv")
    ]
    assert len(names) == 10  # 4 question and 2 annotation files, scenes.json, 3 TSVs
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    sentences = "flickr30k/Sentences/1000001.txt"
    assert (one / sentences).read_bytes() != (two / sentences).read_bytes()


def test_the_phrase_kinds_of_the_grounding_benchmark_script(tmp_path):
    from tests import benchmark_scripts

    script = benchmark_scripts.load("grounding_phrases")
    kind = script.phrase_kind
    assert kind("one red") == "one" and kind("another small circle") == "another"
    assert kind("The two red circles") == "group" and kind("Three metal objects") == "group"
    assert kind("a small metal circle") == "single, 3 attributes"
    assert kind("The purple object") == "single, 1 attribute"
    path = tmp_path / "predictions.jsonl"
    rows = [("one red", True), ("one blue", False), ("a red circle", True), ("the blue one", 0)]
    path.write_text("".join(json.dumps({"phrase": p, "hit@1": h}) + "\n" for p, h in rows))
    assert script.recall_by_kind(path) == {
        "one": (1, 2),
        "single, 2 attributes": (1, 1),
        "single, 1 attribute": (0, 1),
        "all": (2, 4),
    }
