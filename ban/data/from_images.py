"""``from_images``: a folder of pictures + VQA-v2-style questions/annotations -> a prepared data
directory (the layout of :mod:`ban.data.prepare`), featurised with :mod:`ban.data.images`.

The pictures are featurised into an HDF5 feature file, which a temporary raw folder links (as
``RAW/features/images.h5``) beside the question files, and that folder goes through
:func:`ban.data.prepare.prepare` unchanged: the same checks, dictionary, answer vocabulary, answer
scores, jsonl and manifest as for VQA v2. The features are written twice (the extraction and the
prepared split files), not three times as with a TSV in between.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import h5py

from ban.data.images import DEFAULT_BACKBONE, extract_features, extractor_info, list_images
from ban.data.prepare import (
    ANNOTATED,
    IMAGE_SPLIT,
    annotation_file,
    prepare,
    question_file,
    read_manifest,
)
from ban.data.vqa import load_questions
from ban.files import atomic_write_text


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # file systems without symbolic links
        shutil.copyfile(source, target)


def _write_splits(
    raw: Path,
    split: str,
    val_fraction: float,
    questions: Path,
    annotations: Path,
    question_list: list[dict],
) -> list[str]:
    """The question/annotation files of the raw folder under prepare's names; their splits."""
    if not val_fraction:
        _link(questions, question_file(raw, split))
        _link(annotations, annotation_file(raw, split))
        return [split]
    ids = sorted({q["image_id"] for q in question_list})
    val_ids = set(ids[len(ids) - math.ceil(val_fraction * len(ids)) :])
    if len(val_ids) == len(ids):
        raise ValueError(f"val_fraction {val_fraction} leaves no image to train on ({len(ids)})")
    q_json = json.loads(questions.read_text(encoding="utf-8"))
    a_json = json.loads(annotations.read_text(encoding="utf-8"))
    for name, is_val in (("train2014", False), ("val2014", True)):
        q = {
            **q_json,
            "questions": [x for x in q_json["questions"] if (x["image_id"] in val_ids) == is_val],
        }
        a = {
            **a_json,
            "annotations": [
                x for x in a_json["annotations"] if (x["image_id"] in val_ids) == is_val
            ],
        }
        atomic_write_text(question_file(raw, name), json.dumps(q))
        atomic_write_text(annotation_file(raw, name), json.dumps(a))
    return ["train2014", "val2014"]


