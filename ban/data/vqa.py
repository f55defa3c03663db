"""VQA v2: question and annotation files, the official answer normalisation, the answer
vocabulary, the soft scores of the training targets, ``VQADataset`` and ``collate``.

The official accuracy itself is ``ban.metrics.vqa_accuracy``.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ban import files
from ban.data.features import FeatureStore

# ----------------------------------------------------------------------------------------------
# The official VQA evaluation's answer normalisation (vqaEval.py), quirks included.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]  # fmt: skip
# The official look-behind is written "(?!<=\d)", which is a look-ahead: kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, strip periods."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (32) as the *count* argument: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, 32)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words -> digits, drop articles,
    restore contractions."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Answer normalisation of the release (``preprocess_answer``) = the official VQA eval's
    punctuation and digit/article processing, then commas removed.

    >>> normalize_answer("Two"), normalize_answer("a dog"), normalize_answer("yes.")
    ('2', 'dog', 'yes')
    """
    return process_digit_article(process_punctuation(answer)).replace(",", "")


# ----------------------------------------------------------------------------------------------
# Scores


def soft_score(count: int) -> float:
    """Score of an answer given by ``count`` of the 10 humans: 0, .3, .6, .9, 1 for 0..>=4.

    With 10 answers this equals the official metric exactly (``min(1, matches / 3)`` averaged
    over the 10 leave-one-out subsets of 9 answers).
    """
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def answer_scores(
    answers: Sequence[str], ans2label: dict[str, int], normalize: bool = False
) -> tuple[list[int], list[float]]:
    """Labels and soft scores of the in-vocabulary answers among the human answers.

    ``normalize=False`` matches the raw human answers, as the release does (some credit is lost);
    ``normalize=True`` normalises each answer first.
    """
    counts: dict[str, int] = {}
    for answer in answers:
        key = normalize_answer(answer) if normalize else answer
        counts[key] = counts.get(key, 0) + 1
    labels, scores = [], []
    for answer, count in counts.items():
        if answer in ans2label:
            labels.append(ans2label[answer])
            scores.append(soft_score(count))
    return labels, scores


# ----------------------------------------------------------------------------------------------
# Files


def read_json(path: str | Path, key: str) -> list[dict]:
    """``json[key]`` of a VQA file, as a list; errors name the file."""
    data = files.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a list under {key!r}")
    return data[key]


def _check(record: dict, fields: dict[str, type], path: Path, row: int) -> None:
    for field, kind in fields.items():
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}: record {row}: missing field {field!r}")
        if not isinstance(record[field], kind) or isinstance(record[field], bool):
            raise ValueError(
                f"{path}: record {row} (question_id {record.get('question_id')}): field "
                f"{field!r} should be {kind.__name__}, got {type(record[field]).__name__}"
            )


def load_questions(path: str | Path) -> list[dict]:
    """Questions of a ``v2_OpenEnded_mscoco_<split>_questions.json`` file.

    Each has ``question_id``, ``image_id`` (int) and ``question`` (non-empty str).
    """
    path = Path(path)
    questions = read_json(path, "questions")
    seen = set()
    for row, q in enumerate(questions):
        _check(q, {"question_id": int, "image_id": int, "question": str}, path, row)
        if not q["question"].strip():
            raise ValueError(
                f"{path}: record {row} (question_id {q['question_id']}): field 'question' is empty"
            )
        if q["question_id"] in seen:
            raise ValueError(f"{path}: question_id {q['question_id']} appears twice")
        seen.add(q["question_id"])
    return questions


def load_annotations(path: str | Path) -> dict[int, dict]:
    """Annotations of a ``v2_mscoco_<split>_annotations.json`` file, by question id.

    Each has ``question_id``, ``image_id``, ``answers`` (list of ``{"answer": str, ...}``),
    ``multiple_choice_answer``, ``answer_type`` and ``question_type``.
    """
    path = Path(path)
    fields = {
        "question_id": int,
        "image_id": int,
        "answers": list,
        "multiple_choice_answer": str,
        "answer_type": str,
        "question_type": str,
    }
    out = {}
    for row, a in enumerate(read_json(path, "annotations")):
        _check(a, fields, path, row)
        for k, ans in enumerate(a["answers"]):
            if not isinstance(ans, dict) or not isinstance(ans.get("answer"), str):
                raise ValueError(
                    f"{path}: record {row} (question_id {a['question_id']}): "
                    f"answers[{k}] has no string 'answer'"
                )
        out[a["question_id"]] = a
    return out


