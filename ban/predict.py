"""Answer questions about images of a prepared dataset: `ban.Predictor`.

predictor = Predictor.from_checkpoint("runs/x/best.safetensors", data="DATA")
result = predictor("how many cubes are there?", image_id=42)
result.answers        # [("2", 0.93), ("3", 0.05), ...]   top-k answers, sigmoid scores
result.boxes[g]       # the most attended boxes of glimpse g: index, x1 y1 x2 y2, weight

The model is answered with through a frozen inference copy (`ban.inference`) in `precision`:
'fp32', 'bf16', 'int8', or 'auto' (the default: bf16 or int8 where the CPU runs it fastest, fp32
for small models; `ban.inference.choose_precision`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ban.checkpoint import load_any
from ban.data.features import FeatureStore, spatial_features
from ban.data.images import data_extractor
from ban.engine.runs import resolve_checkpoint
from ban.inference import inference_model
from ban.tasks.vqa import resolve_data
from ban.text import MAX_LENGTH, UNK, Dictionary, tokenize

MAX_QUESTION = 300  # characters of a question (the model reads its first MAX_LENGTH words)


# Bytes of visual projections a Predictor keeps (`ban.inference.ImageCache`): at the paper's size
# about 2 MB an image in fp32 and int8 (36 boxes x (3840 + 8 x 1280)), so the last ~126 images.
IMAGE_CACHE_BYTES = 256 * 2**20


class QuestionError(ValueError):
    """A question refused by `check_question` (the API answers it with 400)."""


class UnknownImageError(KeyError, ValueError):
    """An image id with no features in the prepared data (or no uploaded picture of that id).
    A KeyError for lookups, a ValueError for the command line's error messages."""

    def __str__(self) -> str:  # the message as it stands, without KeyError's quotes
        return str(self.args[0]) if self.args else ""


def check_question(question: object) -> str:
    """The question, stripped of surrounding spaces, or `QuestionError`: the one rule that the
    command line (`ban predict`, `ban visualize`), `Predictor` and the API all apply. A question
    is a string with at least one word and at most `MAX_QUESTION` characters. Words past the
    first `MAX_LENGTH` (14, the release's) are read by no model: see `ignored_words`."""
    if not isinstance(question, str):
        raise QuestionError("question must be a string")
    question = question.strip()
    if not question:
        raise QuestionError("question is empty")
    if len(question) > MAX_QUESTION:
        raise QuestionError(
            f"question is too long: {len(question)} characters, at most {MAX_QUESTION}"
        )
    if not tokenize(question):
        raise QuestionError(f"question has no words: {question!r}")
    return question


def ignored_words(question: str) -> list[str]:
    """The words of `question` past the first `MAX_LENGTH`, which the model does not read."""
    return tokenize(question)[MAX_LENGTH:]


@dataclass
class AttendedBox:
    index: int  # row of the box in the image's features
    box: list[float]  # x1, y1, x2, y2 in pixels (normalised to [0, 1] when pixels are unknown)
    weight: float  # attention mass of the box in this glimpse (summed over tokens)


@dataclass
class Prediction:
    question: str
    image_id: int
    tokens: list[str]  # the question as the model reads it (unknown words shown as <unk>)
    answers: list[tuple[str, float]]  # top-k (answer, sigmoid score), best first
    boxes: list[list[AttendedBox]] = field(default_factory=list)  # per glimpse, best first

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "image_id": self.image_id,
            "tokens": self.tokens,
            "answers": [{"answer": a, "score": s} for a, s in self.answers],
            "boxes": [[box.__dict__ for box in glimpse] for glimpse in self.boxes],
        }


