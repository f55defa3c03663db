"""Every data path at fractions of the real sizes: time, throughput, peak memory, disk, growth.

Generates data in the real formats (VQA v2 / Visual Genome JSON, bottom-up TSV, GloVe text,
Flickr30k Entities files, PNG pictures), runs each step of the real path as its own process
(`nice -n 10`), and prints per step and size: wall and CPU seconds, throughput, the peak resident
memory of the largest process (`ru_maxrss` from wait4, DataLoader workers included) and the disk
written; then the growth exponent (log-log slope of time and memory against images or questions)
and the extrapolation to the real size.

    python benchmarks/scale.py                     # the default sizes (~50 min on 2 busy cores)
    python benchmarks/scale.py --steps questions --questions 0.05 0.1 0.2  # one step, quick
    python benchmarks/scale.py --features 0.002 0.004 0.008 --pictures 24 48 96 --json out.json

Sizes: `--features F...` fractions of the 123,287 COCO trainval images at 36 x 2048 (synth,
convert-features, prepare, loader, evaluate, train, Flickr30k); `--questions F...` fractions of
the VQA v2 + Visual Genome question counts (prepare with a real-size 400,000 x 300 GloVe file);
`--pictures N...` picture counts for `ban features extract` and `ban data from-images`;
`--steps captions --captions F...` fractions of Flickr30k Entities' images and captions (36 x 128
features), up to its full size.
Everything is written under `--root` (default /tmp/scale) and deleted at the end (`--keep`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The real sizes (docs/scale.md cites them)
VQA = {  # split: (questions, images)
    "train2014": (443_757, 82_783),
    "val2014": (214_354, 40_504),
    "test2015": (447_793, 81_434),
    "test-dev2015": (107_394, 36_807),  # test-dev's images are a subset of test2015's
}
TRAINVAL_IMAGES = 123_287
VG_PAIRS, VG_IMAGES, VG_COCO = 1_445_322, 108_077, 51_208
FLICKR_IMAGES, FLICKR_BOXES = 31_783, 275_775
GLOVE_WORDS, GLOVE_DIM = 400_000, 300
VOCAB = 19_900  # question words (the release's dictionary: 19,901 with padding)
ANSWER_POOL = 20_000  # answer strings; ~3,000 reach the release's count of 9
PYTHON = sys.executable
NICE = 10  # each step runs under `nice -n NICE` (added to this script's own niceness): --nice


# ---------------------------------------------------------------------------------------------
# measuring one step: a child process under nice, its rusage from wait4


def run(cmd: list[str], outputs: list[Path] = (), log: Path | None = None) -> dict:
    """Run ``cmd`` (niced), return wall and CPU seconds, peak RSS (MiB) and the disk of
    ``outputs`` (MiB); raise with its output's tail when it fails."""
    log = log or Path(os.environ.get("SCALE_ROOT", "/tmp/scale")) / "last.log"
    with open(log, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            ["nice", "-n", str(NICE), *map(str, cmd)], stdout=out, stderr=out
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({process.returncode}):\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
        "disk_mib": sum(du(p) for p in outputs) / 2**20,
        "output": log.read_bytes()[-4000:].decode("utf-8", "replace"),
    }


def du(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (the growth exponent)."""
    if len(xs) < 2 or min(ys) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ---------------------------------------------------------------------------------------------
# generators of the real formats at any size (fast: the questions at full size in a minute)


def _words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(n)]  # 8 characters each


def _zipf(rng: np.random.Generator, n: int, size, a: float = 1.3) -> np.ndarray:
    return (rng.zipf(a, size) - 1) % n


def _dump_list(path: Path, head: dict, key: str, records) -> None:
    """``{**head, key: [records...]}`` as JSON, written in chunks (constant memory)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head)[:-1] + f', "{key}": [')
        first = True
        for chunk in records:
            if chunk:
                f.write(("" if first else ", ") + json.dumps(chunk)[1:-1])
                first = False
        f.write("]}")


