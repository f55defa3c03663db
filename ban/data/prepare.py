"""``prepare(raw_dir, out_dir)``: raw VQA v2 / bottom-up / GloVe / Visual Genome files -> the
prepared data directory of docs/DESIGN.md, and ``load_prepared`` to read it back.

Prepared directory::

    DATA/
      manifest.json          what was prepared, from which files, with which options
      dictionary.json        {"words": [...], "padding_idx": V, "unknown": "<unk>" | "release"}
      answers.json           the answer list, label order
      glove.npy, tfidf.npy   [V, D] float32 embedding inits (when a GloVe file was found;
                             tfidf.npy unless tfidf=False)
      features/<split>.h5    train2014, val2014, test2015 (test-dev2015 uses test2015's file)
      <split>.jsonl          one question per line (vg_train2014 / vg_val2014 for Visual Genome)

Why it is long (about 570 lines): one pass from the raw files to the prepared directory, in the
release's order (dictionary, answers, soft scores, Visual Genome, features); each step is a
function, and they are only used together.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ban.data.features import FeatureStore, convert_features_many, raw_feature_files
from ban.data.visual_genome import coco_ids, load_vg_questions, vg_entries
from ban.data.vqa import (
    VQADataset,
    answer_scores,
    answer_vocabulary,
    load_annotations,
    load_questions,
    match_annotations,
    read_json,
)
from ban.files import atomic_write, atomic_write_text
from ban.text import MAX_LENGTH, Dictionary, read_glove, tfidf_init

FORMAT = "ban-prepared-v1"
SPLITS = ("train2014", "val2014", "test2015", "test-dev2015")  # the release's dictionary order
ANNOTATED = ("train2014", "val2014")
IMAGE_SPLIT = {
    "train2014": "train2014",
    "val2014": "val2014",
    "test2015": "test2015",
    "test-dev2015": "test2015",
}

_VQA = "https://visualqa.org/download.html"
SOURCES = {
    "train2014 questions": f"v2_Questions_Train_mscoco.zip from {_VQA}",
    "val2014 questions": f"v2_Questions_Val_mscoco.zip from {_VQA}",
    "test2015 questions": f"v2_Questions_Test_mscoco.zip from {_VQA}",
    "test-dev2015 questions": f"v2_Questions_Test_mscoco.zip from {_VQA}",
    "train2014 annotations": f"v2_Annotations_Train_mscoco.zip from {_VQA}",
    "val2014 annotations": f"v2_Annotations_Val_mscoco.zip from {_VQA}",
    "features": "bottom-up-attention TSV files (trainval.zip with the adaptive 10-100 boxes, or "
    "trainval_36.zip; test2015.zip / test2015_36.zip for the test images), "
    "https://github.com/peteanderson80/bottom-up-attention#pretrained-features",
    "glove": "glove.6B.zip from https://nlp.stanford.edu/projects/glove/ (glove.6B.300d.txt)",
    "vg questions": "question_answers.json.zip from https://homes.cs.washington.edu/~ranjay/"
    "visualgenome/api.html (Visual Genome v1.2)",
    "vg images": "image_data.json.zip from https://homes.cs.washington.edu/~ranjay/"
    "visualgenome/api.html (Visual Genome v1.2)",
    "captions": "annotations_trainval2017.zip (or annotations_trainval2014.zip) from "
    "https://cocodataset.org/#download (captions_train2017.json, captions_val2017.json)",
}
# COCO caption files read into the tf-idf co-occurrence when present in RAW/annotations: the
# release's 2017 pair (train, then val, its order), else the 2014 pair (the same captions).
CAPTION_FILES = (
    ("captions_train2017.json", "captions_val2017.json"),
    ("captions_train2014.json", "captions_val2014.json"),
)


class MissingFilesError(FileNotFoundError):
    """Raised by :func:`prepare` with every missing raw file; ``.missing`` lists
    ``(path, source)`` pairs."""

    def __init__(self, raw_dir: Path, missing: list[tuple[str, str]]) -> None:
        self.missing = missing
        lines = [f"{raw_dir}: {len(missing)} raw file(s) missing:"]
        lines += [f"  {path}\n      from {source}" for path, source in missing]
        super().__init__("\n".join(lines))


def question_file(raw_dir: Path, split: str) -> Path:
    return raw_dir / f"v2_OpenEnded_mscoco_{split}_questions.json"


def annotation_file(raw_dir: Path, split: str) -> Path:
    return raw_dir / f"v2_mscoco_{split}_annotations.json"


def caption_files(raw_dir: str | Path) -> list[Path]:
    """The COCO caption files of ``raw_dir/annotations`` (see ``CAPTION_FILES``), or []."""
    folder = Path(raw_dir) / "annotations"
    for group in CAPTION_FILES:
        present = [folder / name for name in group if (folder / name).is_file()]
        if present:
            return present
    return []


def load_captions(path: str | Path) -> list[str]:
    """The captions of a COCO ``captions_<split>.json`` file (``annotations[i]["caption"]``),
    in file order; errors name the file and record."""
    path = Path(path)
    records = read_json(path, "annotations")
    captions = []
    for row, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
            raise ValueError(f"{path}: annotations[{row}] has no string 'caption'")
        captions.append(record["caption"])
    return captions


def find_raw_files(
    raw_dir: str | Path,
    splits: list[str] | None = None,
    glove: str | Path | None = None,
    captions: list[str | Path] | None = None,
) -> dict:
    """Locate the raw files; raise :class:`MissingFilesError` listing every missing one.

    ``splits=None`` prepares the VQA splits whose question file is present (train2014 and
    val2014 are required when neither is there, since the answer vocabulary needs annotations).
    Question and annotation files of splits not prepared are found too (``other_questions``,
    ``other_annotations``): the release builds its dictionary and answer list from every split.
    ``captions=None`` finds the COCO caption files of ``raw_dir/annotations``; ``[]`` uses none.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder not found: {raw_dir}")
    if splits is None:
        splits = [s for s in SPLITS if question_file(raw_dir, s).is_file()]
        if not any(s in ANNOTATED for s in splits):
            splits = sorted(set(splits) | set(ANNOTATED), key=SPLITS.index)
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; expected one of {', '.join(SPLITS)}")
    splits = sorted(set(splits), key=SPLITS.index)
    missing: list[tuple[str, str]] = []
    found: dict = {"splits": splits, "questions": {}, "annotations": {}}
    for s in splits:
        path = question_file(raw_dir, s)
        found["questions"][s] = path
        if not path.is_file():
            missing.append((str(path), SOURCES[f"{s} questions"]))
        if s in ANNOTATED:
            path = annotation_file(raw_dir, s)
            found["annotations"][s] = path
            if not path.is_file():
                missing.append((str(path), SOURCES[f"{s} annotations"]))
    found["other_questions"] = {
        s: question_file(raw_dir, s)
        for s in SPLITS
        if s not in splits and question_file(raw_dir, s).is_file()
    }
    found["other_annotations"] = {
        s: annotation_file(raw_dir, s)
        for s in ANNOTATED
        if s not in splits and annotation_file(raw_dir, s).is_file()
    }
    if captions is None:
        found["captions"] = caption_files(raw_dir)
    else:
        found["captions"] = [Path(p) for p in captions]
        missing += [(str(p), SOURCES["captions"]) for p in found["captions"] if not p.is_file()]
    found["features"] = raw_feature_files(raw_dir)
    if not found["features"]:
        missing.append((str(raw_dir / "features" / "*.tsv (or *.h5)"), SOURCES["features"]))
    if glove is not None:
        found["glove"] = Path(glove)
        if not found["glove"].is_file():
            missing.append((str(glove), SOURCES["glove"]))
    else:
        candidates = sorted((raw_dir / "glove").glob("glove.*.txt"))
        if len(candidates) > 1:
            raise ValueError(
                f"{raw_dir / 'glove'}: several GloVe files "
                f"({', '.join(p.name for p in candidates)}); choose one with glove="
            )
        found["glove"] = candidates[0] if candidates else None
    vg = {
        "vg questions": raw_dir / "vg" / "question_answers.json",
        "vg images": raw_dir / "vg" / "image_data.json",
    }
    present = [p.is_file() for p in vg.values()]
    if any(present) and not all(present):
        missing += [(str(p), SOURCES[k]) for k, p in vg.items() if not p.is_file()]
    found["vg"] = vg if all(present) else None
    if missing:
        raise MissingFilesError(raw_dir, missing)
    return found