def match_annotations(
    questions: list[dict], annotations: dict[int, dict], questions_path, annotations_path
) -> None:
    """Every question has an annotation on the same image and vice versa, or ValueError."""
    qids = {q["question_id"] for q in questions}
    for q in questions:
        a = annotations.get(q["question_id"])
        if a is None:
            raise ValueError(
                f"{annotations_path}: no annotation for question_id "
                f"{q['question_id']} of {questions_path}"
            )
        if a["image_id"] != q["image_id"]:
            raise ValueError(
                f"question_id {q['question_id']}: image_id {q['image_id']} in "
                f"{questions_path} but {a['image_id']} in {annotations_path}"
            )
    extra = [qid for qid in annotations if qid not in qids]
    if extra:
        raise ValueError(
            f"{annotations_path}: {len(extra)} annotations have no question in "
            f"{questions_path} (first: question_id {extra[0]})"
        )


def answer_vocabulary(annotations: Iterable[dict], min_count: int = 9) -> list[str]:
    """Normalised ``multiple_choice_answer`` values given for at least ``min_count`` distinct
    questions (3129 answers over VQA v2 train+val at 9), in order of first occurrence."""
    questions: dict[str, set[int]] = {}
    for a in annotations:
        questions.setdefault(normalize_answer(a["multiple_choice_answer"]), set()).add(
            a["question_id"]
        )
    return [answer for answer, qids in questions.items() if len(qids) >= min_count]


