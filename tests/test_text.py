import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest

from ban.text import UNK, Dictionary, read_glove, tfidf_init, tfidf_matrix, tokenize

QUESTIONS = [
    "What color is the dog's collar?",
    "How many dogs, cats are there?",
    "Is the man's shirt red?",
    "What is the t-shirt's color.",
]


def test_tokenize_is_the_releases():
    assert tokenize("What's the Dog's name, please?") == [
        "what",
        "'s",
        "the",
        "dog",
        "'s",
        "name",
        "please",
    ]
    # periods, quotes and hyphens stay attached
    assert tokenize('Is "t-shirt" here.') == ["is", '"t-shirt"', "here."]
    assert tokenize("  ") == []


def test_dictionary_order_padding_and_unknown():
    d = Dictionary.build(QUESTIONS)
    assert d.words[:6] == ["what", "color", "is", "the", "dog", "'s"]
    assert d.words[-1] == UNK
    assert d.padding_idx == len(d.words)
    ids = d.encode("what is the zebra?", max_length=6)
    assert ids == [0, 2, 3, d.word2idx[UNK], d.padding_idx, d.padding_idx]
    assert len(d.encode(" ".join(["dog"] * 20))) == 14  # truncated to 14 by default
    assert d.decode(ids) == ["what", "is", "the", UNK]


def test_release_unk_maps_to_last_word():
    d = Dictionary.build(QUESTIONS, release_unk=True)
    assert UNK not in d
    assert d.unk_idx == len(d) - 1
    assert d.encode("zebra", max_length=2) == [len(d) - 1, len(d)]
    # with <unk> appended, every other word keeps the release's id
    assert Dictionary.build(QUESTIONS).words[:-1] == d.words


def test_dictionary_without_unk_needs_release_mode():
    with pytest.raises(ValueError, match="<unk>"):
        Dictionary(["a", "b"])


def test_dictionary_save_load_and_release_pickle(tmp_path):
    d = Dictionary.build(QUESTIONS + ["Qué é café?"])
    d.save(tmp_path / "d.json")
    assert Dictionary.load(tmp_path / "d.json") == d
    r = Dictionary.build(QUESTIONS, release_unk=True)
    with open(tmp_path / "dictionary.pkl", "wb") as f:
        pickle.dump([r.word2idx, r.words], f)
    assert Dictionary.from_release(tmp_path / "dictionary.pkl") == r
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        Dictionary.load(tmp_path / "bad.json")


def test_read_glove_any_dimension(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text(
        "3 4\nthe 1 2 3 4\ndog 0.5 0.5 0.5 -1\nat name@x.com 9 9 9 9\ncafé 1 1 1 1\n",
        encoding="utf-8",
    )
    weights, found = read_glove(path, ["dog", "missing", "the", "at name@x.com", "café"])
    assert weights.shape == (5, 4) and weights.dtype == np.float32 and found == 4
    np.testing.assert_array_equal(weights[0], [0.5, 0.5, 0.5, -1])
    np.testing.assert_array_equal(weights[1], 0)
    np.testing.assert_array_equal(weights[3], 9)
    (tmp_path / "bad.txt").write_text("the 1 2\ndog 1\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        read_glove(tmp_path / "bad.txt", ["dog"])


def release_tfidf(texts, words, fix_idf):
    """A plain re-statement of the release's `tfidf_from_questions` (dense result)."""
    word2idx = {w: i for i, w in enumerate(words)}
    idx2word = list(words)
    n = len(words)
    inds, df = [[], []], {}
    for text in texts:
        tokens = []
        for w in tokenize(text):
            if w not in word2idx:
                word2idx[w] = len(idx2word)
                idx2word.append(w)
            tokens.append(word2idx[w])
        for t in tokens:
            df[t] = df.get(t, 0) + 1
        for c in itertools.combinations(tokens, 2):
            if c[0] < n:
                inds[0].append(c[0])
                inds[1].append(c[1])
            if c[1] < n:
                inds[0].append(c[1])
                inds[1].append(c[0])
    vals = [1.0] * len(inds[1])
    for idx, col in enumerate(inds[1]):
        if fix_idf:
            vals[idx] /= df[col]
        else:
            vals[col] /= df[col]
    z = {}
    for row, val in zip(inds[0], vals, strict=True):
        z[row] = z.get(row, 0) + val
    for idx, row in enumerate(inds[0]):
        vals[idx] /= z[row]
    dense = np.zeros((n, len(idx2word)))
    for r, c, v in zip(inds[0], inds[1], vals, strict=True):
        dense[r, c] += v
    return dense, idx2word[n:]


@pytest.mark.parametrize("fix_idf", [False, True])
def test_tfidf_matrix_matches_the_release(fix_idf):
    texts = QUESTIONS * 3 + ["what color is the zebra on the grass"]
    d = Dictionary.build(QUESTIONS, release_unk=True)
    expected, expected_extra = release_tfidf(texts, d.words, fix_idf)
    matrix, extra = tfidf_matrix(texts, d, fix_idf=fix_idf)
    assert extra == expected_extra == ["zebra", "on", "grass"]
    np.testing.assert_allclose(matrix.to_dense().numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(matrix.to_dense().sum(1).numpy(), 1.0, rtol=1e-5)


def test_tfidf_init_is_matrix_times_glove(tmp_path):
    texts = QUESTIONS + ["the zebra"]
    d = Dictionary.build(QUESTIONS)
    rng = np.random.default_rng(0)
    lines = []
    vectors = {}
    for w in d.words[:-1] + ["zebra"]:
        vectors[w] = rng.standard_normal(5).astype(np.float32)
        lines.append(w + " " + " ".join(f"{x:.6f}" for x in vectors[w]))
    (tmp_path / "g.txt").write_text("\n".join(lines) + "\n")
    glove, _ = read_glove(tmp_path / "g.txt", d.words + ["zebra"])
    init = tfidf_init(texts, d, tmp_path / "g.txt")
    dense, _ = release_tfidf(texts, d.words, False)
    assert init.shape == (len(d), 5) and init.dtype == np.float32
    np.testing.assert_allclose(init, dense @ glove, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(init[d.word2idx[UNK]], 0)  # <unk> never co-occurs


def test_dictionary_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "dictionary.json"
    Dictionary(["what", "is", "<unk>"]).save(path)
    before = path.read_bytes()

    def full_disk(self, text, *args, **kwargs):  # writes a part, then fails
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[:5])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="disk full"):
        Dictionary(["how", "many", "cubes", "<unk>"]).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dictionary.json"]
    monkeypatch.undo()
    assert Dictionary.load(path).words == ["what", "is", "<unk>"]