def _source(path: Path) -> dict:
    return {"path": str(path), "bytes": path.stat().st_size}


def _write_jsonl(path: Path, entries: Iterable[dict]) -> None:
    """One JSON object a line, written line by line (no copy of the whole text in memory)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1))


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append '.npy' to a name
            np.save(f, array)

    atomic_write(path, write)


def _compact(annotations: dict[int, dict]) -> dict[int, dict]:
    """The annotation fields prepare uses, the human answers as strings, repeated strings shared
    (``sys.intern``): a third of the memory of the parsed JSON at VQA v2's size."""
    return {
        qid: {
            "question_id": qid,
            "image_id": a["image_id"],
            "answers": [sys.intern(x["answer"]) for x in a["answers"]],
            "multiple_choice_answer": sys.intern(a["multiple_choice_answer"]),
            "answer_type": sys.intern(a["answer_type"]),
            "question_type": sys.intern(a["question_type"]),
        }
        for qid, a in annotations.items()
    }


_read_annotations = load_annotations  # ban.data.vqa's


def load_annotations(path: str | Path) -> dict[int, dict]:
    """:func:`ban.data.vqa.load_annotations`, made compact (:func:`_compact`) as each file is read,
    so that only one file's parsed JSON is held at a time."""
    return _compact(_read_annotations(path))


