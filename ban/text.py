"""Question text: the release's tokenizer, the word `Dictionary`, GloVe and tf-idf embedding init.

The tokenizer and dictionary reproduce the original release (lowercase, delete ``,`` and ``?``,
split ``'s`` off, whitespace split; words numbered by first occurrence over the question files in
the order train2014, val2014, test2015, test-dev2015; padding index = number of words). New
dictionaries add a real unknown-word token ``<unk>`` as their last word; the release instead maps
unknown words to index V-1, its last real word (``release_unk=True`` reproduces that).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ban.files import atomic_write_text

UNK = "<unk>"
MAX_LENGTH = 14


def tokenize(sentence: str) -> list[str]:
    """The release's tokenizer: lowercase, delete ',' and '?', "'s" -> " 's", whitespace split.

    Nothing else is stripped: periods, quotes and hyphens stay attached to their words.
    """
    sentence = sentence.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return sentence.split()


class Dictionary:
    """Word list with ids; the padding index is ``len(words)`` (one past the last word).

    ``release_unk=False`` (new models): the word list must hold ``<unk>`` and unknown words map to
    it. ``release_unk=True`` (the original release's checkpoints): unknown words map to index
    ``len(words) - 1``, the last real word, as the release does.
    """

    def __init__(self, words: Sequence[str], release_unk: bool = False) -> None:
        self.words = list(words)
        self.word2idx = {}
        for i, word in enumerate(self.words):
            if word in self.word2idx:
                raise ValueError(
                    f"Dictionary: word {word!r} appears twice (ids {self.word2idx[word]} and {i})"
                )
            self.word2idx[word] = i
        self.release_unk = release_unk
        if not self.words:
            raise ValueError("Dictionary: the word list is empty")
        if not release_unk and UNK not in self.word2idx:
            raise ValueError(
                f"Dictionary: the word list has no {UNK!r} token; add it, or pass "
                "release_unk=True to map unknown words to the last word as the release does"
            )

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Dictionary)
            and self.words == other.words
            and self.release_unk == other.release_unk
        )

    def __repr__(self) -> str:
        mode = "release_unk" if self.release_unk else UNK
        return f"Dictionary({len(self)} words, unknown -> {mode})"

    @property
    def padding_idx(self) -> int:
        return len(self.words)

    @property
    def unk_idx(self) -> int:
        return len(self.words) - 1 if self.release_unk else self.word2idx[UNK]

    def ids(self, question: str) -> list[int]:
        """Token ids of a question, unknown words mapped to ``unk_idx``; no truncation."""
        unk = self.unk_idx
        return [self.word2idx.get(word, unk) for word in tokenize(question)]

    def encode(self, question: str, max_length: int = MAX_LENGTH) -> list[int]:
        """Token ids truncated to ``max_length`` and right-padded with ``padding_idx``."""
        ids = self.ids(question)[:max_length]
        return ids + [self.padding_idx] * (max_length - len(ids))

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of token ids, padding dropped."""
        return [self.words[i] for i in ids if i != self.padding_idx]

    @classmethod
    def build(cls, questions: Iterable[str], release_unk: bool = False) -> Dictionary:
        """Number words by first occurrence over ``questions`` (the release's order).

        With ``release_unk=False`` the token ``<unk>`` is appended as the last word, so every
        other word keeps the id the release gives it.
        """
        word2idx: dict[str, int] = {}
        for question in questions:
            for word in tokenize(question):
                word2idx.setdefault(word, len(word2idx))
        words = list(word2idx)
        if not release_unk and UNK not in word2idx:
            words.append(UNK)
        if not words:
            raise ValueError("Dictionary.build: no words (all questions empty?)")
        return cls(words, release_unk=release_unk)

    def save(self, path: str | Path) -> None:
        """Write the word list as JSON, atomically (the old file or the whole new one)."""
        data = {
            "words": self.words,
            "padding_idx": self.padding_idx,
            "unknown": "release" if self.release_unk else UNK,
        }
        atomic_write_text(path, json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Dictionary:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            words, unknown = data["words"], data.get("unknown", UNK)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a dictionary file ({error})") from error
        return cls(words, release_unk=unknown == "release")

    @classmethod
    def from_release(cls, path: str | Path) -> Dictionary:
        """The release's ``dictionary.pkl`` (a pickled ``[word2idx, idx2word]``).

        Pickle files can run code when loaded: only load files you trust.
        """
        with open(path, "rb") as f:
            word2idx, idx2word = pickle.load(f)
        if [word2idx[w] for w in idx2word] != list(range(len(idx2word))):
            raise ValueError(f"{path}: word2idx and idx2word disagree")
        return cls(idx2word, release_unk=True)


def read_glove(path: str | Path, words: Sequence[str]) -> tuple[np.ndarray, int]:
    """Vectors of ``words`` from a GloVe text file of any dimension.

    Each line is a word and its D numbers separated by spaces (words may contain spaces, as in the
    840B file: the last D fields are the vector). A word2vec-style header line ``count dim`` is
    skipped. Returns ``(weights [len(words), D] float32, number of words found)``; words missing
    from the file get zero rows.
    """
    path = Path(path)
    index = {word: i for i, word in enumerate(words)}
    weights = None
    found = np.zeros(len(words), dtype=bool)
    dim = None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not UTF-8 ({error})") from error
            if not line.strip():
                continue
            if dim is not None and line.count(" ") == dim and line[-1] != " ":
                # one word and dim numbers: skip a word not asked for without splitting its
                # numbers (most of a 400,000-word file)
                i = index.get(line[: line.index(" ")])
                if i is None or found[i]:
                    continue
            parts = line.rstrip(" ").split(" ")
            if dim is None:
                if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}:{line_no}: expected a word and numbers")
                weights = np.zeros((len(words), dim), dtype=np.float32)
            if len(parts) < dim + 1:
                raise ValueError(
                    f"{path}:{line_no}: expected a word and {dim} numbers, got {len(parts)} fields"
                )
            word = " ".join(parts[:-dim])
            i = index.get(word)
            if i is None or found[i]:
                continue
            try:
                weights[i] = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError as error:
                raise ValueError(f"{path}:{line_no}: bad number for {word!r} ({error})") from None
            found[i] = True
    if weights is None:
        raise ValueError(f"{path}: no vectors in this GloVe file")
    return weights, int(found.sum())


def glove_init(dictionary: Dictionary, glove_path: str | Path) -> np.ndarray:
    """``[V, D]`` float32 init of the word embedding (rows of words missing from GloVe are zero)."""
    return read_glove(glove_path, dictionary.words)[0]


_PREFIX_MARGIN = 1_000_000


def tfidf_matrix(
    texts: Iterable[str], dictionary: Dictionary, fix_idf: bool = False, chunk_texts: int = 200_000
) -> tuple[torch.Tensor, list[str]]:
    """The release's row-stochastic co-occurrence matrix ``T [V, V']`` (``tfidf_from_questions``).

    For every text, all token pairs ``itertools.combinations(tokens, 2)`` are counted in both
    directions (rows only for dictionary words; words not in the dictionary extend the columns,
    returned as ``extra_words``), every entry is divided by the document frequency of its column
    word (the number of occurrences of that word over all texts), and the rows are normalised to
    sum to one. Tokens are not truncated to 14.

    The release has an indexing bug in the IDF step: it divides ``vals[col]`` (the entry whose
    *position* equals the column's word id) instead of ``vals[idx]``. The first V' entries of the
    entry list are divided, many times, and every other entry keeps weight 1, so the result is in
    effect a plain co-occurrence average. ``fix_idf=False`` (default) reproduces that exactly;
    ``fix_idf=True`` divides each entry by its own column's frequency.
    A row whose entries all vanish (possible on tiny corpora under the bug; the release would
    divide by zero) stays all zero.

    Returns ``(T, extra_words)`` with ``T`` a coalesced float32 sparse tensor of size
    ``[len(dictionary), len(dictionary) + len(extra_words)]``.
    """
    # Memory and time: the (row, column) pairs are counted chunk by chunk (texts of one length
    # at a time, vectorised), so memory grows with the distinct pairs, not with the ~10^8 pairs
    # of VQA v2 + Visual Genome; the release's bug needs only the first `total` pairs in order.
    n = len(dictionary)
    word2idx = dict(dictionary.word2idx)
    extra: list[str] = []
    df: dict[int, int] = {}
    prefix_rows: list[np.ndarray] = []  # the first pairs, in the release's order (its IDF bug)
    prefix_cols: list[np.ndarray] = []
    prefix_len = 0
    pending: dict[int, list[list[int]]] = {}
    pending_texts = 0
    keys = np.zeros(0, dtype=np.int64)  # row << 32 | column, sorted and unique
    counts = np.zeros(0, dtype=np.int64)

    def count_pending() -> None:
        nonlocal keys, counts, pending, pending_texts
        parts_k, parts_c = [keys], [counts]
        for length, token_lists in pending.items():
            t = np.asarray(token_lists, dtype=np.int64)  # [m, L]
            a, b = np.triu_indices(length, 1)
            first, second = t[:, a].reshape(-1), t[:, b].reshape(-1)
            r = np.concatenate([first, second])
            c = np.concatenate([second, first])
            keep = r < n
            k, cnt = np.unique((r[keep] << 32) | c[keep], return_counts=True)
            parts_k.append(k)
            parts_c.append(cnt)
        merged = np.concatenate(parts_k)
        keys, inverse = np.unique(merged, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(parts_c), minlength=len(keys))
        counts = counts.astype(np.int64)
        pending, pending_texts = {}, 0

    for text in texts:
        tokens = []
        for word in tokenize(text):
            i = word2idx.get(word)
            if i is None:
                i = word2idx[word] = n + len(extra)
                extra.append(word)
            tokens.append(i)
            df[i] = df.get(i, 0) + 1
        if len(tokens) < 2:
            continue
        if prefix_len < n + len(extra) + _PREFIX_MARGIN:
            t = np.asarray(tokens, dtype=np.int64)
            a, b = np.triu_indices(len(t), 1)  # itertools.combinations order
            first, second = t[a], t[b]
            # entries (c0, c1) then (c1, c0), each only when its row is a dictionary word
            r = np.stack([first, second], axis=1).reshape(-1)
            c = np.stack([second, first], axis=1).reshape(-1)
            keep = r < n
            prefix_rows.append(r[keep])
            prefix_cols.append(c[keep])
            prefix_len += int(keep.sum())
        pending.setdefault(len(tokens), []).append(tokens)
        pending_texts += 1
        if pending_texts >= chunk_texts:
            count_pending()
    count_pending()
    total = n + len(extra)
    if not len(keys):
        return torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (n, total), check_invariants=True
        ).coalesce(), extra
    rows, cols = keys >> 32, keys & 0xFFFFFFFF
    freq = np.zeros(total, dtype=np.float64)
    for i, count in df.items():
        freq[i] = count
    if fix_idf:
        weight = counts / freq[cols]  # the summed weights of each (row, column)'s entries
    else:
        # the release: `for idx, col in enumerate(cols): vals[col] /= df[col]`, in order: the
        # entry at position j < total is divided by freq[j] once per entry of column j
        weight = counts.astype(np.float64)
        prefix_r = np.concatenate(prefix_rows)
        prefix_c = np.concatenate(prefix_cols)
        all_entries = int(counts.sum())
        head = min(total, all_entries)
        if len(prefix_r) < head:
            raise RuntimeError(f"tfidf_matrix: more than {_PREFIX_MARGIN} words not in GloVe")
        per_column = np.bincount(cols, weights=counts, minlength=total)
        j = np.arange(head)
        divided = freq[j] ** -per_column[j]
        at = np.searchsorted(keys, (prefix_r[:head] << 32) | prefix_c[:head])
        np.add.at(weight, at, divided - 1.0)
    z = np.bincount(rows, weights=weight, minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = np.where(z[rows] > 0, weight / z[rows], 0.0)
    indices = torch.from_numpy(np.stack([rows, cols]))
    matrix = torch.sparse_coo_tensor(
        indices, torch.from_numpy(vals), (n, total), check_invariants=True
    ).coalesce()
    return matrix.float(), extra


def tfidf_init(
    texts: Iterable[str],
    dictionary: Dictionary,
    glove_path: str | Path,
    fix_idf: bool = False,
) -> np.ndarray:
    """The release's second ('c') embedding init: ``T @ GloVe`` -> ``[V, D]`` float32.

    ``T`` is :func:`tfidf_matrix` over ``texts`` (the release used the VQA train, val and
    test2015 questions, the Visual Genome questions and, optionally, COCO captions); GloVe rows
    of the extra (non-dictionary) words are read from the same file.
    """
    matrix, extra = tfidf_matrix(texts, dictionary, fix_idf=fix_idf)
    weights, _ = read_glove(glove_path, list(dictionary.words) + extra)
    return torch.sparse.mm(matrix.double(), torch.from_numpy(weights).double()).float().numpy()