# ----------------------------------------------------------------------------------------------
# Dataset


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """The objects of a JSON-lines file, one at a time; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: corrupt JSON line ({error})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def _kind(value) -> str | None:
    """The column kind a JSON value fits: int, float, str, or a list of one of them."""
    if value is None or isinstance(value, bool):
        return None
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if type(value) is kind:
            return name
    if type(value) is list:
        if not value:
            return "list"  # empty: fits a list column of any kind
        for name, kind in (("ints", int), ("floats", float), ("strs", str)):
            if all(type(v) is kind for v in value):
                return name
    return None


class _Column:
    """One key's values for every entry: numbers in an ``array``, lists as one flat array with
    offsets, strings as indices into a pool of the distinct strings (answers repeat a lot)."""

    # list items as int32 while they fit (token ids, labels), then int64
    CODES = {"int": "q", "float": "d", "str": "i", "ints": "i", "floats": "d", "strs": "i"}

    def __init__(self, kind: str, before: int) -> None:
        self.kind = kind
        self.pool: list[str] = []
        self.pool_index: dict[str, int] | None = {}
        self.listed = kind in ("list", "ints", "floats", "strs")
        if self.listed:
            self.offsets = array("q", [0]) * (before + 1)
            self.flat = array(self.CODES.get(kind, "q"))
        else:
            self.data = array(self.CODES[kind], [0]) * before

    def fits(self, value) -> bool:
        kind = _kind(value)
        if self.listed:
            return kind == "list" or kind == self.kind or (self.kind == "list" and kind in (
                "ints", "floats", "strs"))  # fmt: skip
        return kind == self.kind

    def _code(self, text: str) -> int:
        if self.pool_index is None:  # sealed: made again for more entries
            self.pool_index = {text: k for k, text in enumerate(self.pool)}
        code = self.pool_index.get(text)
        if code is None:
            code = self.pool_index[text] = len(self.pool)
            self.pool.append(text)
        return code

    def append(self, value) -> None:
        if not self.listed:
            self.data.append(self._code(value) if self.kind == "str" else value)
            return
        if value and self.kind == "list":  # the first non-empty list sets the kind
            self.kind = _kind(value)
            self.flat = array(self.CODES[self.kind])
        if self.kind == "strs":
            self.flat.extend(self._code(v) for v in value)
        elif value:
            try:
                self.flat.extend(value)
            except OverflowError:  # an int beyond int32: the column becomes int64
                del self.flat[self.offsets[-1] :]
                self.flat = array("q", self.flat)
                self.flat.extend(value)
        self.offsets.append(len(self.flat))

    def skip(self) -> None:
        if self.listed:
            self.offsets.append(len(self.flat))
        else:
            self.data.append(0)

    def get(self, i: int):
        if not self.listed:
            value = self.data[i]
            return self.pool[value] if self.kind == "str" else value
        part = self.flat[self.offsets[i] : self.offsets[i + 1]]
        return [self.pool[v] for v in part] if self.kind == "strs" else part.tolist()


class Entries(Sequence):
    """The question entries of prepared jsonl files, stored by column: ``entries[i]`` is the
    dict of line ``i`` (the same keys and values), made when asked for.

    A list of dicts took ~2.6 KB a VQA question (tokens, ten answers, labels and scores as
    Python objects): ~560 MB for val2014's 214,354 questions, ~1.8 GiB for train2014 with its
    Visual Genome questions, and forked DataLoader workers copy the pages that reference counts
    touch. Columns take ~0.2 KB a question. Values of another type than their key's first one
    (rare) are kept as they are.
    """

    def __init__(self, entries: Iterable[dict] = ()) -> None:
        self.columns: dict[str, _Column] = {}
        self.layouts: list[tuple[str, ...]] = []  # the keys of a line, in order
        self._layout_index: dict[tuple[str, ...], int] = {}
        self.layout = array("i")
        self.odd: dict[int, dict] = {}  # values that fit no column, by entry
        for entry in entries:
            self.append(entry)

    def append(self, entry: dict) -> None:
        i = len(self.layout)
        done = set()
        for key, value in entry.items():
            column = self.columns.get(key)
            if column is None and _kind(value) is not None:
                column = self.columns[key] = _Column(_kind(value), i)
            if column is not None and column.fits(value):
                column.append(value)
                done.add(key)
            else:
                self.odd.setdefault(i, {})[key] = value
        for key, column in self.columns.items():
            if key not in done:
                column.skip()
        keys = tuple(entry)
        code = self._layout_index.get(keys)
        if code is None:
            code = self._layout_index[keys] = len(self.layouts)
            self.layouts.append(keys)
        self.layout.append(code)

    def __len__(self) -> int:
        return len(self.layout)

    def seal(self) -> None:
        """Drop what only appending needs (each column's string index: ~50 bytes a question)."""
        for column in self.columns.values():
            column.pool_index = None

    def get(self, i: int, key: str, default=None):
        """``self[i].get(key, default)`` without making the whole dict."""
        if key not in self.layouts[self.layout[i]]:
            return default
        odd = self.odd.get(i)
        if odd is not None and key in odd:
            return odd[key]
        return self.columns[key].get(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"entry {i} of {len(self)}")
        odd = self.odd.get(i, {})
        return {
            key: odd[key] if key in odd else self.columns[key].get(i)
            for key in self.layouts[self.layout[i]]
        }


class VQADataset(Dataset):
    """Questions of one or more prepared splits with lazily read region features.

    ``split`` may join several with ``+`` (``"train2014+vg_train2014"``). Item ``i`` is a dict:
    ``features [n, Dv]`` float32, ``spatials [n, 6]`` float32, ``question [T]`` int64,
    ``target [A]`` float32 (absent on splits without answers), ``question_id``, ``image_id``,
    ``answer_type``, ``question_type`` (None when unknown).
    """

    def __init__(self, data_dir: str | Path, split: str, in_memory: bool = False) -> None:
        self.data_dir = Path(data_dir)
        manifest_path = self.data_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: prepare the data first with "
                "`ban data prepare RAW --out DATA`"
            )
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.answers: list[str] = json.loads(
            (self.data_dir / "answers.json").read_text(encoding="utf-8")
        )
        self.splits = split.split("+")
        known = self.manifest["splits"]
        self.entries = Entries()  # by column (Entries): ~0.2 KB a question, not ~2.6 KB
        self._store_of = array("i")
        self.stores: list[FeatureStore] = []
        stores: dict[str, int] = {}
        self.has_target = True
        for name in self.splits:
            if name not in known:
                raise ValueError(
                    f"split {name!r} is not in {manifest_path}; prepared splits: {', '.join(known)}"
                )
            info = known[name]
            if info["features"] not in stores:
                stores[info["features"]] = len(self.stores)
                self.stores.append(FeatureStore(self.data_dir / info["features"], in_memory))
            before = len(self.entries)
            for entry in iter_jsonl(self.data_dir / info["file"]):
                self.entries.append(entry)
            self._store_of.extend([stores[info["features"]]] * (len(self.entries) - before))
            self.has_target &= bool(info["answers"])
        self.entries.seal()
        self.max_length = int(self.manifest["max_length"])

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entries = self.entries
        image_id = entries.get(index, "image_id")
        features, spatials = self.stores[self._store_of[index]][image_id]
        item = {
            "features": torch.from_numpy(features),
            "spatials": torch.from_numpy(spatials),
            "question": torch.from_numpy(np.array(entries.get(index, "tokens"), dtype=np.int64)),
            "question_id": entries.get(index, "question_id"),
            "image_id": image_id,
            "answer_type": entries.get(index, "answer_type"),
            "question_type": entries.get(index, "question_type"),
        }
        if self.has_target:  # numpy: for 1-3 labels it is ~4x faster than torch's indexing
            target = np.zeros(len(self.answers), dtype=np.float32)
            labels = entries.get(index, "labels")
            if labels:
                target[labels] = entries.get(index, "scores")
            item["target"] = torch.from_numpy(target)
        return item

    def annotations(self) -> dict[int, dict]:
        """Per question id: ``answers`` (the human answers), ``answer_type``, ``question_type``,
        for the official evaluation (entries without answers are left out)."""
        get, out = self.entries.get, {}
        for i in range(len(self.entries)):
            answers = get(i, "answers")
            if answers:
                out[get(i, "question_id")] = {
                    "answers": answers,
                    "answer_type": get(i, "answer_type"),
                    "question_type": get(i, "question_type"),
                }
        return out