def prepare(
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    splits: list[str] | None = None,
    min_answer_count: int = 9,
    answer_splits: list[str] | None = None,
    max_length: int = MAX_LENGTH,
    release_unk: bool = False,
    normalize_human_answers: bool = False,
    glove: str | Path | None = None,
    fix_idf: bool = False,
    tfidf: bool = True,
    captions: list[str | Path] | None = None,
    use_vg: bool = True,
    fp16: bool = False,
    allow_missing_features: bool = False,
    progress: bool = True,
) -> Path:
    """Turn a raw folder (layout in docs/DESIGN.md) into a prepared data directory.

    - ``splits``: VQA splits to prepare (default: those whose question file is in ``raw_dir``).
    - The dictionary numbers the words of every VQA question file in ``raw_dir`` (prepared or
      not) in the order train2014, val2014, test2015, test-dev2015, as the release.
    - ``min_answer_count``: answers given for at least this many questions form the vocabulary,
      counted over ``answer_splits`` (default: every annotated split in ``raw_dir``, prepared or
      not: train2014 and val2014, as the release's ``trainval`` answer list).
    - ``release_unk``: a dictionary without ``<unk>``, unknown words -> V-1 (the release).
    - ``normalize_human_answers``: normalise each human answer before matching it to the
      vocabulary (the release does not, and loses some credit).
    - ``glove``: a GloVe text file (default: the one ``raw_dir/glove/glove.*.txt``); ``fix_idf``:
      fix the release's IDF indexing bug in the tf-idf init (see ``ban.text.tfidf_matrix``).
    - ``tfidf=False``: no tf-idf table; a model's second ('c') embedding is then a frozen copy of
      GloVe, as the release without ``--tfidf``.
    - ``captions``: COCO caption files whose captions join the tf-idf co-occurrence after the VQA
      and VG questions, as the release (default: ``raw_dir/annotations/captions_train2017.json``
      and ``captions_val2017.json``, else the 2014 pair, when present; ``[]``: none).
    - ``use_vg``: add Visual Genome QA when ``raw_dir/vg`` holds both files.
    - ``allow_missing_features``: drop (and count) questions whose image has no features instead
      of failing.

    Returns ``out_dir``. ``manifest.json`` is written last: a folder without it is incomplete.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    found = find_raw_files(raw_dir, splits, glove, captions)
    splits = found["splits"]
    say = print if progress else (lambda *a, **k: None)

    # 1. questions and annotations (all checked before the long feature conversion), of the
    # prepared splits and of the other splits present, which the dictionary and answers use
    question_paths = {**found["questions"], **found["other_questions"]}
    annotation_paths = {**found["annotations"], **found["other_annotations"]}
    dictionary_splits = [s for s in SPLITS if s in question_paths]
    questions = {s: load_questions(question_paths[s]) for s in dictionary_splits}
    annotations = {}
    for s in sorted(annotation_paths, key=SPLITS.index):
        annotations[s] = load_annotations(annotation_paths[s])
        if s in questions:
            match_annotations(questions[s], annotations[s], question_paths[s], annotation_paths[s])
    captions_read = {}  # path -> captions, for the tf-idf texts
    if tfidf and found["glove"] is not None:
        captions_read = {str(p): load_captions(p) for p in found["captions"]}
    vg_questions = vg_coco = None
    if use_vg and found["vg"] is not None:
        say(f"reading Visual Genome QA from {found['vg']['vg questions'].parent}")
        vg_questions = load_vg_questions(found["vg"]["vg questions"])
        vg_coco = coco_ids(found["vg"]["vg images"])

    dictionary = Dictionary.build(
        (q["question"] for s in dictionary_splits for q in questions[s]), release_unk=release_unk
    )
    answer_splits = answer_splits or [s for s in SPLITS if s in annotations]
    for s in answer_splits:
        if s not in annotations:
            raise ValueError(f"answer split {s!r} has no annotation file in {raw_dir}")
    answers = answer_vocabulary(
        (a for s in answer_splits for a in annotations[s].values()), min_answer_count
    )
    if not answers:
        raise ValueError(
            f"no answer is given for >= {min_answer_count} questions in "
            f"{', '.join(answer_splits)}; lower min_answer_count"
        )
    ans2label = {a: i for i, a in enumerate(answers)}
    say(f"{len(dictionary)} words, {len(answers)} answers (min count {min_answer_count})")

    # 2. region features, one pass over the TSV files
    out_dir.mkdir(parents=True, exist_ok=True)
    image_splits = sorted({IMAGE_SPLIT[s] for s in splits}, key=SPLITS.index)
    wanted = {
        out_dir / "features" / f"{i}.h5": {
            q["image_id"] for s in splits if IMAGE_SPLIT[s] == i for q in questions[s]
        }
        for i in image_splits
    }
    say(f"region features: {len(found['features'])} TSV file(s) -> {out_dir / 'features'}")
    converted = convert_features_many(found["features"], wanted, fp16=fp16, progress=progress)
    feature_info = {}
    feature_dim = None
    for i in image_splits:
        info = converted[out_dir / "features" / f"{i}.h5"]
        feature_info[i] = {
            "file": f"features/{i}.h5",
            "images": info["images"],
            "boxes": info["boxes"],
        }
        store = FeatureStore(out_dir / "features" / f"{i}.h5")
        if len(store):
            feature_dim = store.dim

    # 3. one jsonl per split
    split_info = {}
    for s in splits:
        store = FeatureStore(out_dir / "features" / f"{IMAGE_SPLIT[s]}.h5")
        dropped = [q for q in questions[s] if q["image_id"] not in store]

        def entries(s=s, store=store):  # written line by line: no list of every entry
            for q in questions[s]:
                if q["image_id"] not in store:
                    continue
                e = {
                    "question_id": q["question_id"],
                    "image_id": q["image_id"],
                    "question": q["question"],
                    "tokens": dictionary.encode(q["question"], max_length),
                }
                if s in annotations:
                    a = annotations[s][q["question_id"]]
                    human = a["answers"]
                    labels, scores = answer_scores(human, ans2label, normalize_human_answers)
                    e.update(
                        answers=human,
                        multiple_choice_answer=a["multiple_choice_answer"],
                        answer_type=a["answer_type"],
                        question_type=a["question_type"],
                        labels=labels,
                        scores=scores,
                    )
                yield e

        if dropped:
            images = sorted({q["image_id"] for q in dropped})
            message = (
                f"{found['questions'][s]}: {len(dropped)} question(s) on {len(images)} image(s) "
                f"with no features in {', '.join(str(p) for p in found['features'])} (first: "
                f"question_id {dropped[0]['question_id']}, image_id {dropped[0]['image_id']}; "
                f"image ids {images[:10]}{' ...' if len(images) > 10 else ''})"
            )
            if not allow_missing_features:
                raise ValueError(
                    message + "; add the missing TSV files, or pass "
                    "allow_missing_features=True (--allow-missing-features) to drop "
                    "these questions"
                )
            warnings.warn("dropped " + message, stacklevel=2)
        _write_jsonl(out_dir / f"{s}.jsonl", entries())
        kept = len(questions[s]) - len(dropped)
        split_info[s] = {
            "file": f"{s}.jsonl",
            "features": f"features/{IMAGE_SPLIT[s]}.h5",
            "questions": kept,
            "answers": s in annotations,
            "source": "vqa",
            "dropped_no_features": len(dropped),
        }
        say(f"{s}: {kept} questions")

    # 4. Visual Genome QA on the COCO images with features here
    vg_info = None
    if vg_questions is not None:
        vg_info = {}
        for i in ("train2014", "val2014"):
            if i not in image_splits:
                continue
            store = FeatureStore(out_dir / "features" / f"{i}.h5")
            entries, counts = vg_entries(vg_questions, vg_coco, store, ans2label)
            for e in entries:
                e["tokens"] = dictionary.encode(e["question"], max_length)
            name = f"vg_{i}"
            _write_jsonl(out_dir / f"{name}.jsonl", entries)
            split_info[name] = {
                "file": f"{name}.jsonl",
                "features": f"features/{i}.h5",
                "questions": len(entries),
                "answers": True,
                "source": "vg",
            }
            vg_info[name] = counts
            say(f"{name}: {counts['used']} of {counts['questions']} VG questions")

    # 5. dictionary, answers, embeddings
    dictionary.save(out_dir / "dictionary.json")
    _write_json(out_dir / "answers.json", answers)
    embeddings = None
    if found["glove"] is not None:
        glove_path = found["glove"]
        say(f"GloVe: reading {glove_path}")
        weights, hits = read_glove(glove_path, dictionary.words)
        _save_npy(out_dir / "glove.npy", weights)
        embeddings = {
            "glove": {
                "file": "glove.npy",
                "source": _source(glove_path),
                "dim": int(weights.shape[1]),
                "words_found": hits,
            },
            "tfidf": None,
        }
        if tfidf:
            # the release's tf-idf texts: VQA train, val and test2015 questions, VG questions,
            # then COCO captions (train, then val)
            vqa_splits = [s for s in ("train2014", "val2014", "test2015") if s in questions]
            texts = [q["question"] for s in vqa_splits for q in questions[s]]
            if vg_questions is not None:
                texts += [q["question"] for q in vg_questions]
            for caption_texts in captions_read.values():
                texts += caption_texts
            init = tfidf_init(texts, dictionary, glove_path, fix_idf)
            _save_npy(out_dir / "tfidf.npy", init)
            embeddings["tfidf"] = {
                "file": "tfidf.npy",
                "fix_idf": fix_idf,
                "texts": len(texts),
                "vqa_splits": vqa_splits,
                "vg": vg_questions is not None,
                "captions": {p: len(c) for p, c in captions_read.items()},
            }
        say(f"GloVe: {hits} of {len(dictionary)} words found")

    sources = {f"{s} questions": _source(p) for s, p in question_paths.items()}
    sources.update({f"{s} annotations": _source(p) for s, p in annotation_paths.items()})
    if tfidf and found["glove"] is not None:
        sources.update({f"captions {p.name}": _source(p) for p in found["captions"]})
    sources["features"] = [_source(p) for p in found["features"]]
    if vg_questions is not None:
        sources.update({k: _source(p) for k, p in found["vg"].items()})
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "raw_dir": str(raw_dir),
        "sources": sources,
        "options": {
            "min_answer_count": min_answer_count,
            "dictionary_splits": dictionary_splits,
            "answer_splits": answer_splits,
            "max_length": max_length,
            "release_unk": release_unk,
            "normalize_human_answers": normalize_human_answers,
            "fix_idf": fix_idf,
            "tfidf": tfidf,
            "use_vg": use_vg,
            "fp16": fp16,
            "allow_missing_features": allow_missing_features,
        },
        "max_length": max_length,
        "dictionary": {
            "file": "dictionary.json",
            "words": len(dictionary),
            "padding_idx": dictionary.padding_idx,
            "unknown": "release" if release_unk else "<unk>",
        },
        "answers": {"file": "answers.json", "count": len(answers)},
        "feature_dim": feature_dim,
        "features": feature_info,
        "splits": split_info,
        "embeddings": embeddings,
        "visual_genome": vg_info,
    }
    _write_json(out_dir / "manifest.json", manifest)
    return out_dir


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: prepare the data first with `ban data prepare RAW --out DATA`"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_prepared(data_dir: str | Path, split: str, in_memory: bool = False) -> VQADataset:
    """The :class:`~ban.data.vqa.VQADataset` of a prepared split (``+`` joins several:
    ``"train2014+vg_train2014"``)."""
    read_manifest(data_dir)
    return VQADataset(data_dir, split, in_memory=in_memory)


def load_dictionary(data_dir: str | Path) -> Dictionary:
    return Dictionary.load(Path(data_dir) / "dictionary.json")


def load_answers(data_dir: str | Path) -> list[str]:
    return json.loads((Path(data_dir) / "answers.json").read_text(encoding="utf-8"))


def load_embeddings(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(glove [V, D], tfidf [V, D] or None)`` float32, or None when no GloVe file was prepared.

    ``tfidf`` is None for data prepared with ``tfidf=False``: a 'c' model then gets a frozen
    copy of GloVe in its second table (``BAN.init_embeddings``), as the release.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "glove.npy").is_file():
        return None
    tfidf = data_dir / "tfidf.npy"
    return np.load(data_dir / "glove.npy"), np.load(tfidf) if tfidf.is_file() else None