def write_vqa(
    raw: Path, fraction: float, seed: int = 0, splits: dict[str, float] | None = None
) -> dict[str, list[int]]:
    """VQA v2 question and annotation files with ``fraction`` of the real counts (``splits``:
    only these splits, at their own fractions); returns the image ids of each image split."""
    rng = np.random.default_rng(seed)
    words, answers = _words("w", VOCAB), _words("a", ANSWER_POOL)
    info = {"info": {"description": "ban scale benchmark"}, "license": {}, "data_type": "mscoco"}
    ids = {}
    offsets = {"train2014": 1_000_000, "val2014": 2_000_000, "test2015": 3_000_000}
    splits = splits or dict.fromkeys(offsets, fraction)
    for split, offset in offsets.items():
        if split not in splits:
            continue
        n_q, n_img = (max(1, round(splits[split] * v)) for v in VQA[split])
        image_ids = offset + np.arange(n_img)
        ids[split] = image_ids.tolist()
        per = np.full(n_img, n_q // n_img)
        per[: n_q - per.sum()] += 1
        q_image = np.repeat(image_ids, per)
        q_id = q_image * 10 + np.concatenate([np.arange(k) for k in per])
        lengths = rng.integers(4, 12, n_q)
        word_ids = _zipf(rng, VOCAB, int(lengths.sum()))
        ends = np.cumsum(lengths)
        texts = [
            " ".join(words[w] for w in word_ids[e - n : e]) + "?"
            for n, e in zip(lengths.tolist(), ends.tolist(), strict=True)
        ]

        def questions(select, q_image=q_image, q_id=q_id, texts=texts):
            for start in range(0, len(select), 20_000):
                part = select[start : start + 20_000]
                yield [
                    {"image_id": int(q_image[i]), "question": texts[i], "question_id": int(q_id[i])}
                    for i in part
                ]

        every = np.arange(n_q)
        head = {**info, "task_type": "Open-Ended", "data_subtype": split}
        _dump_list(
            raw / f"v2_OpenEnded_mscoco_{split}_questions.json", head, "questions", questions(every)
        )
        if split == "test2015":
            dev_images = image_ids[: max(1, round(splits[split] * VQA["test-dev2015"][1]))]
            dev = every[q_image <= dev_images[-1]]
            head = {**head, "data_subtype": "test-dev2015"}
            path = raw / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
            _dump_list(path, head, "questions", questions(dev))
            continue
        best = _zipf(rng, ANSWER_POOL, n_q)
        noise = _zipf(rng, ANSWER_POOL, (n_q, 10))
        agree = rng.random((n_q, 10)) < 0.7

        def annotations(q_image=q_image, q_id=q_id, best=best, noise=noise, agree=agree):
            for start in range(0, len(q_id), 20_000):
                chunk = []
                for i in range(start, min(start + 20_000, len(q_id))):
                    given = [
                        answers[best[i] if a else n]
                        for a, n in zip(agree[i], noise[i], strict=True)
                    ]
                    chunk.append(
                        {
                            "question_type": "what is",
                            "multiple_choice_answer": answers[best[i]],
                            "answers": [
                                {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(given)
                            ],
                            "image_id": int(q_image[i]),
                            "answer_type": "other",
                            "question_id": int(q_id[i]),
                        }
                    )
                yield chunk

        path = raw / f"v2_mscoco_{split}_annotations.json"
        _dump_list(path, {**info, "data_subtype": split}, "annotations", annotations())
    return ids


def write_vg(raw: Path, fraction: float, coco_ids: list[int], seed: int = 1) -> None:
    """Visual Genome ``question_answers.json`` and ``image_data.json`` at ``fraction``."""
    rng = np.random.default_rng(seed)
    (raw / "vg").mkdir(parents=True, exist_ok=True)
    words, answers = _words("w", VOCAB), _words("a", ANSWER_POOL)
    n_img, n_pairs = round(fraction * VG_IMAGES), round(fraction * VG_PAIRS)
    n_coco = min(round(fraction * VG_COCO), len(coco_ids))
    coco = rng.choice(coco_ids, n_coco, replace=False)
    images = [
        {"image_id": i + 1, "coco_id": int(coco[i]) if i < n_coco else None, "width": 800}
        for i in range(n_img)
    ]
    (raw / "vg" / "image_data.json").write_text(json.dumps(images), encoding="utf-8")
    owner = np.sort(rng.integers(0, n_img, n_pairs))
    lengths = rng.integers(4, 10, n_pairs)
    word_ids, ends = _zipf(rng, VOCAB, int(lengths.sum())), np.cumsum(lengths)
    best = _zipf(rng, ANSWER_POOL, n_pairs)
    bounds = np.searchsorted(owner, np.arange(n_img + 1))
    with open(raw / "vg" / "question_answers.json", "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n_img):
            qas = [
                {
                    "a_objects": [],
                    "question": " ".join(words[w] for w in word_ids[ends[k] - lengths[k] : ends[k]])
                    + "?",
                    "image_id": i + 1,
                    "qa_id": int(k + 1),
                    "answer": answers[best[k]] + ".",
                    "q_objects": [],
                }
                for k in range(bounds[i], bounds[i + 1])
            ]
            f.write(("" if i == 0 else ", ") + json.dumps({"id": i + 1, "qas": qas}))
        f.write("]")


def write_glove(path: Path, words: int = GLOVE_WORDS, dim: int = GLOVE_DIM, seed: int = 2) -> None:
    """A GloVe text file of the real size: the question words first, then fillers; 8-character
    words and values (``+0.12345``), so the rows are built as byte arrays."""
    rng = np.random.default_rng(seed)
    table = np.frombuffer(
        b"".join(f" {v:+.5f}".encode() for v in rng.uniform(-1, 1, 4096)), np.uint8
    ).reshape(4096, 9)
    names = _words("w", VOCAB) + _words("z", words - VOCAB)
    with open(path, "wb") as f:
        for start in range(0, words, 20_000):
            block = names[start : start + 20_000]
            word = np.frombuffer("".join(block).encode(), np.uint8).reshape(len(block), 8)
            values = table[rng.integers(0, 4096, (len(block), dim))].reshape(len(block), dim * 9)
            newline = np.full((len(block), 1), ord("\n"), np.uint8)
            f.write(np.concatenate([word, values, newline], axis=1).tobytes())


def write_small_tsv(path: Path, image_ids: list[int], boxes: int = 10, dim: int = 4) -> None:
    """Bottom-up TSV rows with few, small features (the question-size runs of prepare and
    evaluate); every image has the same features."""
    from ban.data.features import Region, write_tsv

    rng = np.random.default_rng(3)
    box = np.tile(np.asarray([[0, 0, 10, 10]], np.float32), (boxes, 1))
    feats = rng.random((boxes, dim), dtype=np.float32)
    write_tsv(path, (Region(int(i), 100.0, 100.0, box, feats) for i in image_ids))


# ---------------------------------------------------------------------------------------------
# the steps


def ban(*args) -> list[str]:
    return [PYTHON, "-m", "ban.cli", *args]


def step_features(root: Path, fractions: list[float], rows: list[dict], args) -> dict[float, Path]:
    """synth, convert-features, prepare (features), Flickr30k, loader, train, evaluate."""
    prepared = {}
    for fraction in fractions:
        n = max(20, round(fraction * TRAINVAL_IMAGES))
        n_train, n_val = round(0.67 * n), n - round(0.67 * n)  # 82,783 : 40,504
        raw = root / f"feat-{n}"
        m = run(
            ban(
                "data", "synth", "--out", raw, "--train-images", n_train, "--val-images", n_val,
                "--test-images", 0, "--no-images", "--feature-dim", 2048, "--boxes", 36,
                "--quiet",
            ),
            [raw],
        )  # fmt: skip
        rows.append(row("synth (36 x 2048)", n, "images", m, TRAINVAL_IMAGES))
        tsvs = sorted((raw / "features").glob("*.tsv"))
        h5 = root / f"conv-{n}.h5"
        m = run(ban("data", "convert-features", *tsvs, "--out", h5, "--quiet"), [h5])
        m["tsv_mib"] = sum(du(p) for p in tsvs) / 2**20
        rows.append(row("convert-features", n, "images", m, TRAINVAL_IMAGES))
        h5.unlink()
        data = root / f"prep-{n}"
        m = run(
            ban("data", "prepare", raw, "--out", data, "--no-vg", "--min-answer-count", 1),
            [data],
        )
        rows.append(row("prepare (features)", n, "images", m, TRAINVAL_IMAGES))
        prepared[fraction] = data
        flickr = root / f"flickr-{n}"
        code = "import sys; from ban.data.flickr import prepare_flickr as p; p(*sys.argv[1:])"
        m = run([PYTHON, "-c", code, raw, flickr], [flickr])
        rows.append(row("Flickr30k Entities prepare", n, "images", m, FLICKR_IMAGES))
        shutil.rmtree(flickr)
        for name in ("images", "flickr30k"):
            shutil.rmtree(raw / name, ignore_errors=True)
        for tsv in tsvs:  # the converted copy in prepared/ is what the next steps read
            tsv.unlink()
    return prepared


def step_captions(root: Path, fractions: list[float], rows: list[dict], args) -> None:
    """Flickr30k Entities preparation at fractions of its real size in images, captions and
    boxes (29,783 / 1,000 / 1,000 at 1.0), with 36 x 128 features so that the captions and
    annotations, not the features, are what grows (the feature rows above are the 2048-d ones)."""
    for fraction in sorted(fractions):
        n_val = n_test = max(10, round(fraction * 1_000))
        n_train = max(20, round(fraction * FLICKR_IMAGES)) - 2 * n_val
        n = n_train + 2 * n_val
        raw = root / f"captions-{n}"
        m = run(
            ban(
                "data", "synth", "--out", raw, "--train-images", n_train, "--val-images", n_val,
                "--test-images", n_test, "--no-images", "--quiet",
            ),
            [raw],
        )  # fmt: skip
        rows.append(row("synth (36 x 128, captions)", n, "images", m, FLICKR_IMAGES))
        flickr = root / f"captions-prepared-{n}"
        code = "import sys; from ban.data.flickr import prepare_flickr as p; p(*sys.argv[1:])"
        m = run([PYTHON, "-c", code, raw, flickr], [flickr])
        splits = json.loads((flickr / "manifest.json").read_text())["splits"].values()
        captions, phrases = (sum(split[k] for split in splits) for k in ("captions", "phrases"))
        print(f"  prepared {n:,} images: {captions:,} captions, {phrases:,} phrases", flush=True)
        rows.append(row("Flickr30k Entities prepare (captions)", n, "images", m, FLICKR_IMAGES))
        shutil.rmtree(flickr)
        shutil.rmtree(raw)


LOADER = r"""
import json, os, sys, time
import torch
from torch.utils.data import DataLoader
from ban.data.vqa import VQADataset, collate
data, workers, mode, batches = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
h5 = os.path.join(data, "features", "train2014.h5")
if mode == "cold":  # evict the file from the page cache (drop_caches needs root's /proc/sys)
    fd = os.open(h5, os.O_RDONLY); os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
start = time.perf_counter()
ds = VQADataset(data, "train2014", in_memory=mode == "in_memory")
opened = time.perf_counter() - start
torch.manual_seed(0)
loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=workers, collate_fn=collate)
n, start = 0, time.perf_counter()
for i, batch in enumerate(loader):
    n += len(batch["question_id"])
    if i + 1 == batches:
        break
print(json.dumps({"examples": n, "seconds": time.perf_counter() - start, "open_s": opened}))
"""


def step_loader(root: Path, prepared: dict[float, Path], rows: list[dict], args) -> None:
    """The training DataLoader at 36 x 2048: per worker count, cold (evicted) and warm, and
    with in_memory."""
    for fraction, data in prepared.items():
        n = json.loads((data / "manifest.json").read_text())["splits"]["train2014"]["questions"]
        configs = [(0, "warm"), (0, "cold"), (2, "warm"), (2, "cold"), (0, "in_memory")]
        if fraction == max(prepared):
            configs += [(1, "warm"), (4, "warm")]
        for workers, mode in configs:
            m = run([PYTHON, "-c", LOADER, data, workers, mode, args.loader_batches], [])
            out = json.loads(m["output"].strip().splitlines()[-1])
            m["wall_s"] = out["seconds"] + (out["open_s"] if mode == "in_memory" else 0)
            m["examples"] = out["examples"]
            name = f"loader {mode}, {workers} workers"
            rows.append(row(name, out["examples"], "questions", m, None, size_images=n))


def step_train_evaluate(root: Path, prepared: dict[float, Path], rows: list[dict], args) -> None:
    """`ban train --max-steps` at paper size (ban-8-vqa, batch 256) and `ban evaluate`."""
    data = prepared[max(prepared)]
    run_dir = root / "run"
    m = run(
        ban(
            "train", "--data", data, "--model", "ban-8-vqa", "--max-steps", args.train_steps,
            "--batch-size", 256, "--eval-split", "none", "--out", run_dir, "--quiet",
            "--set", "log_every=1", "--num-workers", 2,
        ),
        [run_dir],
    )  # fmt: skip
    steps = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"step"' in line
    ]
    speeds = [s["examples_per_s"] for s in steps if s.get("kind") == "step" and s["step"] > 1]
    m["examples_per_s"] = float(np.median(speeds)) if speeds else float("nan")
    rows.append(row("train ban-8-vqa (batch 256)", args.train_steps * 256, "questions", m, None))
    # a checkpoint evaluates the data it was trained on: two sizes from its two splits
    for split in ("val2014", "train2014"):
        n = json.loads((data / "manifest.json").read_text())["splits"][split]["questions"]
        out = root / f"eval-{n}"
        m = run(ban("evaluate", run_dir, "--data", data, "--split", split, "--out", out), [out])
        rows.append(row("evaluate ban-8-vqa", n, "questions", m, VQA["val2014"][0]))


PICTURE_FILES = (
    ("v2_OpenEnded_mscoco_train2014_questions.json", "questions"),
    ("v2_mscoco_train2014_annotations.json", "annotations"),
)


def _picture_subset(raw: Path, n: int, out: Path) -> Path:
    """The first ``n`` pictures of ``raw/images`` (symbolic links) with their questions."""
    images = sorted((raw / "images").glob("*.png"), key=lambda p: int(p.stem))[:n]
    if len(images) < n:
        raise ValueError(f"{raw}/images holds {len(images)} pictures, fewer than {n}")
    ids = {int(p.stem) for p in images}
    (out / "images").mkdir(parents=True)
    for path in images:
        os.symlink(path.resolve(), out / "images" / path.name)
    for name, key in PICTURE_FILES:
        data = json.loads((raw / name).read_text(encoding="utf-8"))
        data[key] = [x for x in data[key] if x["image_id"] in ids]
        if {x["image_id"] for x in data[key]} != ids:  # from-images would featurise again
            raise ValueError(f"{raw / name}: some of the first {n} pictures have no question")
        (out / name).write_text(json.dumps(data), encoding="utf-8")
    return out


def kill_and_resume(cmd: list, partial: Path, after_s: float, outputs: list[Path]) -> dict:
    """Run ``cmd``, ``kill -9`` it after ``after_s`` seconds, run it again to the end: the two
    runs' wall and CPU summed, the larger peak RSS, and what the killed run had checkpointed."""
    import h5py

    log = Path(os.environ.get("SCALE_ROOT", "/tmp/scale")) / "killed.log"
    with open(log, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            ["nice", "-n", str(NICE), *map(str, cmd)], stdout=out, stderr=out
        )
        try:
            process.wait(after_s)
            raise RuntimeError(f"{cmd} ended before the kill at {after_s} s: give a smaller one")
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
        _, _, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    checkpointed = 0  # killed before its first checkpoint: nothing to go on from
    if partial.exists():
        with h5py.File(partial, "r") as f:
            checkpointed = int(f.attrs.get("done_images", 0))
    m = run(cmd, outputs)
    resumed = [line for line in m["output"].splitlines() if "resuming" in line]
    print(f"  killed after {wall:.0f} s with {checkpointed:,} pictures checkpointed; rerun: "
          f"{resumed[-1] if resumed else 'NO resume line'}", flush=True)  # fmt: skip
    m["killed_wall_s"], m["checkpointed"] = wall, checkpointed
    m["wall_s"] += wall
    m["cpu_s"] += usage.ru_utime + usage.ru_stime
    m["rss_mib"] = max(m["rss_mib"], usage.ru_maxrss / 1024)
    return m


def same_features(a_h5: Path, b_h5: Path) -> tuple[int, float]:
    """Images compared and the largest absolute difference between the features of two
    feature files, over the images of ``b_h5`` that ``a_h5`` holds too."""
    import h5py

    with h5py.File(a_h5, "r") as a, h5py.File(b_h5, "r") as b:
        rows = dict(zip(a["image_ids"][()].tolist(), a["pos_boxes"][()].tolist(), strict=True))
        ids, pos = b["image_ids"][()].tolist(), b["pos_boxes"][()]
        n, worst = 0, 0.0
        for k, image_id in enumerate(ids):
            if image_id not in rows:
                continue
            first, last = rows[image_id]
            mine, theirs = (
                a["image_features"][first:last],
                b["image_features"][pos[k][0] : pos[k][1]],
            )
            worst = max(worst, float(np.abs(mine - theirs).max()))
            n += 1
    return n, worst


def step_pictures(root: Path, counts: list[int], rows: list[dict], args) -> None:
    """`ban features extract` and `ban data from-images` (EfficientNet-Lite0, 320 px, 7 x 7) on
    the first N of one set of generated pictures (made once, at the largest N; reused when
    ROOT/pics exists). from-images is run on the extraction just made (its resume key matches,
    so it is not featurised again): its row is what comes after the extraction (the TSV and
    `prepare`); a from-images from scratch costs the two rows together. With ``--kill-after
    S``, the largest extraction is killed (``kill -9``) after S seconds and run again, and its
    features are compared with those of the next smaller extraction (the same pictures)."""
    raw = root / "pics"
    if not (raw / "images").is_dir():
        run(
            ban(
                "data", "synth", "--out", raw, "--train-images", max(counts), "--val-images", 0,
                "--test-images", 0, "--feature-dim", 8, "--workers", 1, "--quiet",
            )
        )  # fmt: skip
    reference = root / "reference.h5"
    for n in sorted(counts):
        sub = _picture_subset(raw, n, root / f"pics-{n}")
        data = root / f"fromimg-{n}"
        out = root / f".{data.name}.features.h5"  # where from-images looks for its extraction
        cmd = ban("features", "extract", "--images", sub / "images", "--out", out, "--quiet")
        killed = args.kill_after and n == max(counts)
        if killed:
            partial = out.with_name(out.name + ".partial")
            m = kill_and_resume(cmd, partial, args.kill_after, [out])
        else:
            m = run(cmd, [out])
        name = "features extract (lite0 320 px)"  # killed: the two runs' time together
        rows.append(row(name, n, "images", m, TRAINVAL_IMAGES, killed=bool(killed)))
        if killed and reference.exists():
            compared, worst = same_features(out, reference)
            print(f"  resumed extraction vs the uninterrupted one of {reference}: {compared:,} "
                  f"images, largest difference {worst:g}", flush=True)  # fmt: skip
        reference.unlink(missing_ok=True)
        os.link(out, reference)  # from-images deletes its extraction when done
        m = run(
            ban(
                "data", "from-images", "--images", sub / "images", "--questions",
                sub / PICTURE_FILES[0][0], "--annotations", sub / PICTURE_FILES[1][0],
                "--out", data, "--val-fraction", 0.2, "--quiet",
            ),
            [data],
        )  # fmt: skip
        if out.exists():
            raise RuntimeError(f"from-images left {out}: it did not end")
        rows.append(row("data from-images after the extraction", n, "images", m, TRAINVAL_IMAGES))
        shutil.rmtree(data)
        shutil.rmtree(sub)
    reference.unlink(missing_ok=True)


def _cut_split(data: Path, split: str, n: int, out: Path) -> Path:
    """A prepared directory whose ``split`` holds its first ``n`` questions: the other files
    are links to ``data``'s (the same dictionary and answers, so one checkpoint fits all)."""
    out.mkdir(parents=True)
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    name = manifest["splits"][split]["file"]
    for path in data.iterdir():
        if path.name not in (name, "manifest.json"):
            os.symlink(path.resolve(), out / path.name)
    with open(data / name, encoding="utf-8") as f, open(out / name, "w", encoding="utf-8") as g:
        for _, line in zip(range(n), f, strict=False):
            g.write(line)
    manifest["splits"][split]["questions"] = n
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def step_evaluate(root: Path, fractions: list[float], rows: list[dict], args) -> None:
    """`ban evaluate` on val2014 at fractions of its 214,354 questions (40,504 images): data in
    the real format (the questions and annotations at full size, 36 x 128 features), a
    `ban-small` model trained for a few steps, so what is measured is the evaluation's path
    (dataset, batches, predictions, the official metric, the report and its files)."""
    raw, data = root / "evalraw", root / "evaldata"
    if not (data / "manifest.json").is_file():
        (raw / "features").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ids = write_vqa(raw, 1.0, splits={"train2014": 0.02, "val2014": max(fractions)})
        write_small_tsv(raw / "features" / "small.tsv", ids["train2014"] + ids["val2014"], 36, 128)
        print(f"generated {raw} ({du(raw) / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
        m = run(ban("data", "prepare", raw, "--out", data, "--quiet"), [data])
        print(f"  prepared {data}: {m['wall_s']:.0f} s, cpu {m['cpu_s']:.0f} s, "
              f"rss {m['rss_mib']:.0f} MiB", flush=True)  # fmt: skip
        shutil.rmtree(raw)
    run_dir = root / "evalrun"
    if not (run_dir / "last.safetensors").is_file():
        run(
            ban(
                "train", "--data", data, "--model", "ban-small", "--max-steps", 5,
                "--batch-size", 64, "--eval-split", "none", "--out", run_dir, "--quiet",
            )
        )  # fmt: skip
    total = json.loads((data / "manifest.json").read_text())["splits"]["val2014"]["questions"]
    for fraction in sorted(fractions):
        n = round(fraction / max(fractions) * total)
        cut = _cut_split(data, "val2014", n, root / f"evaldata-{n}")
        out = root / f"eval-{n}"
        m = run(
            ban(
                "evaluate", run_dir, "--data", cut, "--split", "val2014", "--out", out,
                "--num-workers", args.eval_workers,
            ),
            [out],
        )  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        if report["questions"] != n:
            raise RuntimeError(f"{out}: {report['questions']} questions evaluated, not {n}")
        rows.append(row("evaluate ban-small (36 x 128)", n, "questions", m, VQA["val2014"][0]))
        shutil.rmtree(out)
        shutil.rmtree(cut)


def step_questions(root: Path, fractions: list[float], rows: list[dict], args) -> None:
    """`ban data prepare` with VQA v2 (all four splits) + Visual Genome + GloVe 400,000 x 300."""
    glove = root / "glove.6B.300d.txt"
    start = time.perf_counter()
    write_glove(glove)
    print(f"generated {glove} ({du(glove) / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    full = sum(q for q, _ in VQA.values()) + VG_PAIRS
    for fraction in fractions:
        raw = root / f"q-{fraction:g}"
        (raw / "features").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ids = write_vqa(raw, fraction)
        write_vg(raw, fraction, ids["train2014"] + ids["val2014"])
        write_small_tsv(raw / "features" / "small.tsv", [i for v in ids.values() for i in v])
        print(
            f"generated {raw} ({du(raw) / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        data = root / f"qprep-{fraction:g}"
        m = run(ban("data", "prepare", raw, "--out", data, "--glove", glove), [data])
        n = round(fraction * full)
        rows.append(row("prepare VQA v2 + VG + GloVe", n, "questions", m, full))
        shutil.rmtree(data)
        shutil.rmtree(raw)
    glove.unlink()


# ---------------------------------------------------------------------------------------------
# reporting


def row(step: str, size: int, unit: str, m: dict, real: int | None, **extra) -> dict:
    r = {"step": step, "size": size, "unit": unit, "real": real, "load": os.getloadavg()[0]}
    r.update({k: v for k, v in m.items() if k != "output"}, **extra)
    print(
        f"  {step:34s} {size:>9,} {unit:9s} {r['wall_s']:8.1f} s  cpu {r['cpu_s']:7.1f} s  "
        f"{size / max(r['wall_s'], 1e-9):9.1f} {unit}/s  "
        f"cpu/item {1000 * r['cpu_s'] / size:8.2f} ms  rss {r['rss_mib']:7.0f} MiB  "
        f"disk {r['disk_mib']:8.0f} MiB  load {r['load']:.1f}",
        flush=True,
    )
    return r


def _linear(sizes: list[int], values: list[float], at: int) -> float:
    """``a + b * at`` fitted to the points (a fixed start-up cost plus a cost per item); never
    below the largest measured value."""
    if len(sizes) < 2:
        return values[-1] * at / sizes[-1]
    b, a = np.polyfit(sizes, values, 1)
    return max(float(a + b * at), values[-1])


def summary(rows: list[dict]) -> str:
    lines = [
        "",
        "growth: the log-log slope of wall time and peak RSS against the size (1 = linear, "
        "0 = constant; small sizes are dominated by start-up). Real size: a + b * size fitted "
        "to the points; disk: linear.",
        f"{'step':34s} {'sizes':>24s} {'time exp':>8s} {'mem exp':>8s} "
        f"{'real size':>10s} {'time (real)':>12s} {'RSS (real)':>11s} {'disk (real)':>12s}",
    ]
    for step in dict.fromkeys(r["step"] for r in rows):
        runs = sorted((r for r in rows if r["step"] == step), key=lambda r: r["size"])
        sizes = [r["size"] for r in runs]
        t_exp = slope(sizes, [r["wall_s"] for r in runs])
        m_exp = slope(sizes, [r["rss_mib"] for r in runs])
        real, last = runs[-1]["real"], runs[-1]
        shown = ", ".join(f"{s:,}" for s in sizes[-3:])
        if real is None:
            lines.append(f"{step:34s} {shown:>24s} {t_exp:8.2f} {m_exp:8.2f}")
            continue
        t_real = _linear(sizes, [r["wall_s"] for r in runs], real)
        # memory: flat (exponent below 0.3) carries over as the largest measured; else fitted
        rss = [r["rss_mib"] for r in runs]
        m_real = _linear(sizes, rss, real) if m_exp >= 0.3 else max(rss)  # nan: one size
        d_real = last["disk_mib"] * real / last["size"]
        lines.append(
            f"{step:34s} {shown:>24s} {t_exp:8.2f} {m_exp:8.2f} {real:>10,} "
            f"{t_real / 60:10.1f} m {m_real / 1024:9.2f} G {d_real / 1024:10.1f} G"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/scale", help="where the data is generated")
    parser.add_argument(
        "--steps",
        nargs="+",
        default=["questions", "features", "loader", "train", "pictures", "evaluate"],
        choices=["questions", "features", "loader", "train", "pictures", "evaluate", "captions"],
    )
    parser.add_argument("--features", nargs="+", type=float, default=[0.002, 0.004, 0.008])
    parser.add_argument("--questions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    parser.add_argument("--pictures", nargs="+", type=int, default=[24, 48, 96])
    parser.add_argument(
        "--captions",
        nargs="+",
        type=float,
        default=[0.1, 0.3, 1.0],
        help="fractions of Flickr30k Entities' 31,783 images (and their captions) to prepare",
    )
    parser.add_argument(
        "--evaluate",
        nargs="+",
        type=float,
        default=[0.1, 0.3, 1.0],
        help="fractions of val2014's 214,354 questions for `ban evaluate`",
    )
    parser.add_argument("--eval-workers", type=int, default=0, help="ban evaluate --num-workers")
    parser.add_argument(
        "--kill-after",
        type=float,
        help="pictures: kill -9 the largest extraction after this many seconds and resume it",
    )
    parser.add_argument("--loader-batches", type=int, default=20, help="batches of 256 per run")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--nice", type=int, default=10, help="niceness added to each step's process (10)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()
    global NICE
    NICE = args.nice
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["SCALE_ROOT"] = str(root)
    print(f"load average at start: {os.getloadavg()}; CPUs {os.cpu_count()}", flush=True)
    rows: list[dict] = []
    try:
        if "questions" in args.steps:
            step_questions(root, args.questions, rows, args)
        prepared = {}
        if {"features", "loader", "train"} & set(args.steps):
            prepared = step_features(root, args.features, rows, args)
        if "loader" in args.steps:
            step_loader(root, prepared, rows, args)
        if "train" in args.steps:
            step_train_evaluate(root, prepared, rows, args)
        if "pictures" in args.steps:
            step_pictures(root, args.pictures, rows, args)
        if "evaluate" in args.steps:
            step_evaluate(root, args.evaluate, rows, args)
        if "captions" in args.steps:
            step_captions(root, args.captions, rows, args)
    finally:
        print(summary(rows))
        print(f"load average at end: {os.getloadavg()}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
