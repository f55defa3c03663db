"""The built-in scene benchmark: synthetic scenes written in the real file formats.

`generate(out_dir)` writes a RAW directory (docs/DESIGN.md) that the real pipelines read like the
real datasets: VQA v2 question and annotation JSON, bottom-up-attention TSV features, Flickr30k
Entities sentences and annotations, plus PNG images and a `scenes.json` with the ground truth.
`default_benchmark()` generates the default size once into a cache directory and
`default_prepared()` prepares it once; that is what `ban train` uses when no data is given.

Five question families (existence, counting 0-10, attribute query, spatial relation, comparison),
each balanced by answer within each template so that a question-only model stays near chance.
docs/benchmark.md describes the contents, the simulated detector and the sizes. The scenes, the
renderer and the detector live in `ban.data.scene_world`.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ban.data import scene_world as world
from ban.data.features import encode_row
from ban.data.flickr import prepare_flickr
from ban.data.images import DEFAULT_BACKBONE, FeatureExtractor, load_image
from ban.data.prepare import prepare
from ban.data.scene_world import (
    ATTRIBUTES,
    MAX_OBJECTS,
    VALUES,
    Description,
    Scene,
    count,
    describe,
    phrase,
    without,
)
from ban.files import read_json

VERSION = "scenes-v4"
DEFAULT_TRAIN_IMAGES = 24000
DEFAULT_VAL_IMAGES = 1000
DEFAULT_TEST_IMAGES = 250
# Grounding trains on the first 4,000 training scenes (20,000 captions), the size its measured
# recipe was made for: `ban train --task flickr` stays a few minutes (docs/grounding.md). The
# default benchmark writes captions for these only (captions are a fifth of the generation).
FLICKR_TRAIN_IMAGES = 4000
DEFAULT_FEATURE_DIM = 128
DEFAULT_NUM_BOXES = 36
FEATURE_SOURCES = ("detector", "backbone")  # the simulated detector, or a picture backbone
DEFAULT_BACKBONE_SIZE = 128  # EfficientNet-Lite0 at 128 px: a 4 x 4 map, ~60 pictures/s on 2 cores
DEFAULT_GRID = 4  # 16 regions: the counting module needs at least 10
CAPTIONS_PER_IMAGE = 5

FAMILIES = ("existence", "counting", "attribute", "spatial", "comparison")
# The default mix leaves the spatial family out: BAN sees box coordinates only through the
# counter (as in the release), and the simulated detector's features carry no position, so no
# model of this design can answer "is the X left of the Y?" (it stays at chance in every row of
# the ablation, docs/benchmark.md). `generate(..., families=FAMILIES)` (`ban data synth
# --families ...`) still asks it.
DEFAULT_FAMILIES = ("existence", "counting", "attribute", "comparison")
ANSWER_TYPES = {
    "existence": "yes/no",
    "counting": "number",
    "attribute": "other",
    "spatial": "yes/no",
    "comparison": "yes/no",
}
RELATIONS = ("left of", "right of", "above", "below")
COMPARISONS = ("same color", "same shape", "more")
MAX_COUNT = 10

EXISTENCE_KINDS = [k for k in world.kinds(1, 3) if k not in (("size",), ("material",))]
COUNTING_KINDS = world.kinds(1, 2)
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

# (split name, image id offset, has answers, Flickr30k split file)
SPLITS = (
    ("train2014", 1_000_000, True, "train"),
    ("val2014", 2_000_000, True, "val"),
    ("test2015", 3_000_000, False, "test"),
)

_INFO = {
    "description": f"ban built-in scene benchmark ({VERSION}), in the VQA v2 format",
    "url": "https://github.com/ban",
    "version": "2.0",
    "year": 2018,
    "contributor": "ban",
    "date_created": "2018-05-27 00:00:00",
}
_LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 International License",
}


@dataclass(frozen=True)
class Question:
    question_id: int
    image_id: int
    question: str
    question_type: str
    answer: str
    family: str
    key: str  # the template the answer is balanced within, e.g. "color" or "left of"

    @property
    def answer_type(self) -> str:
        return ANSWER_TYPES[self.family]


class _Balancer:
    """Counts answers per (family, key) and proposes the least-seen answer first."""

    def __init__(self) -> None:
        self.counts: dict[tuple, Counter] = defaultdict(Counter)

    def order(self, family: str, key, answers, rnd: random.Random) -> list[str]:
        seen = self.counts[family, key]
        return sorted(answers, key=lambda a: (seen[a], rnd.random()))

    def add(self, family: str, key, answer: str) -> None:
        self.counts[family, key][answer] += 1


# ---------------------------------------------------------------------------------------------
# Question families. Each maker returns (question, question_type) or None when the scene cannot
# give that answer for that key.


def _existence(scene: Scene, rnd: random.Random, kind, answer: str):
    if answer == "yes":
        description = describe(rnd.choice(scene.objects), kind)
    else:
        absent = [
            tuple(zip(kind, values, strict=True))
            for values in itertools.product(*(VALUES[a] for a in kind))
        ]
        absent = [d for d in absent if count(scene, d) == 0]
        if not absent:
            return None
        description = rnd.choice(absent)
    if rnd.random() < 0.5:
        return f"Is there a {phrase(description)}?", "is there a"
    return f"Are there any {phrase(description, plural=True)}?", "are there any"


def _counting_question(rnd: random.Random, description: Description):
    words = phrase(description, plural=True)
    template = rnd.choice(("How many {} are there?", "How many {} are in the picture?"))
    return template.format(words), "how many"


def _attribute(scene: Scene, rnd: random.Random, attribute: str, answer: str):
    candidates = [i for i, o in enumerate(scene.objects) if o.value(attribute) == answer]
    rnd.shuffle(candidates)
    for i in candidates:
        description = world.unique_description(scene, i, rnd, exclude=(attribute,))
        if description:
            return f"What {attribute} is the {phrase(description)}?", f"what {attribute} is the"
    return None


def _holds(scene: Scene, i: int, j: int, relation: str, margin: float = 8.0) -> bool | None:
    """Whether object i is `relation` object j; None when their centres are too close to say."""
    (xi, yi), (xj, yj) = scene.objects[i].center, scene.objects[j].center
    difference = (xj - xi) if relation in ("left of", "right of") else (yj - yi)
    if abs(difference) < margin:
        return None
    return (difference > 0) == (relation in ("left of", "above"))


def _pairs(scene: Scene, rnd: random.Random, limit: int = 40) -> list[tuple[int, int]]:
    pairs = list(itertools.permutations(range(len(scene.objects)), 2))
    rnd.shuffle(pairs)
    return pairs[:limit]


def _spatial(scene: Scene, rnd: random.Random, relation: str, answer: str):
    for i, j in _pairs(scene, rnd):
        holds = _holds(scene, i, j, relation)
        if holds is None:
            continue
        if holds != (answer == "yes"):
            i, j = j, i
        a = world.unique_description(scene, i, rnd)
        b = a and world.unique_description(scene, j, rnd)
        if b:
            return f"Is the {phrase(a)} {relation} the {phrase(b)}?", "is the"
    return None


def _comparison(scene: Scene, rnd: random.Random, key: str, answer: str):
    yes = answer == "yes"
    if key == "more":
        attribute = rnd.choice(ATTRIBUTES)
        pairs = list(itertools.permutations(VALUES[attribute], 2))
        rnd.shuffle(pairs)
        for v1, v2 in pairs:
            d1, d2 = ((attribute, v1),), ((attribute, v2),)
            c1, c2 = count(scene, d1), count(scene, d2)
            if max(c1, c2) > 0 and (c1 > c2) == yes:
                p1, p2 = phrase(d1, plural=True), phrase(d2, plural=True)
                return f"Are there more {p1} than {p2}?", "are there"
        return None
    attribute = key.split()[1]
    for i, j in _pairs(scene, rnd):
        same = scene.objects[i].value(attribute) == scene.objects[j].value(attribute)
        if same != yes:
            continue
        a = world.unique_description(scene, i, rnd, exclude=(attribute,))
        b = a and world.unique_description(scene, j, rnd, exclude=(attribute,))
        if b:
            return f"Is the {phrase(a)} the same {attribute} as the {phrase(b)}?", "is the"
    return None


_FAMILY_MAKERS: dict[str, tuple[list, Callable, Callable]] = {
    # family: (keys, answers of a key, maker)
    "existence": (EXISTENCE_KINDS, lambda key: ("yes", "no"), _existence),
    "attribute": (list(ATTRIBUTES), lambda key: VALUES[key], _attribute),
    "spatial": (list(RELATIONS), lambda key: ("yes", "no"), _spatial),
    "comparison": (list(COMPARISONS), lambda key: ("yes", "no"), _comparison),
}


def _ask(family: str, scene: Scene, rnd: random.Random, balancer: _Balancer):
    """One question of a family: a key (template) at random, and its least-seen answer that the
    scene allows; the next key if the scene allows none. Returns (question, question_type,
    answer, key) or None."""
    keys, answers_of, make = _FAMILY_MAKERS[family]
    for key in rnd.sample(keys, len(keys)):
        for answer in balancer.order(family, key, answers_of(key), rnd):
            made = make(scene, rnd, key, answer)
            if made:
                balancer.add(family, key, answer)
                return (*made, answer, key)
    return None


def _human_answers(rnd: random.Random, question: Question) -> list[dict]:
    """Ten annotators: most give the true answer, a few (0 to 3) slip."""
    truth = question.answer
    if question.family == "counting":
        wrong = [str(max(0, int(truth) + d)) for d in (-1, 1) if int(truth) + d >= 0]
    elif question.answer_type == "yes/no":
        wrong = ["no" if truth == "yes" else "yes"]
    else:
        wrong = [v for v in VALUES[question.key] if v != truth]
    slips = rnd.choices((0, 1, 2, 3), weights=(55, 25, 12, 8))[0]
    answers = [(truth, "yes" if rnd.random() < 0.9 else "maybe") for _ in range(10 - slips)]
    answers += [(rnd.choice(wrong), rnd.choice(("maybe", "no"))) for _ in range(slips)]
    rnd.shuffle(answers)
    return [
        {"answer": a, "answer_confidence": c, "answer_id": i + 1}
        for i, (a, c) in enumerate(answers)
    ]


# ---------------------------------------------------------------------------------------------
# Grounding captions (Flickr30k Entities markup)


class _Chains:
    """Entity chain ids of one image: one id per set of objects, shared across its captions.
    Ids are image_id * 100 + k: unique over the dataset, whatever order images are made in."""

    def __init__(self, image_id: int) -> None:
        self.next_id = itertools.count(image_id * 100 + 1).__next__
        self.ids: dict[frozenset, int] = {}
        self.scene_id: int | None = None

    def markup(self, entity: tuple[frozenset | None, str]) -> str:
        """`[/EN#<id>/<type> words]` for (objects, words); objects None is the scene."""
        objects, words = entity
        if objects is None:
            if self.scene_id is None:
                self.scene_id = self.next_id()
            return f"[/EN#{self.scene_id}/scene {words}]"
        if objects not in self.ids:
            self.ids[objects] = self.next_id()
        return f"[/EN#{self.ids[objects]}/other {words}]"


_GROUP_KINDS = world.kinds(1, 3)


def _groups(scene: Scene) -> list[tuple[frozenset, Description]]:
    """Sets of two or more objects (not all of them) that a description of one to three
    attributes names exactly and needs each of its attributes for: dropping any one names more
    objects ("the two red circles" where there are other red objects and other circles)."""
    members: dict[Description, list[int]] = defaultdict(list)
    for i, obj in enumerate(scene.objects):
        descriptions = obj.descriptions
        for kind in _GROUP_KINDS:
            members[descriptions[kind]].append(i)
    return [
        (frozenset(m), d)
        for d, m in members.items()
        if len(m) >= 2 and all(count(scene, without(d, a)) > len(m) for a, _ in d)
    ]


def _with(description: Description, attribute: str, value: str) -> Description:
    """The description with one more attribute, in ATTRIBUTES order."""
    pairs = dict(description) | {attribute: value}
    return tuple((a, pairs[a]) for a in ATTRIBUTES if a in pairs)


def _captions(scene: Scene, rnd: random.Random, chains: _Chains, n: int) -> list[str]:
    """n captions with phrases naming one object, a group of objects or the scene. A caption is a
    template of entities (objects, words); chain ids are given only to captions that are kept.

    A phrase for one object is a minimal unique description (every attribute it mentions is
    needed to tell the object from another one in the scene), longer ones preferred; a group is
    named by a description that needs each of its attributes too. Two templates name objects
    by what the caption said before them, as Flickr30k captions often do ("Two dogs , one
    black and one brown , ..."; "A man and another man ..."): "Two circles , one red and one
    blue , ..." (each "one <value>" is the member of the group with that value) and "A red
    circle and another circle ..." (the scene's other circle). The words of such a phrase alone
    name several objects; what precedes them in the caption tells which."""
    objects = scene.objects
    groups = _groups(scene)
    # (group of two or three, its description, an attribute it leaves out whose values differ
    # between every member): the groups whose members that attribute tells apart
    told_apart = [
        (members, description, a)
        for members, description in groups
        if len(members) <= 3
        for a in ATTRIBUTES
        if a not in dict(description)
        and len({objects[i].value(a) for i in members}) == len(members)
    ]

    def single(i: int):
        minimal = world.minimal_descriptions(scene, i)
        if not minimal:
            return None
        description = rnd.choices(minimal, weights=[len(d) ** 2 for d in minimal])[0]
        return frozenset([i]), f"{rnd.choice(('a', 'the'))} {phrase(description)}"

    def group(members: frozenset, description: Description, article: bool = True):
        words = f"{NUMBER_WORDS[len(members)]} {phrase(description, plural=True)}"
        return members, f"the {words}" if article and rnd.random() < 0.5 else words

    def the_scene():
        return None, rnd.choice(("the picture", "the image", "the gray background"))

    def relation():
        i, j = rnd.sample(range(len(objects)), 2)
        name = rnd.choice(RELATIONS)
        holds = _holds(scene, i, j, name)
        if holds is None:
            return None
        if not holds:
            i, j = j, i
        spoken = {"left of": "to the left of", "right of": "to the right of"}.get(name, name)
        return "{} is " + spoken + " {} .", [single(i), single(j)]

    def there_are():
        if not groups:
            return None
        return "There are {} in {} .", [group(*rnd.choice(groups), article=False), the_scene()]

    def both():
        i = rnd.randrange(len(objects))
        others = [g for g in groups if i not in g[0]]
        if others and rnd.random() < 0.6:
            second = group(*rnd.choice(others))
        else:
            second = single(rnd.choice([j for j in range(len(objects)) if j != i]))
        return "{} and {} are on {} .", [single(i), second, the_scene()]

    def near():
        i, j = rnd.sample(range(len(objects)), 2)
        (xi, yi), (xj, yj) = objects[i].center, objects[j].center
        if (xi - xj) ** 2 + (yi - yj) ** 2 > 60**2:
            return None
        return "{} and {} are next to [/EN#0/notvisual each other] .", [single(i), single(j)]

    overlapping = [
        (j, i)  # j is drawn after i, so it is in front
        for i, j in itertools.combinations(range(len(objects)), 2)
        if world.intersection(objects[i].box, objects[j].box) > 0
    ]

    def in_front():
        pairs = overlapping
        if not pairs:
            return None
        i, j = rnd.choice(pairs)
        return "{} is in front of {} .", [single(i), single(j)]

    def one_each():
        # A group of two or three, then each member by the attribute that tells them apart.
        if not told_apart:
            return None
        members, description, a = rnd.choice(told_apart)
        order = rnd.sample(sorted(members), len(members))
        ones = [(frozenset([i]), f"one {objects[i].value(a)}") for i in order]
        text = "{} , " + " , ".join(["{}"] * (len(ones) - 1)) + " and {} , are on {} ."
        return text, [group(members, description, article=False), *ones, the_scene()]

    def another():
        # "A red circle and another circle": the description names exactly two objects; the
        # first is named with one more attribute, the second only as "another".
        options = [option for option in told_apart if len(option[0]) == 2]  # pairs
        if not options:
            return None
        members, description, a = rnd.choice(options)
        i, j = rnd.sample(sorted(members), 2)
        first = phrase(_with(description, a, objects[i].value(a)))
        entities = [
            (frozenset([i]), f"{rnd.choice(('a', 'the'))} {first}"),
            (frozenset([j]), f"another {phrase(description)}"),
            the_scene(),
        ]
        return "{} and {} are on {} .", entities

    templates = (relation, there_are, both, near, in_front, one_each, another)
    used: Counter = Counter()
    captions: list[str] = []
    for _ in range(n):
        # The least-used template that this scene allows, so that captions vary.
        order = sorted(templates, key=lambda t: (used[t], rnd.random()))
        made = None
        for template in order:
            for _ in range(3):
                made = template()
                if made is not None and None not in made[1]:
                    break
                made = None
            if made is not None:
                used[template] += 1
                break
        if made is None:
            break
        caption = made[0].format(*(chains.markup(entity) for entity in made[1]))
        # Capitalise the first word, inside the markup when the caption opens with a phrase.
        at = caption.index(" ") + 1 if caption.startswith("[") else 0
        captions.append(caption[:at] + caption[at].upper() + caption[at + 1 :])
    return captions


def _xml(scene: Scene, chains: _Chains) -> str:
    """Flickr30k Entities XML: one <object> per mentioned object with the ids of every chain
    that includes it, boxes 1-based inclusive; the scene chain has no box."""
    lines = [
        "<annotation>",
        f"\t<filename>{scene.image_id}.png</filename>",
        "\t<size>",
        f"\t\t<width>{scene.width}</width>",
        f"\t\t<height>{scene.height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
    ]
    for i, obj in enumerate(scene.objects):
        names = sorted(chain for members, chain in chains.ids.items() if i in members)
        if not names:
            continue
        x1, y1, x2, y2 = obj.box
        lines.append("\t<object>")
        lines += [f"\t\t<name>{name}</name>" for name in names]
        lines += [
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1 + 1}</xmin>",
            f"\t\t\t<ymin>{y1 + 1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    if chains.scene_id is not None:
        lines += [
            "\t<object>",
            f"\t\t<name>{chains.scene_id}</name>",
            "\t\t<nobndbox>0</nobndbox>",
            "\t\t<scene>1</scene>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Writing a RAW directory


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _tsv_rows(encoder: world.FeatureEncoder, batch: list) -> str:
    """Encode the features of a batch of (scene, proposals) at once and return their TSV rows:
    image_id, image_w, image_h, num_boxes, base64 boxes, base64 features, with csv's CR LF line
    ends as the bottom-up-attention writer produced them."""
    if not batch:
        return ""
    proposals = [p for _, p in batch]
    features = encoder.encode(
        np.concatenate([p.latent for p in proposals]),
        np.concatenate([p.hidden_noise for p in proposals]),
        np.concatenate([p.output_noise for p in proposals]),
    )
    rows, start = [], 0
    for scene, p in batch:
        n = len(p.boxes)
        row = [scene.image_id, scene.width, scene.height, n, _b64(p.boxes)]
        row.append(_b64(features[start : start + n]))
        start += n
        rows.append("\t".join(map(str, row)) + "\r\n")
    return "".join(rows)


def _write_json(path: Path, data) -> None:
    # json.dumps, unlike json.dump, runs the C encoder.
    path.write_text(json.dumps(data), encoding="utf-8")


CHUNK = 250  # images made together; answers are balanced within each chunk


@dataclass(frozen=True)
class _Chunk:
    out: Path
    split: str
    split_index: int
    offset: int
    start: int
    stop: int
    seed: int
    feature_dim: int
    num_boxes: int | None  # None: adaptive
    images: bool
    captions_per_image: int
    captioned: int  # the split's images 0..captioned-1 get captions (Flickr30k files)
    detector: bool = True  # False: no simulated features (the backbone writes them afterwards)
    families: tuple[str, ...] = DEFAULT_FAMILIES  # the question families asked


@functools.cache
def _encoder(dim: int) -> world.FeatureEncoder:
    return world.FeatureEncoder(dim)


def _make_chunk(chunk: _Chunk) -> tuple[list[Scene], list[Question], Path]:
    """Images start..stop of a split: writes their PNGs, Flickr30k files and a part of the TSV;
    returns the scenes, the questions and the TSV part's path. Chunks are independent, so they
    can run in any order in any process."""
    c = chunk
    encoder = _encoder(c.feature_dim)
    balancer = _Balancer()
    scenes: list[Scene] = []
    questions: list[Question] = []
    pending: list[tuple[Scene, world.Proposals]] = []
    flickr = c.out / "flickr30k"
    for index in range(c.start, c.stop):
        rnd = random.Random(f"ban-scenes/{c.seed}/{c.split}/{index}")
        scene, asked = _scene_and_questions(rnd, c.offset + index + 1, balancer, c.families)
        scenes.append(scene)
        questions += asked
        if index < c.captioned:  # the captions draw from `rnd` last: skipping them moves nothing
            chains = _Chains(scene.image_id)
            lines = _captions(scene, rnd, chains, c.captions_per_image)
            (flickr / "Sentences" / f"{scene.image_id}.txt").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8"
            )
            (flickr / "Annotations" / f"{scene.image_id}.xml").write_text(
                _xml(scene, chains), encoding="utf-8"
            )
        if c.images:
            world.render(scene, c.out / "images" / f"{scene.image_id}.png")
        if c.detector:
            rng = np.random.default_rng([c.seed, c.split_index, index])
            pending.append((scene, world.propose(scene, encoder, rng, c.num_boxes)))
    part = c.out / "features" / f".{c.split}.{c.start:08d}.part"
    part.write_text(_tsv_rows(encoder, pending), encoding="ascii", newline="")
    return scenes, questions, part


def generate(
    out_dir: str | Path,
    train_images: int = DEFAULT_TRAIN_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    test_images: int = DEFAULT_TEST_IMAGES,
    seed: int = 0,
    feature_dim: int = DEFAULT_FEATURE_DIM,
    adaptive: bool = False,
    num_boxes: int = DEFAULT_NUM_BOXES,
    images: bool = True,
    train_pictures: bool = True,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    captioned_train_images: int | None = None,
    families: tuple[str, ...] | list[str] = DEFAULT_FAMILIES,
    workers: int | None = None,
    features: str = "detector",
    backbone=None,
    backbone_size: int = DEFAULT_BACKBONE_SIZE,
    grid: int = DEFAULT_GRID,
    batch_size: int = 32,
    progress: bool = False,
) -> Path:
    """Write a scene benchmark as a RAW directory (docs/DESIGN.md) and return its path.

    Files: `v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json`,
    `v2_mscoco_{train2014,val2014}_annotations.json`, `features/scenes_<split>.tsv` (bottom-up TSV,
    `num_boxes` boxes per image, or 10..100 with `adaptive`, features [n, feature_dim]),
    `flickr30k/{Sentences,Annotations}/<image_id>.{txt,xml}` and `flickr30k/{train,val,test}.txt`
    (the train2014, val2014 and test2015 images; of train2014, the first
    `captioned_train_images` only when given), `images/<image_id>.png` (unless
    `images=False`; only val2014's and test2015's with `train_pictures=False`: training reads the
    features alone, and drawing the pictures is a third of the generation time) and `scenes.json`
    (ground truth: objects, question families). test-dev2015 is the first half of test2015's
    images.

    The same arguments give byte-identical files. `workers` processes (default: the CPU count,
    at most 8) share the work without changing any byte.

    `features="backbone"` featurises the rendered PNGs with a picture backbone through
    `ban.data.images` instead of the simulated detector: each image's `grid x grid` cells are its
    regions (boxes in the PNG's pixels, features [grid * grid, D] of the backbone), written in
    the same TSV format. `backbone` is anything `ban.data.images.load_backbone` takes (default
    EfficientNet-Lite0, the `ban[images]` extra), run on the picture resized to `backbone_size`
    pixels square; `feature_dim`, `adaptive` and `num_boxes` do not apply. Same arguments, same
    bytes (on the same machine and torch build).
    """
    if features not in FEATURE_SOURCES:
        raise ValueError(f"generate: features must be one of {FEATURE_SOURCES}, got {features!r}")
    detector = features == "detector"
    if not detector:
        if not images or not train_pictures:
            raise ValueError(
                "generate: features='backbone' featurises the PNGs of every image: images=False "
                "or train_pictures=False"
            )
        if grid < DEFAULT_GRID or backbone_size < 32:
            raise ValueError(
                f"generate: expected grid >= {DEFAULT_GRID} (at least 10 regions for the counting "
                f"module; got {grid}) and backbone_size >= 32 (got {backbone_size})"
            )
    if not families or not set(families) <= set(FAMILIES):
        raise ValueError(
            f"generate: families must be a non-empty subset of {FAMILIES}, got {list(families)}"
        )
    families = tuple(f for f in FAMILIES if f in families)  # in FAMILIES order, no repeats
    if feature_dim < 1 or num_boxes < MAX_OBJECTS or min(train_images, val_images, test_images) < 0:
        raise ValueError(
            f"generate: expected feature_dim >= 1 (got {feature_dim}), num_boxes >= "
            f"{MAX_OBJECTS} (got {num_boxes}) and image counts >= 0 (got {train_images}, "
            f"{val_images}, {test_images})"
        )
    if captioned_train_images is not None and captioned_train_images < 0:
        raise ValueError(
            f"generate: captioned_train_images must be >= 0, got {captioned_train_images}"
        )
    out = Path(out_dir)
    for sub in ("features", "flickr30k/Sentences", "flickr30k/Annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if images:
        (out / "images").mkdir(exist_ok=True)
    sizes = {"train2014": train_images, "val2014": val_images, "test2015": test_images}
    captioned = dict(sizes)
    if captioned_train_images is not None:
        captioned["train2014"] = min(captioned_train_images, train_images)
    boxes = None if adaptive else num_boxes
    chunks = [
        _Chunk(
            out,
            split,
            split_index,
            offset,
            start,
            min(start + CHUNK, sizes[split]),
            seed,
            feature_dim,
            boxes,
            images and (train_pictures or split != "train2014"),
            captions_per_image,
            captioned[split],
            detector,
            families,
        )  # fmt: skip
        for split_index, (split, offset, _, _) in enumerate(SPLITS)
        for start in range(0, sizes[split], CHUNK)
    ]
    results = dict(zip(chunks, _run_chunks(chunks, workers, progress), strict=True))

    options = {
        "seed": seed,
        "feature_dim": feature_dim,
        "boxes": "adaptive" if adaptive else num_boxes,
        "captions_per_image": captions_per_image,
        "captioned_train_images": captioned["train2014"],
        "families": list(families),
        "pictures": ("all" if train_pictures else "val+test") if images else "none",
    }
    extractor = None
    if not detector:
        extractor = FeatureExtractor(backbone or DEFAULT_BACKBONE, backbone_size, grid)
        options = {
            "seed": seed,
            "features": "backbone",
            **extractor.info(),
            "feature_dim": 0,  # the backbone's, set below
            "boxes": grid * grid,
            "captions_per_image": captions_per_image,
            "captioned_train_images": captioned["train2014"],
            "families": list(families),
        }
    summary = {"version": VERSION, "options": options, "splits": {}}
    for split, _, answered, flickr_split in SPLITS:
        parts = [results[c] for c in chunks if c.split == split]
        scenes = [s for scenes, _, _ in parts for s in scenes]
        questions = [q for _, qs, _ in parts for q in qs]
        with open(out / "features" / f"scenes_{split}.tsv", "wb") as tsv:
            for _, _, path in parts:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, tsv)
                path.unlink()
        if extractor is not None:
            dim = _backbone_tsv(
                extractor, out, split, [s.image_id for s in scenes], batch_size, progress
            )
            options["feature_dim"] = dim or options["feature_dim"]
        _write_split(out, split, answered, questions, rnd_seed=f"ban-scenes/{seed}/{split}")
        ids = "".join(f"{s.image_id}\n" for s in scenes[: captioned[split]])
        (out / "flickr30k" / f"{flickr_split}.txt").write_text(ids, encoding="ascii")
        summary["splits"][split] = {
            "images": [s.to_json() for s in scenes],
            "families": {str(q.question_id): q.family for q in questions},
        }
    _write_json(out / "scenes.json", summary)
    return out


def _backbone_tsv(
    extractor, out: Path, split: str, image_ids: list[int], batch_size: int, progress: bool
) -> int:
    """Featurise a split's PNGs into `features/scenes_<split>.tsv` (bottom-up TSV, CR LF line
    ends, image order as in the questions); returns the feature dimension (0: no image)."""

    dim = 0
    step = max(1, batch_size)
    bar = tqdm(total=len(image_ids), unit="img", desc=f"features {split}", disable=not progress)
    with open(out / "features" / f"scenes_{split}.tsv", "w", encoding="ascii", newline="") as tsv:
        for start in range(0, len(image_ids), step):
            ids = image_ids[start : start + step]
            pictures = [load_image(out / "images" / f"{i}.png") for i in ids]
            for region in extractor.regions(pictures, ids):
                dim = region.features.shape[1]
                tsv.write(encode_row(region)[:-1] + "\r\n")
            bar.update(len(ids))
    bar.close()
    return dim


def _run_chunks(chunks: list[_Chunk], workers: int | None, progress: bool = False) -> list:
    """_make_chunk over the chunks, in forked worker processes on Linux (fork is cheap: nothing
    is re-imported, and the workers touch only numpy and Pillow), else in this process."""

    total = sum(c.stop - c.start for c in chunks)
    bar = tqdm(total=total, unit="img", desc="scenes", disable=not progress)
    workers = min(workers or os.cpu_count() or 1, 8, len(chunks))
    results = []
    if workers <= 1 or not sys.platform.startswith("linux"):  # fork is safe on Linux only
        for c in chunks:
            results.append(_make_chunk(c))
            bar.update(c.stop - c.start)
    else:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for c, result in zip(chunks, pool.map(_make_chunk, chunks), strict=True):
                results.append(result)
                bar.update(c.stop - c.start)
    bar.close()
    return results


def _scene_and_questions(
    rnd: random.Random,
    image_id: int,
    balancer: _Balancer,
    families: tuple[str, ...] = DEFAULT_FAMILIES,
) -> tuple[Scene, list[Question]]:
    """A scene and one question of each of `families` it allows (question ids image_id * 1000 +
    k)."""
    # The counting answer (0..10) is chosen first and that many matching objects are put in the
    # scene, so that counts are balanced for every kind of description.
    kind = rnd.choice(COUNTING_KINDS)
    planted = tuple((a, rnd.choice(VALUES[a])) for a in kind)
    answers = [str(c) for c in range(MAX_COUNT + 1)]
    how_many = balancer.order("counting", kind, answers, rnd)[0]
    balancer.add("counting", kind, how_many)
    scene = world.sample_scene(rnd, image_id, planted, int(how_many))
    questions = []
    for family in FAMILIES:
        if family not in families:
            continue
        if family == "counting":
            made = (*_counting_question(rnd, planted), how_many, kind)
        else:
            made = _ask(family, scene, rnd, balancer)
        if made:
            text, question_type, answer, key = made
            key = key if isinstance(key, str) else "+".join(key)
            qid = image_id * 1000 + len(questions)
            questions.append(Question(qid, image_id, text, question_type, answer, family, key))
    return scene, questions


def _write_split(
    out: Path, split: str, answered: bool, questions: list[Question], rnd_seed: str
) -> None:
    def question_file(subtype: str, qs: list[Question]) -> None:
        data = {
            "info": _INFO,
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": _LICENSE,
            "data_subtype": subtype,
            "questions": [
                {"image_id": q.image_id, "question": q.question, "question_id": q.question_id}
                for q in qs
            ],
        }
        _write_json(out / f"v2_OpenEnded_mscoco_{subtype}_questions.json", data)

    question_file(split, questions)
    if split == "test2015":
        image_ids = sorted({q.image_id for q in questions})
        dev = set(image_ids[: (len(image_ids) + 1) // 2])
        question_file("test-dev2015", [q for q in questions if q.image_id in dev])
    if not answered:
        return
    rnd = random.Random(rnd_seed + "/annotators")
    annotations = [
        {
            "question_type": q.question_type,
            "multiple_choice_answer": q.answer,
            "answers": _human_answers(rnd, q),
            "image_id": q.image_id,
            "answer_type": q.answer_type,
            "question_id": q.question_id,
        }
        for q in questions
    ]
    data = {
        "info": _INFO,
        "license": _LICENSE,
        "data_subtype": split,
        "annotations": annotations,
        "data_type": "mscoco",
    }
    _write_json(out / f"v2_mscoco_{split}_annotations.json", data)


# ---------------------------------------------------------------------------------------------
# The default benchmark, cached


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where cached benchmarks live: `cache_dir`, else $BAN_CACHE, else ~/.cache/ban."""
    root = cache_dir or os.environ.get("BAN_CACHE") or "~/.cache/ban"
    return Path(root).expanduser() / VERSION


def _build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """Run `build(tmp)` into a temporary directory beside `target` and rename it into place, so
    that `target` exists only complete; a concurrent builder that finishes first wins."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_benchmark(cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """The default scene benchmark's RAW directory, generated on first use (about a minute on 2
    cores; `progress`: say so and show a bar) into `cache_root(cache_dir)/raw`. A cached
    directory made with other options (an earlier generator, or `generate` called with other
    sizes into the cache) is refused, not reused."""
    target = cache_root(cache_dir) / "raw"

    def build(tmp: Path) -> None:
        if progress:
            print(f"generating the built-in benchmark ({VERSION}) once into {target}", flush=True)
        generate(
            tmp,
            train_pictures=False,
            captioned_train_images=FLICKR_TRAIN_IMAGES,
            progress=progress,
        )

    raw = _build_once(target, build)
    _check_default(raw)
    return raw


def _check_default(raw: Path) -> None:
    expected_options = {
        "seed": 0,
        "feature_dim": DEFAULT_FEATURE_DIM,
        "boxes": DEFAULT_NUM_BOXES,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "captioned_train_images": FLICKR_TRAIN_IMAGES,
        "families": list(DEFAULT_FAMILIES),
        "pictures": "val+test",
    }
    expected_images = {
        "train2014": DEFAULT_TRAIN_IMAGES,
        "val2014": DEFAULT_VAL_IMAGES,
        "test2015": DEFAULT_TEST_IMAGES,
    }
    path = raw / "scenes.json"
    summary = read_json(path)
    options = summary.get("options")
    images = {name: len(split["images"]) for name, split in summary.get("splits", {}).items()}
    version = summary.get("version")
    if version != VERSION or options != expected_options or images != expected_images:
        raise ValueError(
            f"the cached benchmark {raw} is not the default one (version "
            f"{version!r}, options {options}, images {images}; expected "
            f"{VERSION!r}, {expected_options}, {expected_images}): delete {raw.parent} to "
            "generate it again"
        )


def default_prepared(cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """The default benchmark run through `ban.data.prepare.prepare` once; returns the prepared
    data directory `cache_root(cache_dir)/prepared`."""
    raw = default_benchmark(cache_dir, progress)
    return _build_once(
        cache_root(cache_dir) / "prepared", lambda tmp: prepare(raw, tmp, progress=progress)
    )


def default_flickr_prepared(cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """The default benchmark's grounding captions run through `ban.data.flickr.prepare_flickr`
    once; returns the prepared directory `cache_root(cache_dir)/flickr-prepared`."""
    raw = default_benchmark(cache_dir, progress)
    target = cache_root(cache_dir) / "flickr-prepared"

    def build(tmp: Path) -> None:
        if progress:
            print(f"preparing the built-in benchmark's grounding captions once into {target}")
        prepare_flickr(raw, tmp, max_images=FLICKR_TRAIN_IMAGES, progress=progress)

    return _build_once(target, build)
