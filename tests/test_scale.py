"""Long data commands show progress (and --quiet silences it); benchmarks/scale.py's generators
write the real formats."""

from ban.cli import main


def test_synth_shows_progress_unless_quiet(tmp_path, capsys):
    argv = ["data", "synth", "--train-images", "3", "--val-images", "2", "--test-images", "1"]
    argv += ["--no-images", "--workers", "1", "--feature-dim", "8"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "scenes: 100%" in err and "6/6" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "scenes" not in capsys.readouterr().err


def test_scale_generators_write_what_prepare_reads(tmp_path):
    import json

    from ban.data.prepare import prepare
    from ban.text import read_glove
    from tests import benchmark_scripts

    scale = benchmark_scripts.load("scale")
    raw = tmp_path / "raw"
    (raw / "features").mkdir(parents=True)
    ids = scale.write_vqa(raw, 0.0002)
    assert len(ids["train2014"]) == round(0.0002 * 82_783)
    scale.write_vg(raw, 0.0002, ids["train2014"] + ids["val2014"])
    scale.write_small_tsv(raw / "features" / "small.tsv", [i for v in ids.values() for i in v])
    scale.write_glove(tmp_path / "glove.txt", words=scale.VOCAB + 100, dim=5)
    weights, hits = read_glove(tmp_path / "glove.txt", ["w0000003", "z0000099", "nope"])
    assert hits == 2 and weights.shape == (3, 5) and abs(weights[0]).max() <= 1
    data = prepare(raw, tmp_path / "data", glove=tmp_path / "glove.txt", progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train2014"]["questions"] == round(0.0002 * 443_757)
    assert manifest["splits"]["test-dev2015"]["questions"] > 0
    assert manifest["visual_genome"]["vg_train2014"]["questions"] == round(0.0002 * 1_445_322)
    assert manifest["embeddings"]["glove"]["words_found"] > 100
    assert scale.slope([1, 2, 4], [3, 6, 12]) == __import__("pytest").approx(1.0)


def test_scale_evaluate_data_cut_to_a_size(tmp_path):
    """The evaluate step's data: chosen splits only, a split cut to its first questions with
    the same dictionary and answers; same_features compares two feature files."""
    from ban.data.prepare import prepare
    from ban.data.vqa import VQADataset
    from tests import benchmark_scripts

    scale = benchmark_scripts.load("scale")
    raw = tmp_path / "raw"
    (raw / "features").mkdir(parents=True)
    ids = scale.write_vqa(raw, 1.0, splits={"train2014": 0.0001, "val2014": 0.0002})
    assert set(ids) == {"train2014", "val2014"} and len(ids["val2014"]) == 8
    assert not (raw / "v2_OpenEnded_mscoco_test2015_questions.json").exists()
    scale.write_small_tsv(raw / "features" / "s.tsv", ids["train2014"] + ids["val2014"], 3, 8)
    data = prepare(raw, tmp_path / "data", min_answer_count=1, progress=False)
    cut = scale._cut_split(data, "val2014", 5, tmp_path / "cut")
    full, part = VQADataset(data, "val2014"), VQADataset(cut, "val2014")
    assert len(full) == round(0.0002 * 214_354) and len(part) == 5
    assert part.entries[:5] == full.entries[:5] and part.answers == full.answers
    h5 = sorted((data / "features").glob("*.h5"))
    assert scale.same_features(h5[0], h5[0])[1] == 0.0


def test_scale_captions_step_prepares_flickr_at_a_fraction(tmp_path, monkeypatch, capsys):
    from tests import benchmark_scripts

    scale = benchmark_scripts.load("scale")
    monkeypatch.setenv("SCALE_ROOT", str(tmp_path))
    rows: list[dict] = []
    scale.step_captions(tmp_path, [0.001], rows, None)  # 32 images: 12 train, 10 val, 10 test
    assert [(r["step"], r["size"], r["real"]) for r in rows] == [
        ("synth (36 x 128, captions)", 32, 31_783),
        ("Flickr30k Entities prepare (captions)", 32, 31_783),
    ]
    assert "prepared 32 images: 160 captions" in capsys.readouterr().out  # 5 a picture
    assert not list(tmp_path.glob("captions-*"))  # its data is deleted after


@__import__("pytest").mark.parametrize("fix_idf", [False, True])
def test_tfidf_counted_in_chunks_is_the_releases(fix_idf):
    """tfidf_matrix counts pairs chunk by chunk (bounded memory at VQA v2 + VG size): the same
    matrix as the release's one-list computation, its IDF bug included, however it is chunked."""
    import numpy as np

    from ban.text import Dictionary, tfidf_matrix
    from tests.test_text import release_tfidf

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(words, rng.integers(0, 9))) for i in range(300)]
    d = Dictionary.build(texts[:100], release_unk=True)  # later texts bring extra words
    expected, expected_extra = release_tfidf(texts, d.words, fix_idf)
    for chunk in (7, 1000):
        matrix, extra = tfidf_matrix(texts, d, fix_idf=fix_idf, chunk_texts=chunk)
        assert extra == expected_extra
        np.testing.assert_allclose(matrix.to_dense().numpy(), expected, rtol=1e-6, atol=1e-7)