def collate(samples: list[dict]) -> dict:
    """Batch dict of docs/DESIGN.md: box counts padded with zero rows to the batch maximum.

    ``features [B, N, Dv]``, ``spatials [B, N, 6]``, ``box_mask [B, N]`` bool (True = real box),
    ``question [B, T]`` int64, ``target [B, A]`` (when the samples have one), lists
    ``question_id`` and ``image_id``.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    counts = [s["features"].shape[0] for s in samples]
    n = max(counts)
    b, dv = len(samples), samples[0]["features"].shape[1]
    if min(counts) == n:  # every image has the same number of boxes (36 in most releases)
        return _batch(
            samples,
            torch.stack([s["features"] for s in samples]).float(),
            torch.stack([s["spatials"] for s in samples]).float(),
            torch.ones(b, n, dtype=torch.bool),
        )
    features = torch.zeros(b, n, dv, dtype=torch.float32)
    spatials = torch.zeros(b, n, samples[0]["spatials"].shape[1], dtype=torch.float32)
    box_mask = torch.zeros(b, n, dtype=torch.bool)
    for i, s in enumerate(samples):
        k = s["features"].shape[0]
        features[i, :k] = s["features"]
        spatials[i, :k] = s["spatials"]
        box_mask[i, :k] = True
    return _batch(samples, features, spatials, box_mask)


def _batch(samples: list[dict], features, spatials, box_mask) -> dict:
    batch = {
        "features": features,
        "spatials": spatials,
        "box_mask": box_mask,
        "question": torch.stack([s["question"] for s in samples]),
        "question_id": [s["question_id"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
    }
    if samples[0].get("target") is not None:
        batch["target"] = torch.stack([s["target"] for s in samples])
    return batch