def from_images(
    images_dir: str | os.PathLike,
    questions: str | os.PathLike,
    out_dir: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    *,
    split: str = "train2014",
    val_fraction: float = 0.0,
    backbone=DEFAULT_BACKBONE,
    size: int = 320,
    grid: int = 7,
    batch_size: int = 8,
    device: str = "cpu",
    min_answer_count: int = 1,
    glove: str | os.PathLike | None = None,
    fp16: bool = False,
    allow_missing_images: bool = False,
    progress: bool = True,
) -> Path:
    """Build a prepared data directory from pictures and VQA v2 JSON files.

    - ``questions``: ``{"questions": [{"question_id", "image_id", "question"}]}``;
      ``annotations``: ``{"annotations": [{"question_id", "image_id", "answers": [{"answer"}],
      "multiple_choice_answer", "answer_type", "question_type"}]}`` (needed: the answer
      vocabulary comes from them).
    - Image ids are matched to files by the last number in the file name
      (:func:`ban.data.images.image_id_from_name`): ``42.jpg``, ``COCO_train2014_000000000042.jpg``.
    - ``split``: the split name the questions take (``train2014`` or ``val2014``).
    - ``val_fraction``: with ``split="train2014"``, the questions on the highest
      ``ceil(val_fraction * images)`` image ids form ``val2014`` instead (so ``ban train`` can
      evaluate); the answer vocabulary counts both.
    - ``allow_missing_images``: drop (with a warning) the questions whose picture is absent or
      does not decode, instead of failing.

    Returns ``out_dir``; its manifest's ``images`` entry records the folder and the extractor.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    questions = Path(questions)
    if split not in ANNOTATED:
        raise ValueError(f"split {split!r}: expected one of {', '.join(ANNOTATED)}")
    if annotations is None:
        raise ValueError(
            f"{questions}: annotations (answers) are needed to build the answer vocabulary; "
            "pass --annotations ANNOTATIONS.json"
        )
    annotations = Path(annotations)
    if not 0.0 <= val_fraction < 1.0 or (val_fraction and split != "train2014"):
        raise ValueError(f"val_fraction must be in [0, 1) with split train2014, got {val_fraction}")
    question_list = load_questions(questions)
    wanted = {q["image_id"] for q in question_list}
    files = list_images(images_dir)
    absent = sorted(wanted - set(files))
    if absent and not allow_missing_images:
        raise ValueError(
            f"{questions}: {len(absent)} image id(s) have no picture in {images_dir} (first: "
            f"{absent[:10]}); a picture's id is the last number in its file name (42.jpg, "
            "COCO_train2014_000000000042.jpg); or pass allow_missing_images=True "
            "(--allow-missing-images) to drop their questions"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # the extraction is kept beside out_dir (its partial file while it runs) until the data
    # directory is whole: a run that stops, at any step, and is run again does not featurise again
    features_h5 = out_dir.parent / f".{out_dir.name}.features.h5"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.from-images-", dir=out_dir.parent))
    try:
        raw = tmp / "raw"
        (raw / "features").mkdir(parents=True)
        info = extract_features(
            images_dir,
            features_h5,
            backbone=backbone,
            size=size,
            grid=grid,
            batch_size=batch_size,
            device=device,
            image_ids=wanted,
            progress=progress,
            reuse=True,
        )
        if info["skipped"] and not allow_missing_images:
            names = ", ".join(name for name, _ in info["skipped"][:10])
            raise ValueError(
                f"{images_dir}: {len(info['skipped'])} picture(s) do not decode ({names}); "
                "replace them, or pass --allow-missing-images to drop their questions"
            )
        extractor = extractor_info(features_h5)
        _link(features_h5, raw / "features" / "images.h5")
        splits = _write_splits(raw, split, val_fraction, questions, annotations, question_list)
        with warnings.catch_warnings():
            if allow_missing_images:
                warnings.simplefilter("ignore")  # reported below, with the file names
            prepare(
                raw,
                out_dir,
                splits=splits,
                min_answer_count=min_answer_count,
                glove=glove,
                use_vg=False,
                fp16=fp16,
                allow_missing_features=allow_missing_images,
                progress=progress,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    features_h5.unlink()

    # record how the features were made (to featurise new pictures alike); `viz` and `serve`
    # find the pictures in RAW/images, so RAW is the folder's parent when it is named images/
    for s in splits:
        with h5py.File(out_dir / "features" / f"{IMAGE_SPLIT[s]}.h5", "a") as f:
            for key, value in extractor.items():
                f.attrs[f"extractor_{key}"] = value
    manifest = read_manifest(out_dir)
    for s in splits:  # the user's files, not the temporary raw folder's names
        for kind, path in (("questions", questions), ("annotations", annotations)):
            manifest["sources"][f"{s} {kind}"] = {
                "path": str(path.resolve()),
                "bytes": path.stat().st_size,
            }
    manifest["raw_dir"] = str(images_dir.resolve().parent) if images_dir.name == "images" else None
    manifest["sources"]["features"] = {"images": str(images_dir.resolve())}
    manifest["images"] = {
        "dir": str(images_dir.resolve()),
        "id_rule": "the last number in the file name",
        **extractor,
        "featurised": info["images"],
        "skipped": [name for name, _ in info["skipped"]],
        "absent": absent,
        "val_fraction": val_fraction,
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1))
    dropped = [name for name, _ in info["skipped"]]
    if absent or dropped:
        warnings.warn(
            f"{out_dir}: questions dropped for {len(absent)} image id(s) without a picture "
            f"{absent[:10]} and {len(dropped)} picture(s) that do not decode {dropped[:10]}",
            stacklevel=2,
        )
    return out_dir