class Predictor:
    """A model plus the question dictionary and region features of one prepared directory.

    `precision` ('auto', 'fp32', 'bf16', 'int8') is the dtype the model's copy is kept and run
    in (`ban.inference.inference_model`); `self.precision` is the one chosen. The visual
    projections of the images last asked about are kept, up to `image_cache_bytes`
    (`ban.inference.ImageCache`; 0: none), so that a further question about an image costs a
    fraction of the first (`self.model.image_cache`).
    """

    def __init__(
        self,
        model: nn.Module,
        data: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        image_cache_bytes: int = IMAGE_CACHE_BYTES,
    ) -> None:
        if data is None:
            raise ValueError(
                "Predictor needs the prepared data directory the model was trained on (data=...; "
                "Predictor.from_checkpoint finds a run's own)"
            )
        self.device = torch.device(device)
        self.model = inference_model(model, precision, self.device, image_cache_bytes)
        self.precision = self.model.precision
        self.data_dir = resolve_data(data)
        words = model.vocabulary
        if words is None:
            words = Dictionary.load(self.data_dir / "dictionary.json").words
        release_unk = "unknown_word_index" in getattr(model, "notes", {}) or UNK not in words
        self.dictionary = Dictionary(words, release_unk=release_unk)
        if len(self.dictionary) != model.config.vocab_size:
            raise ValueError(
                f"the model has {model.config.vocab_size} words, its dictionary {len(words)}"
            )
        self.answers = model.answers
        if self.answers is None:
            self.answers = json.loads((self.data_dir / "answers.json").read_text())
        if len(self.answers) != model.config.num_answers:
            raise ValueError(
                f"the model has {model.config.num_answers} answers, the answer list "
                f"{len(self.answers)}"
            )
        self._stores = None
        self._pictures: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._next_picture = -1  # the id of the next picture added without one
        self._extractor = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        data: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dictionary: str | os.PathLike | None = None,
        label2ans: str | os.PathLike | None = None,
        precision: str = "auto",
        image_cache_bytes: int = IMAGE_CACHE_BYTES,
    ) -> Predictor:
        """Load a run directory or a checkpoint in one (its best checkpoint, on the run's data
        unless `data` is given),
        this project's checkpoint, or one of the original release (through `ban.load_official`,
        with its `dictionary.pkl` / `trainval_label2ans.pkl` when given), for inference in
        `precision` (`ban.inference`), keeping up to `image_cache_bytes` of visual projections."""
        checkpoint, run_config = resolve_checkpoint(path)
        if data is None and run_config is None:
            raise ValueError(
                f"{path}: no run directory around this checkpoint tells its data; give the "
                "prepared data directory it was trained on (--data DIR)"
            )
        if data is None:  # the run's data; None there is the built-in benchmark
            data = resolve_data(run_config.data)
        model = load_any(checkpoint, device, dictionary=dictionary, label2ans=label2ans)
        return cls(model, data, device, precision, image_cache_bytes)

    def add_picture(self, picture, image_id: int | None = None) -> int:
        """Featurise a new picture (a path or a PIL image) as the data's features were made
        (`ban.data.images`; data of `ban data from-images`) and return the id to ask about
        (default: -1, -2, ..., never one in use or used before). A given id that is in use names
        the new picture from then on."""
        if self._extractor is None:
            self._extractor = data_extractor(self.data_dir, self.device)
        region = self._extractor(picture)
        if image_id is None:
            while self._next_picture in self._pictures:  # given to an earlier picture
                self._next_picture -= 1
            image_id, self._next_picture = self._next_picture, self._next_picture - 1
        spatials = spatial_features(region.boxes, region.width, region.height)
        self._pictures[int(image_id)] = (region.features, spatials, region.boxes)
        self._forget_projections(int(image_id))
        return int(image_id)

    def remove_picture(self, image_id: int) -> None:
        """Forget a picture given to `add_picture` (nothing happens for an unknown id)."""
        if self._pictures.pop(int(image_id), None) is not None:
            self._forget_projections(int(image_id))

    def _forget_projections(self, image_id: int) -> None:
        """The id names other features from now on: what the image cache keeps of it is stale."""
        if self.model.image_cache is not None:
            self.model.image_cache.forget(image_id)

    def region_features(self, image_id: int):
        """`(features [n, Dv], spatials [n, 6], pixel boxes [n, 4])` of an image of the data
        (or of a picture given to `add_picture`)."""
        if image_id in self._pictures:
            return self._pictures[image_id]
        if self._stores is None:
            paths = sorted((self.data_dir / "features").glob("*.h5"))
            self._stores = [FeatureStore(p) for p in paths]
        for store in self._stores:
            if image_id in store:
                features, spatials = store[image_id]
                boxes = store.boxes(image_id)
                return features, spatials, boxes
        names = ", ".join(s.path.name for s in self._stores) or "none"
        raise UnknownImageError(
            f"image {image_id} is in none of the feature files of {self.data_dir} ({names})"
        )

    @torch.no_grad()
    def __call__(
        self, question: str, image_id: int, top_k: int = 5, top_boxes: int = 3
    ) -> Prediction:
        """Answer `question` about image `image_id` of the prepared directory (`QuestionError`
        for a question that `check_question` refuses, `UnknownImageError` for an unknown id)."""
        question = check_question(question)
        return self.answer_batch([question], [image_id], top_k, top_boxes)[0]

    @torch.no_grad()
    def answer_batch(
        self,
        questions: Sequence[str],
        image_ids: Sequence[int],
        top_k: int | Sequence[int] = 5,
        top_boxes: int | Sequence[int] = 3,
    ) -> list[Prediction]:
        """Answer many questions in one forward pass: the same answers as calling the predictor
        on each (scores equal up to the order of floating-point sums). Images with fewer boxes
        are padded with all-zero rows, which the model masks as it does any padding."""
        count = len(questions)
        if len(image_ids) != count:
            raise ValueError(f"{count} questions but {len(image_ids)} image ids")
        if count == 0:
            return []
        tops = [top_k] * count if isinstance(top_k, int) else list(top_k)
        box_tops = [top_boxes] * count if isinstance(top_boxes, int) else list(top_boxes)
        regions = [self.region_features(int(i)) for i in image_ids]
        ids = [self.dictionary.encode(q) for q in questions]
        boxes = max(len(r[0]) for r in regions)
        features = [torch.from_numpy(r[0]) for r in regions]
        spatials = [torch.from_numpy(r[1]) for r in regions]
        v = features[0].new_zeros(count, boxes, features[0].shape[1])  # [B, N, Dv]
        b = spatials[0].new_zeros(count, boxes, spatials[0].shape[1])  # [B, N, 6]
        for row in range(count):
            v[row, : len(features[row])] = features[row]
            b[row, : len(spatials[row])] = spatials[row]
        v, b = v.to(self.device), b.to(self.device)
        q = torch.tensor(ids, dtype=torch.int64, device=self.device)
        out = self.model(v, b, q, image_keys=[int(i) for i in image_ids])
        scores = torch.sigmoid(out.logits.float())
        mass = out.attention.float().sum(dim=3)  # [B, G, N]: attention mass of each box
        predictions = []
        for row in range(count):
            tokens = [
                self.dictionary.words[i] if i != self.dictionary.unk_idx else UNK
                for i in ids[row]
                if i != self.dictionary.padding_idx
            ]
            answers = self._top_answers(scores[row], tops[row])
            real = len(regions[row][0])  # the padded boxes carry no attention: left out
            attended = _attended_boxes(mass[row, :, :real], regions[row][2], box_tops[row])
            predictions.append(
                Prediction(questions[row], int(image_ids[row]), tokens, answers, attended)
            )
        return predictions

    def _top_answers(self, scores: torch.Tensor, k: int) -> list[tuple[str, float]]:
        values, indices = scores.topk(min(k, scores.numel()))
        return [
            (self.answers[i], round(s, 6))
            for i, s in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def _attended_boxes(mass: torch.Tensor, pixel_boxes: np.ndarray, k: int) -> list[list]:
    """The `k` boxes of most attention mass in each glimpse (`mass [G, N]`), best first. One
    `topk` and one conversion for all glimpses: done per box and glimpse, this took about a
    quarter of a batched server's model thread at the default size."""
    weights, indices = mass.topk(min(k, mass.shape[1]), dim=1)
    # np.round gives round(x, 2) here: a float32 times 100 is exact in float64
    rounded = np.round(np.asarray(pixel_boxes, dtype=np.float32).astype(np.float64), 2).tolist()
    return [
        [AttendedBox(i, rounded[i], round(w, 6)) for i, w in zip(row, ws, strict=True)]
        for row, ws in zip(indices.tolist(), weights.tolist(), strict=True)
    ]
