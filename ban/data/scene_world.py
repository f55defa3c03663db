"""The world of the built-in scene benchmark: objects, scenes, rendering and the simulated detector.

A scene is 3 to 12 flat objects on a plain background. Each object has four attributes (size,
color, material, shape) and an integer pixel box. The simulated detector turns a scene into region
proposals the way bottom-up attention does (a jittered box per object, near-duplicates, parts and
background boxes) and gives each proposal a feature vector from a FIXED random encoder of its
attributes plus noise, so that a model has to decode the attributes from the features.

`ban.data.scenes` builds questions and captions on top of this and writes the files.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (193, 39, 45),
    "green": (46, 139, 60),
    "blue": (44, 82, 210),
    "yellow": (236, 206, 40),
    "purple": (128, 52, 180),
    "cyan": (42, 196, 206),
    "brown": (130, 82, 38),
    "gray": (110, 110, 110),
}
SHAPES = ("square", "circle", "triangle", "diamond")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")

# Attribute names in the order they are spoken ("the large red metal circle").
ATTRIBUTES = ("size", "color", "material", "shape")
VALUES: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "color": tuple(COLORS),
    "material": MATERIALS,
    "shape": SHAPES,
}
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "diamond": "diamonds"}

MIN_OBJECTS, MAX_OBJECTS = 3, 12
# Half the side of an object's box, in pixels, for each size.
HALF_SIDE = {"small": (9, 12), "large": (18, 23)}

# A description is a tuple of (attribute, value) pairs in ATTRIBUTES order.
Description = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and its box [x1, y1, x2, y2] in integer pixels, 0-based, x2
    exclusive (the object covers columns x1 .. x2 - 1)."""

    size: str
    color: str
    material: str
    shape: str
    box: tuple[int, int, int, int]

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    @property
    def descriptions(self) -> dict[tuple, Description]:
        """This object's description of every kind (attribute subset)."""
        return _descriptions(self.size, self.color, self.material, self.shape)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(frozen=True)
class Scene:
    """An image: objects in drawing order (later ones are drawn on top)."""

    image_id: int
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    @functools.cached_property
    def counts(self) -> Counter:
        """How many objects each description (of every kind) matches."""
        return Counter(d for o in self.objects for d in o.descriptions.values())

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            "objects": [
                {a: o.value(a) for a in ATTRIBUTES} | {"box": list(o.box)} for o in self.objects
            ],
        }


# ---------------------------------------------------------------------------------------------
# Descriptions


def kinds(min_size: int = 1, max_size: int = 4, exclude: tuple[str, ...] = ()) -> list[tuple]:
    """All attribute subsets (in ATTRIBUTES order) with min_size..max_size members."""
    names = [a for a in ATTRIBUTES if a not in exclude]
    return [
        combo
        for size in range(min_size, max_size + 1)
        for combo in itertools.combinations(names, size)
    ]


_ALL_KINDS = kinds()


@functools.cache
def _descriptions(*values: str) -> dict[tuple, Description]:
    pairs = dict(zip(ATTRIBUTES, values, strict=True))
    return {kind: tuple((a, pairs[a]) for a in kind) for kind in _ALL_KINDS}


def describe(obj: SceneObject, kind: tuple[str, ...]) -> Description:
    """kind: attribute names in ATTRIBUTES order."""
    return obj.descriptions[kind]


def matches(obj: SceneObject, description: Description) -> bool:
    return all(obj.value(a) == v for a, v in description)


def count(scene: Scene, description: Description) -> int:
    return scene.counts[description] if description else len(scene.objects)


def phrase(description: Description, plural: bool = False) -> str:
    """Words for a description: 'large red circle', 'metal objects'."""
    values = dict(description)
    words = [values[a] for a in ("size", "color", "material") if a in values]
    shape = values.get("shape")
    if plural:
        words.append(PLURALS[shape] if shape else "objects")
    else:
        words.append(shape or "object")
    return " ".join(words)


def unique_description(
    scene: Scene, index: int, rnd: random.Random, exclude: tuple[str, ...] = ()
) -> Description | None:
    """A description that picks out object `index` alone, without the attributes in `exclude`;
    short ones are preferred but not always chosen. None if no description is unique."""
    candidates = _kinds_without(exclude)
    random_ = rnd.random
    candidates = sorted(candidates, key=lambda k: len(k) + 2.5 * random_())
    descriptions = scene.objects[index].descriptions
    counts = scene.counts
    for kind in candidates:
        if counts[descriptions[kind]] == 1:
            return descriptions[kind]
    return None


