"""What BAN looks at: pictures of its bilinear attention.

picture = visualize(predictor, "how many squares are there?", image_id=2000001)
picture.save("attention.png")   # the image with the top boxes of each glimpse, coloured by
                                # glimpse, beside each glimpse's region x word heatmap

`ImageFolder` finds an image's picture from its integer id only (never from a path given by a
user), under the raw folder that the prepared directory's manifest names.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ban.files import atomic_write
from ban.predict import Prediction, Predictor

# one colour per glimpse (matplotlib's tab10), as hex for the web page too
GLIMPSE_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
DPI = 100
HEATMAP_ROWS = 12  # regions shown per heatmap: the most attended of that glimpse


def glimpse_color(g: int) -> str:
    return GLIMPSE_COLORS[g % len(GLIMPSE_COLORS)]


class ImageFolder:
    """The pictures of a dataset: `<root>/<id>.png` or `.jpg` (the scene benchmark), or COCO's
    `<root>/<split>/COCO_<split>_<id:012d>.jpg`. File names are built from the integer id only."""

    PATTERNS = (
        "{id}.png",
        "{id}.jpg",
        "train2014/COCO_train2014_{id:012d}.jpg",
        "val2014/COCO_val2014_{id:012d}.jpg",
        "test2015/COCO_test2015_{id:012d}.jpg",
    )

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root).resolve() if root is not None else None

    @classmethod
    def for_data(cls, data_dir: str | os.PathLike, images: str | os.PathLike | None = None):
        """`images` when given, else `images/` in the raw folder named by `data_dir`'s
        manifest.json (absent folders are fine: pictures are then blank canvases)."""
        if images is not None:
            if not Path(images).is_dir():
                raise FileNotFoundError(f"image folder not found: {images}")
            return cls(images)
        manifest = Path(data_dir) / "manifest.json"
        raw = None
        if manifest.is_file():
            raw = json.loads(manifest.read_text(encoding="utf-8")).get("raw_dir")
        return cls(Path(raw) / "images" if raw else None)

    def path(self, image_id: int) -> Path | None:
        """The picture of `image_id`, or None. Only ids that are ints are accepted."""
        if self.root is None or isinstance(image_id, bool) or not isinstance(image_id, int):
            return None
        if image_id < 0:
            return None
        for pattern in self.PATTERNS:
            candidate = self.root / pattern.format(id=image_id)
            if candidate.is_file() and candidate.resolve().is_relative_to(self.root):
                return candidate
        return None

    def pictured(self, image_ids: Iterable[int]) -> set[int]:
        """Those of `image_ids` that have a picture: one listing of each folder of PATTERNS, then
        `path` for the names found (not one lookup per id: a dataset has tens of thousands)."""
        if self.root is None:
            return set()
        wanted, found = set(image_ids), set()
        for pattern in self.PATTERNS:
            folder, _, name = pattern.rpartition("/")
            prefix, _, rest = name.partition("{")
            suffix = rest.partition("}")[2]
            try:
                names = os.listdir(self.root / folder)
            except OSError:  # no such folder
                continue
            for entry in names:
                middle = entry[len(prefix) : len(entry) - len(suffix)]
                if entry.startswith(prefix) and entry.endswith(suffix) and middle.isdigit():
                    found.add(int(middle))
        return {i for i in found & wanted if self.path(i) is not None}

    def open(self, image_id: int, boxes: np.ndarray | None = None) -> Image.Image:
        """The picture as RGB; a blank canvas covering `boxes` when there is none."""
        path = self.path(image_id)
        if path is not None:
            with Image.open(path) as image:
                return image.convert("RGB")
        if boxes is not None and len(boxes):
            width, height = int(np.ceil(boxes[:, 2].max())), int(np.ceil(boxes[:, 3].max()))
        else:
            width, height = 320, 240
        return Image.new("RGB", (max(width, 16), max(height, 16)), (235, 235, 235))

    def png_bytes(self, image_id: int, boxes: np.ndarray | None = None) -> bytes:
        path = self.path(image_id)
        if path is not None and path.suffix == ".png":
            return path.read_bytes()
        buffer = io.BytesIO()
        self.open(image_id, boxes).save(buffer, format="PNG")
        return buffer.getvalue()


def attend(
    predictor: Predictor, question: str, image_id: int, top_k: int = 5, top_boxes: int = 3
) -> tuple[Prediction, np.ndarray]:
    """The prediction and the attention maps `[G, N, T]` (T: the question's words, no padding).

    The maps are those of `predictor`'s own forward pass, caught by a forward hook."""
    caught = []
    hook = predictor.model.register_forward_hook(lambda m, i, out: caught.append(out.attention))
    try:
        prediction = predictor(question, image_id, top_k=top_k, top_boxes=top_boxes)
    finally:
        hook.remove()
    attention = caught[-1][0].float().cpu().numpy()  # [G, N, T]
    return prediction, attention[:, :, : max(len(prediction.tokens), 1)]


def figure_size(glimpses: int) -> tuple[int, int]:
    """Pixel size (width, height) of a `render` picture with this many glimpses."""
    columns, rows = _grid(glimpses)
    return int(DPI * (5.0 + 3.0 * columns)), int(DPI * (1.8 + max(3.6, 3.6 * rows)))


def _grid(glimpses: int) -> tuple[int, int]:
    columns = min(glimpses, 4)
    return columns, math.ceil(glimpses / columns)


def render(
    prediction: Prediction,
    attention: np.ndarray,
    image: Image.Image,
    boxes: np.ndarray,
    truth: Sequence[str] | None = None,
) -> Image.Image:
    """The picture: `image` with the top boxes of each glimpse, and the heatmaps.

    `attention` `[G, N, T]`; `boxes` `[N, 4]` pixels; `truth` the human answers when known."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec
    from matplotlib.patches import Rectangle

    glimpses = attention.shape[0]
    columns, rows = _grid(glimpses)
    width, height = figure_size(glimpses)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    grid = GridSpec(
        rows,
        1 + columns,
        figure=figure,
        width_ratios=[5.0] + [3.0] * columns,
        left=0.03,
        right=0.98,
        top=1 - 0.8 / (height / DPI),
        bottom=0.9 / (height / DPI),
        wspace=0.3,
        hspace=0.6,
    )
    best = prediction.answers[0] if prediction.answers else ("?", 0.0)
    title = f"Q: {prediction.question}    A: {best[0]} ({best[1]:.2f})"
    if truth:
        common = max(set(truth), key=list(truth).count)
        mark = "right" if best[0] in truth else "wrong"
        title += f"    human: {common}  [{mark}]"
    figure.suptitle(title, fontsize=11, x=0.02, ha="left")

    ax = figure.add_subplot(grid[:, 0])
    ax.imshow(np.asarray(image))
    ax.set_axis_off()
    others = ", ".join(f"{a} {s:.2f}" for a, s in prediction.answers[1:4])
    ax.set_title(f"next: {others}" if others else "", fontsize=8, loc="left")
    for g, glimpse in enumerate(prediction.boxes):
        color = glimpse_color(g)
        for rank, box in enumerate(glimpse):
            x1, y1, x2, y2 = box.box
            ax.add_patch(
                Rectangle(
                    (x1, y1),
                    x2 - x1,
                    y2 - y1,
                    fill=False,
                    edgecolor=color,
                    linewidth=2.5 if rank == 0 else 1.2,
                    linestyle="-" if rank == 0 else "--",
                )
            )
            ax.text(
                x1 + 1,
                y1 + 1,
                f"g{g + 1} #{box.index}",
                fontsize=6,
                color="white",
                va="top",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1, "alpha": 0.85},
            )

    words = prediction.tokens or ["(empty)"]
    for g in range(glimpses):
        ax = figure.add_subplot(grid[g // columns, 1 + g % columns])
        mass = attention[g].sum(axis=1)
        order = np.argsort(-mass, kind="stable")[:HEATMAP_ROWS]
        ax.imshow(attention[g][order], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(words)))
        ax.set_xticklabels(words, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([f"#{i}" for i in order], fontsize=6)
        ax.set_title(f"glimpse {g + 1}", fontsize=9, color=glimpse_color(g))
        for spine in ax.spines.values():
            spine.set_edgecolor(glimpse_color(g))
            spine.set_linewidth(2)

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[:, :, :3].copy())


def visualize(
    predictor: Predictor,
    question: str,
    image_id: int,
    images: ImageFolder | None = None,
    top_boxes: int = 3,
    truth: Sequence[str] | None = None,
) -> Image.Image:
    """Answer `question` about `image_id` and draw where each glimpse looked."""
    images = images or ImageFolder.for_data(predictor.data_dir)
    prediction, attention = attend(predictor, question, image_id, top_boxes=top_boxes)
    boxes = predictor.region_features(int(image_id))[2]
    return render(prediction, attention, images.open(int(image_id), boxes), boxes, truth)


def plot_accuracy_by_type(
    by_type: dict[str, float], entries: Iterable[dict], out_dir: str | os.PathLike
) -> Path:
    """`out_dir/accuracy_by_question_type.png`: VQA accuracy (%) by question type (`by_type`, as
    in `ban.tasks.vqa.evaluate`'s report), most frequent type of `entries` (the questions) first."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = Counter(e.get("question_type") for e in entries)
    names = sorted(by_type, key=lambda k: (-counts.get(k, 0), k))
    figure = Figure(figsize=(8, 1.2 + 0.28 * max(len(names), 1)), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, [by_type[n] for n in names], color="#1f77b4")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{n} ({counts.get(n, 0)})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("VQA accuracy (%)")
    ax.set_title("accuracy by question type (questions)")
    figure.tight_layout()
    path = Path(out_dir) / "accuracy_by_question_type.png"
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


def gallery(
    predictor: Predictor,
    rows: Iterable[dict],
    entries: Iterable[dict],
    out_dir: str | os.PathLike,
    n: int,
    images: ImageFolder | None = None,
    seed: int = 0,
) -> list[Path]:
    """Pictures of `n` evaluated questions, half answered right (accuracy 1), half wrong
    (accuracy 0), as `out_dir/right-<question_id>.png` and `wrong-<question_id>.png`.

    `rows`: `ban.tasks.vqa.evaluate`'s predictions (with "accuracy"); `entries`: the questions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images or ImageFolder.for_data(predictor.data_dir)
    by_id = {e["question_id"]: e for e in entries}
    scored = [r for r in rows if "accuracy" in r and r["question_id"] in by_id]
    right = [r for r in scored if r["accuracy"] >= 1.0]
    wrong = [r for r in scored if r["accuracy"] == 0.0]
    rnd = random.Random(seed)
    rnd.shuffle(right)
    rnd.shuffle(wrong)
    take_wrong = min(len(wrong), n - min(len(right), n // 2))
    chosen = [("right", r) for r in right[: n - take_wrong]] + [
        ("wrong", r) for r in wrong[:take_wrong]
    ]
    paths = []
    with torch.no_grad():
        for kind, row in chosen:
            entry = by_id[row["question_id"]]
            picture = visualize(
                predictor, entry["question"], row["image_id"], images, truth=entry.get("answers")
            )
            path = out_dir / f"{kind}-{row['question_id']}.png"
            atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            paths.append(path)
    return paths
