"""Flickr30k Entities: readers, grounding samples, IoU targets, and a prepared grounding directory.

RAW layout (the official release; the built-in benchmark writes the same files)::

    RAW/flickr30k/Sentences/<image_id>.txt    five captions, `[/EN#<id>/<type>... words]` markup
    RAW/flickr30k/Annotations/<image_id>.xml  PASCAL-VOC-like boxes, 1-based inclusive pixels
    RAW/flickr30k/{train,val,test}.txt        image ids of each split
    RAW/features/*.tsv                        bottom-up-attention features of those images
                                              (or *.h5, ban's HDF5 layout)

A phrase is *evaluated* iff its chain id has at least one `<bndbox>` in its image's XML (notvisual
id 0, `scene=1` and `nobndbox=1` chains are out; scene-*type* phrases with boxes are in). One sample
is one caption with at most 16 such phrases (docs/reference.md, the grounding sections).

Prepared layout (`prepare_flickr`)::

    OUT/manifest.json            format, sources, options, per-split counts (images, boxes, phrases)
    OUT/dictionary.json          words of every caption of every split, as the release (+ <unk>)
    OUT/glove.npy                [V, 300] GloVe init (only when RAW/glove/glove.*.txt exists)
    OUT/<split>.jsonl            one caption per line: image_id, caption, sentence, entities
    OUT/features/<split>.h5      the images' region features (ban.data.features layout)
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ban.data.features import convert_features_many, raw_feature_files
from ban.files import atomic_write, atomic_write_text
from ban.text import Dictionary, read_glove, tokenize

SPLITS = ("train", "val", "test")
TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other")
MAX_ENTITIES = 16  # phrases per caption (the release asserts it)
COMPAT_LENGTH = 82  # the release pads and truncates captions to 82 tokens
IOU_THRESHOLD = 0.5
PROTOCOLS = ("any", "merged")
FORMAT = "ban-flickr-prepared-v1"


# ---------------------------------------------------------------------------------------------
# Readers


@dataclass
class Phrase:
    """One annotated phrase of a caption (the official parser's fields)."""

    text: str  # the phrase's words joined by single spaces
    first_word_index: int  # 0-based position of its first word in the plain caption's words
    chain_id: int  # 0 for notvisual
    types: list[str]

    @property
    def num_words(self) -> int:
        return len(self.text.split(" "))


@dataclass
class Caption:
    words: list[str]  # the plain caption (markup removed), split on whitespace
    phrases: list[Phrase]

    @property
    def sentence(self) -> str:
        return " ".join(self.words)


def parse_caption(line: str, where: str = "caption") -> Caption:
    """A caption line with `[/EN#<id>/<type 1>/.../<type n> <words>]` markup, as the official
    `get_sentence_data` reads it: the header token starts with `[`, the closing `]` is glued to
    the phrase's last word, brackets never nest."""
    words: list[str] = []
    phrases: list[Phrase] = []
    current: list[str] | None = None
    header: tuple[int, list[str], int] | None = None
    for token in line.split():
        if current is not None:
            if token.endswith("]"):
                token = token[:-1]
                current.append(token)
                words.append(token)
                chain_id, types, first = header
                phrases.append(Phrase(" ".join(current), first, chain_id, types))
                current = None
            else:
                current.append(token)
                words.append(token)
        elif token.startswith("[/EN#"):
            parts = token[1:].split("/")
            try:
                chain_id = int(parts[1][3:])
            except ValueError:
                raise ValueError(f"{where}: bad chain id in {token!r}") from None
            if len(parts) < 3:
                raise ValueError(f"{where}: phrase header {token!r} has no type")
            header = (chain_id, parts[2:], len(words))
            current = []
        else:
            words.append(token)
    if current is not None:
        raise ValueError(f"{where}: a phrase is not closed with ']'")
    return Caption(words, phrases)


def read_sentences(path: str | Path) -> list[Caption]:
    """The captions of `Sentences/<image_id>.txt`, one per non-empty line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_caption(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


@dataclass
class ImageAnnotation:
    width: int
    height: int
    boxes: dict[int, list[list[int]]] = field(default_factory=dict)  # chain id -> raw XML boxes
    scene: set[int] = field(default_factory=set)  # chain ids flagged scene=1 (no box)
    nobox: set[int] = field(default_factory=set)  # chain ids flagged nobndbox=1


def read_annotation(path: str | Path) -> ImageAnnotation:
    """`Annotations/<image_id>.xml`: every `<name>` of an object gets its box; boxes stay the raw
    1-based inclusive integers (as BAN and MDETR use them)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: not an XML file ({error})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size>")
    ann = ImageAnnotation(int(size.findtext("width")), int(size.findtext("height")))
    for obj in root.iter("object"):
        names = [int(n.text) for n in obj.findall("name")]
        box = obj.find("bndbox")
        if box is not None:
            coords = [int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")]
            for name in names:
                ann.boxes.setdefault(name, []).append(coords)
            continue
        for flag, ids in (("scene", ann.scene), ("nobndbox", ann.nobox)):
            if (obj.findtext(flag) or "0").strip() == "1":
                ids.update(names)
    return ann


def read_split(path: str | Path) -> list[int]:
    """Image ids of a split file (one a line)."""
    return [int(line) for line in Path(path).read_text().split() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Entities, positions, targets


def entities(caption: Caption, annotation: ImageAnnotation, where: str = "caption") -> list[Phrase]:
    """The caption's evaluated phrases: those whose chain has a box in the image, in order."""
    found = [p for p in caption.phrases if p.chain_id > 0 and p.chain_id in annotation.boxes]
    if len(found) > MAX_ENTITIES:
        raise ValueError(f"{where}: {len(found)} grounded phrases, at most {MAX_ENTITIES} allowed")
    return found


def phrase_positions(words: list[str], phrases: list[dict], compat: bool = False) -> list[int]:
    """The token index of each phrase's LAST token in the sequence the encoder reads.

    Clean (default): the official `first_word_index` and phrase length, mapped through the
    tokenizer (commas deleted, "'s" split off), so the position is the phrase's true last token.
    `compat=True` reproduces the release: the first occurrence of the phrase's words in the caption
    split on single spaces, counted before commas are deleted, capped to the 82 tokens it reads
    (the release asserts < 82; capping keeps such captions usable).
    """
    positions = []
    for p in phrases:
        n = len(p["text"].split(" "))
        if compat:
            start = _find_sublist(words, p["text"].split(" "))
            if start < 0:
                raise ValueError(f"phrase {p['text']!r} not found in {' '.join(words)!r}")
            positions.append(min(start + n - 1, COMPAT_LENGTH - 1))
        else:
            end = p["first_word_index"] + n
            count = sum(len(tokenize(w)) for w in words[:end])
            positions.append(max(count - 1, 0))
    return positions


def _find_sublist(words: list[str], sub: list[str]) -> int:
    for i in range(len(words) - len(sub) + 1):
        if words[i : i + len(sub)] == sub:
            return i
    return -1


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[n, m]` IoU of boxes `a [n, 4]` and `b [m, 4]` (x1, y1, x2, y2), areas (x2-x1)(y2-y1)
    with no +1, as the release computes them."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def merge_boxes(boxes: np.ndarray) -> np.ndarray:
    """`[1, 4]`: the smallest box enclosing all of `boxes` (the MERGED protocol's ground truth)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])[None]


def targets(proposals: np.ndarray, gt_boxes: list[np.ndarray], protocol: str = "any") -> np.ndarray:
    """`[E, N]` bool: proposal i is positive for phrase e when IoU >= 0.5 with ANY ONE of the
    phrase's boxes (protocol 'any', the release's) or with their union box ('merged')."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    rows = []
    for boxes in gt_boxes:
        boxes = merge_boxes(boxes) if protocol == "merged" else np.asarray(boxes).reshape(-1, 4)
        rows.append((iou(proposals, boxes) >= IOU_THRESHOLD).any(axis=1))
    return np.stack(rows) if rows else np.zeros((0, len(proposals)), dtype=bool)


# ---------------------------------------------------------------------------------------------
# Records of a split


def caption_records(flickr_dir: str | Path, image_ids: list[int]) -> tuple[list[dict], dict]:
    """One record per caption with at least one evaluated phrase, and counts of the split.

    A record: `image_id`, `caption` (its line number, 0-based), `words`, `entities` (each: text,
    first_word_index, chain_id, types, boxes as raw XML integers).
    """
    flickr_dir = Path(flickr_dir)
    records: list[dict] = []
    counts = {"images": len(image_ids), "captions": 0, "phrases": 0, "evaluated_phrases": 0}
    for image_id in image_ids:
        sentences = flickr_dir / "Sentences" / f"{image_id}.txt"
        annotation = read_annotation(flickr_dir / "Annotations" / f"{image_id}.xml")
        for number, caption in enumerate(read_sentences(sentences)):
            counts["captions"] += 1
            counts["phrases"] += len(caption.phrases)
            found = entities(caption, annotation, f"{sentences}:{number + 1}")
            counts["evaluated_phrases"] += len(found)
            if not found:
                continue
            records.append(
                {
                    "image_id": image_id,
                    "caption": number,
                    "words": caption.words,
                    "entities": [
                        {
                            "text": p.text,
                            "first_word_index": p.first_word_index,
                            "chain_id": p.chain_id,
                            "types": p.types,
                            "boxes": annotation.boxes[p.chain_id],
                        }
                        for p in found
                    ],
                }
            )
    return records, counts


# ---------------------------------------------------------------------------------------------
# Prepared directory


def prepare_flickr(
    raw_dir: str | Path,
    out_dir: str | Path,
    splits: tuple[str, ...] = SPLITS,
    glove: str | Path | None = None,
    progress: bool = False,
    max_images: int | None = None,
) -> Path:
    """RAW (module docstring) -> a prepared grounding directory. The dictionary covers every
    caption of every split, as the release's does (a test vocabulary); features come from
    RAW/features/*.tsv (or *.h5) through the HDF5 converter. `max_images`: only the first N
    images of each split's list (the built-in benchmark grounds on its first 4,000 training
    scenes)."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    flickr_dir = raw_dir / "flickr30k"
    for split in splits:
        if not (flickr_dir / f"{split}.txt").is_file():
            raise FileNotFoundError(f"{flickr_dir / f'{split}.txt'}: split file missing")
    tsvs = raw_feature_files(raw_dir)
    if not tsvs:
        raise FileNotFoundError(f"{raw_dir / 'features'}: no bottom-up TSV (or HDF5) feature files")
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    split_ids = {s: read_split(flickr_dir / f"{s}.txt")[:max_images] for s in splits}
    texts: list[str] = []
    manifest: dict = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "raw_dir": str(raw_dir),
        "max_images": max_images,
        "splits": {},
    }
    for split in splits:
        records, counts = caption_records(flickr_dir, split_ids[split])
        for image_id in split_ids[split]:
            texts += [c.sentence for c in read_sentences(flickr_dir / f"Sentences/{image_id}.txt")]
        atomic_write_text(
            out_dir / f"{split}.jsonl",
            "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
        )
        manifest["splits"][split] = counts
    dictionary = Dictionary.build(texts)
    dictionary.save(out_dir / "dictionary.json")
    info = convert_features_many(
        tsvs, {out_dir / "features" / f"{s}.h5": split_ids[s] for s in splits}, progress=progress
    )
    for split in splits:
        done = info[out_dir / "features" / f"{split}.h5"]
        if done["missing"]:
            raise ValueError(
                f"{len(done['missing'])} {split} images have no features in {raw_dir / 'features'}"
                f" (first: {done['missing'][:5]})"
            )
        manifest["splits"][split]["boxes"] = done["boxes"]
    candidates = [Path(glove)] if glove else sorted((raw_dir / "glove").glob("glove.*.txt"))
    if candidates:
        weights, _ = read_glove(candidates[0], dictionary.words)
        array = weights.astype(np.float32)
        atomic_write(out_dir / "glove.npy", lambda tmp: _save_npy(tmp, array))
        manifest["glove"] = str(candidates[0])
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return out_dir


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append '.npy' to the temp name
        np.save(f, array)


def read_prepared_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: not a prepared grounding directory (no manifest)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} "
            "(prepare one with ban.data.flickr.prepare_flickr)"
        )
    return manifest


def read_records(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        known = ", ".join(read_prepared_manifest(data_dir)["splits"])
        raise ValueError(f"split {split!r} is not in {data_dir}; prepared splits: {known}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