def minimal_descriptions(scene: Scene, index: int) -> list[Description]:
    """Every description that picks out object `index` alone and needs each of its attributes:
    dropping any one of them names another object too. So for each attribute mentioned, the
    scene holds a distractor that matches the description except in that attribute, and a
    reader has to check them all. In ATTRIBUTES order of kinds; empty when another object has
    all four attributes of this one."""
    descriptions = scene.objects[index].descriptions
    found = []
    for kind in _ALL_KINDS:
        description = descriptions[kind]
        if count(scene, description) != 1:
            continue
        if all(count(scene, without(description, a)) > 1 for a, _ in description):
            found.append(description)
    return found


def without(description: Description, attribute: str) -> Description:
    """The description with one attribute left out."""
    return tuple(pair for pair in description if pair[0] != attribute)


@functools.cache
def _kinds_without(exclude: tuple[str, ...]) -> list[tuple]:
    return [k for k in _ALL_KINDS if not any(a in exclude for a in k)]


# ---------------------------------------------------------------------------------------------
# Scenes


def _random_attributes(rnd: random.Random) -> dict[str, str]:
    return {a: rnd.choice(VALUES[a]) for a in ATTRIBUTES}


def intersection(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    return intersection(a, b) / min(_area(a), _area(b))


def sample_scene(
    rnd: random.Random, image_id: int, planted: Description = (), planted_count: int = 0
) -> Scene:
    """A random scene with exactly `planted_count` objects matching `planted` (the counting
    question's answer) and 3..12 objects in all. Objects may overlap a little: a spot where up to
    35 % of the smaller box is covered is accepted, more only when 60 tries find nothing better
    (in the default benchmark no object is more than half covered)."""
    width = rnd.randint(256, 320)
    height = rnd.randint(192, 240)
    low = max(MIN_OBJECTS, planted_count)
    n = rnd.randint(low, max(low, MAX_OBJECTS))
    attributes = []
    for i in range(n):
        while True:
            attrs = _random_attributes(rnd)
            if i < planted_count:
                attrs.update(dict(planted))
                break
            if not planted or not all(attrs[a] == v for a, v in planted):
                break
        attributes.append(attrs)
    rnd.shuffle(attributes)
    placed: list[SceneObject] = []
    for attrs in attributes:
        lo, hi = HALF_SIDE[attrs["size"]]
        half = rnd.randint(lo, hi)
        best, best_overlap = None, math.inf
        for _ in range(60):
            cx = rnd.randint(half + 2, width - half - 2)
            cy = rnd.randint(half + 2, height - half - 2)
            box = (cx - half, cy - half, cx + half, cy + half)
            worst = max((_overlap(box, o.box) for o in placed), default=0.0)
            if worst < best_overlap:
                best, best_overlap = box, worst
            # Most objects stand apart; some are allowed to overlap.
            if worst == 0.0 or (worst < 0.35 and rnd.random() < 0.3):
                break
        placed.append(SceneObject(box=best, **attrs))
    shade = rnd.randint(205, 235)
    background = (shade, shade, min(255, shade + rnd.randint(0, 12)))
    return Scene(image_id, width, height, background, tuple(placed))


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    if factor >= 1:  # towards white
        t = factor - 1
        return tuple(round(c + (255 - c) * t) for c in color)
    return tuple(round(c * factor) for c in color)


def render(scene: Scene, path: str | Path, compress_level: int = 3) -> None:
    """Draw the scene as a PNG. Metal objects have an outline and a highlight; rubber ones are
    flat."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        x2, y2 = x2 - 1, y2 - 1  # PIL boxes are inclusive
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        fill = COLORS[obj.color]
        metal = obj.material == "metal"
        outline = _shade(fill, 0.55) if metal else None
        width = 2 if metal else 0
        if obj.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill, outline=outline, width=width)
        elif obj.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill, outline=outline, width=width)
        elif obj.shape == "triangle":
            points = [(cx, y1), (x2, y2), (x1, y2)]
            draw.polygon(points, fill=fill, outline=outline, width=width)
        else:
            points = [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
            draw.polygon(points, fill=fill, outline=outline, width=width)
        if metal:
            r = (x2 - x1) / 7
            hx, hy = (cx, cy + r) if obj.shape == "triangle" else (cx - r, cy - r)
            draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=_shade(fill, 1.6))
    image.save(path, format="PNG", compress_level=compress_level)


# ---------------------------------------------------------------------------------------------
# The simulated detector

_LATENT = {name: i for i, name in enumerate(itertools.chain(*(VALUES[a] for a in ATTRIBUTES)))}
_KIND = {"object": len(_LATENT), "part": len(_LATENT) + 1, "background": len(_LATENT) + 2}
LATENT_DIM = len(_LATENT) + len(_KIND)
ENCODER_SEED = 20180527  # fixed: every benchmark of a feature size shares one encoder


class FeatureEncoder:
    """A fixed random two-layer network from a box's latent description to its feature vector.

    latent `[n, LATENT_DIM = 19]`: one-hot size, color, material, shape, and the box kind
    (object, part, background). features `[n, D]` = softplus(tanh(latent W1 + b1 + e1) W2 + b2 +
    e2), e1 and e2 Gaussian with standard deviations level / 2 and level: positive (like pooled
    ReLU features, never an all-zero row), and no attribute can be read off a single column.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        rng = np.random.default_rng([ENCODER_SEED, dim])
        self.dim = dim
        self.w1 = rng.normal(0.0, 1.2, (LATENT_DIM, hidden))
        self.b1 = rng.normal(0.0, 0.3, hidden)
        self.w2 = rng.normal(0.0, 1.0 / math.sqrt(hidden), (hidden, dim)) * 2.0
        self.b2 = rng.normal(-0.5, 0.3, dim)

    def sample_noise(
        self, levels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """levels [n] (a noise level per box) -> noise for the hidden [n, H] and output [n, D]."""
        n = len(levels)
        hidden = 0.5 * levels[:, None] * rng.standard_normal((n, self.w1.shape[1]))
        return hidden, levels[:, None] * rng.standard_normal((n, self.dim))

    def encode(
        self, latent: np.ndarray, hidden_noise: np.ndarray, output_noise: np.ndarray
    ) -> np.ndarray:
        """latent [n, LATENT_DIM] and the noise of `sample_noise` -> features [n, D] float32.
        Rows are independent, so many images can be encoded in one call."""
        hidden = np.tanh(latent @ self.w1 + self.b1 + hidden_noise)
        return np.logaddexp(0.0, hidden @ self.w2 + self.b2 + output_noise).astype(np.float32)


@dataclass(frozen=True)
class Proposals:
    """A detector's boxes for one image before the encoder runs (features are encoded in
    batches of images, which is much faster than one image at a time)."""

    boxes: np.ndarray  # [n, 4] float32, x1, y1, x2, y2 in pixels
    latent: np.ndarray  # [n, LATENT_DIM]
    hidden_noise: np.ndarray  # [n, H]
    output_noise: np.ndarray  # [n, D]


def _latent(obj: SceneObject, kind: str, weight: float = 1.0) -> np.ndarray:
    z = np.zeros(LATENT_DIM)
    attributes = ("color", "material") if kind == "part" else ATTRIBUTES
    for a in attributes:
        z[_LATENT[obj.value(a)]] = weight
    z[_KIND[kind]] = weight
    return z


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes [..., 4] inside the image, at least a pixel wide, like a detector's output."""
    x1 = np.clip(boxes[..., 0], 0.0, width - 2.0)
    y1 = np.clip(boxes[..., 1], 0.0, height - 2.0)
    x2 = np.clip(np.maximum(boxes[..., 2], x1 + 1.0), None, width - 1.0)
    y2 = np.clip(np.maximum(boxes[..., 3], y1 + 1.0), None, height - 1.0)
    return np.stack([x1, y1, x2, y2], axis=-1)


def _iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes [..., 4] with boxes [..., 4] (broadcast) -> [...]."""
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


def propose(
    scene: Scene,
    encoder: FeatureEncoder,
    rng: np.random.Generator,
    num_boxes: int | None = 36,
    noise: float = 0.8,
) -> Proposals:
    """Region proposals for a scene, like a bottom-up-attention detector.

    Every object gets one box (jittered by 5 % of its side); half get near-duplicates (one or
    two; IoU 0.5 to 0.9 with the object, noisier features) and half a part box (a fifth to under
    half of the object, so IoU < 0.5, with the features of its color and material only); the rest
    are background boxes (IoU < 0.4 with every object) whose features mix in the objects they
    cover. `num_boxes` fixes the count (objects first, then duplicates and parts, then
    background); None gives an adaptive 10..100. The boxes come out shuffled.

    Boxes are x1, y1, x2, y2 in pixels, 0-based; `encoder.encode` turns the rest into features.
    """
    w, h = scene.width, scene.height
    objects = np.array([o.box for o in scene.objects], dtype=float)  # [m, 4]
    m = len(objects)
    sides = objects[:, 2:] - objects[:, :2]  # [m, 2]
    scale = np.concatenate([sides, sides], axis=1)  # [m, 4]
    latents = np.stack([_latent(o, "object") for o in scene.objects])  # [m, LATENT_DIM]
    main = _clip_boxes(objects + rng.normal(0.0, 0.05, (m, 4)) * scale, w, h)

    copies = rng.choice(3, p=[0.5, 0.35, 0.15], size=m)
    candidates = objects[:, None] + rng.normal(0.0, 0.14, (m, 20, 4)) * scale[:, None]
    candidates = _clip_boxes(candidates, w, h)  # [m, 20, 4]
    iou = _iou_pairs(candidates, objects[:, None])
    near = (iou >= 0.5) & (iou <= 0.9)
    duplicates = [(candidates[i][near[i]][: copies[i]], i) for i in range(m)]
    duplicate_owner = np.array([i for boxes, i in duplicates for _ in boxes], dtype=int)
    duplicate_boxes = np.concatenate([boxes for boxes, _ in duplicates]).reshape(-1, 4)

    with_part = np.flatnonzero(rng.random(m) < 0.5)
    fraction = rng.uniform(0.2, 0.45, m)
    pw = np.minimum(sides[:, 0] * np.sqrt(fraction) * rng.uniform(0.8, 1.2, m), sides[:, 0])
    ph = np.minimum(sides[:, 0] * sides[:, 1] * fraction / pw, sides[:, 1])
    px = objects[:, 0] + rng.random(m) * (sides[:, 0] - pw)
    py = objects[:, 1] + rng.random(m) * (sides[:, 1] - ph)
    parts = _clip_boxes(np.stack([px, py, px + pw, py + ph], axis=1), w, h)[with_part]
    part_latents = np.stack([_latent(o, "part", 0.8) for o in scene.objects])[with_part]

    extra_boxes = np.concatenate([duplicate_boxes, parts])
    extra_latents = np.concatenate([latents[duplicate_owner], part_latents])
    extra_levels = np.array([2.0 * noise] * len(duplicate_boxes) + [1.5 * noise] * len(parts))
    order = rng.permutation(len(extra_boxes))
    if num_boxes is None:
        total = int(np.clip(m + len(order) + rng.integers(2, 30), 10, 100))
    else:
        total = max(num_boxes, m)
    order = order[: total - m]
    background = _background_boxes(scene, rng, total - m - len(order))
    boxes = np.concatenate([main, extra_boxes[order], background[0]]).astype(np.float32)
    latent = np.concatenate([latents, extra_latents[order], background[1]])
    levels = np.concatenate(
        [np.full(m, noise), extra_levels[order], np.full(len(background[0]), noise)]
    )
    hidden_noise, output_noise = encoder.sample_noise(levels, rng)
    s = rng.permutation(total)
    return Proposals(boxes[s], latent[s], hidden_noise[s], output_noise[s])


def detect(
    scene: Scene,
    encoder: FeatureEncoder,
    rng: np.random.Generator,
    num_boxes: int | None = 36,
    noise: float = 0.8,
) -> tuple[np.ndarray, np.ndarray]:
    """`propose` and encode: boxes [n, 4] float32 (pixels) and features [n, D] float32."""
    p = propose(scene, encoder, rng, num_boxes, noise)
    return p.boxes, encoder.encode(p.latent, p.hidden_noise, p.output_noise)


def _background_boxes(
    scene: Scene, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """n background boxes [n, 4] (IoU < 0.4 with every object where 8n tries find enough) and
    their latents [n, LATENT_DIM]: the background flag plus the objects each box covers, weighted
    by the share of the box they fill."""
    w, h = scene.width, scene.height
    tries = 8 * max(n, 0)
    size = rng.uniform(0, 1, (tries, 2))
    bw = 12 + size[:, 0] * (0.6 * w - 12)
    bh = 12 + size[:, 1] * (0.6 * h - 12)
    x1 = rng.uniform(0, 1, tries) * (w - 1 - bw)
    y1 = rng.uniform(0, 1, tries) * (h - 1 - bh)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)  # [tries, 4], inside the image
    objects = np.array([o.box for o in scene.objects], dtype=float)  # [m, 4]
    iou = _iou_pairs(boxes[:, None], objects[None])  # [tries, m]
    good = iou.max(axis=1) < 0.4 if tries else np.zeros(0, bool)
    order = np.concatenate([np.flatnonzero(good), np.flatnonzero(~good)])[: max(n, 0)]
    boxes = boxes[order]
    iw = np.minimum(boxes[:, None, 2], objects[None, :, 2]) - np.maximum(
        boxes[:, None, 0], objects[None, :, 0]
    )
    ih = np.minimum(boxes[:, None, 3], objects[None, :, 3]) - np.maximum(
        boxes[:, None, 1], objects[None, :, 1]
    )
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)  # [n, m]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    latents = np.stack([_latent(o, "object") for o in scene.objects])  # [m, LATENT_DIM]
    z = 0.6 * (inter / area[:, None]) @ latents
    z[:, _KIND["background"]] += 1.0
    return boxes, z
