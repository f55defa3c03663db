"""Batched answers (`Predictor.answer_batch`, `ban.serve.Batcher`): the same answers as one at a
time, on different images with different box counts; batches bounded and a lone question not
held back."""

import json
import threading
import time
import types

import numpy as np
import pytest
import torch

import ban
from ban.data.features import Region, convert_features, write_tsv
from ban.predict import Predictor
from ban.serve import Batcher
from ban.text import UNK, Dictionary

BOX_COUNTS = {1: 10, 2: 17, 3: 36, 4: 23, 5: 12}  # image id -> boxes (the counter needs >= 10)


def _model():
    config = ban.preset("ban-8-vqa", vocab_size=12, embedding_dim=8, hidden=16, glimpses=3,
                        num_answers=30, visual_dim=8)  # fmt: skip
    torch.manual_seed(0)
    model = ban.BAN(config).eval()
    model.vocabulary = ["what", "is", "the", "color", "how", "many", "are", "there", "red",
                        "cubes", "left", UNK]  # fmt: skip
    model.answers = [f"answer{i}" for i in range(30)]
    return model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-data")
    rng = np.random.default_rng(0)
    regions = []
    for image_id, n in BOX_COUNTS.items():
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (n, 2))], axis=1)
        features = rng.random((n, 8), dtype=np.float32)
        regions.append(Region(image_id, 400, 400, boxes.astype(np.float32), features))
    write_tsv(root / "f.tsv", regions)
    (root / "features").mkdir()
    convert_features(root / "f.tsv", root / "features" / "val2014.h5", progress=False)
    model = _model()
    (root / "manifest.json").write_text("{}")
    Dictionary(model.vocabulary).save(root / "dictionary.json")
    (root / "answers.json").write_text(json.dumps(model.answers))
    return Predictor(model, data=root)


def test_a_batch_answers_as_singles(predictor):
    questions = ["what is the color", "how many red cubes are there", "what is left of the cube",
                 "how many", "what is the color", "is there a zebra"]  # fmt: skip
    image_ids = [3, 1, 2, 4, 5, 3]
    top_k, top_boxes = [5, 3, 30, 1, 5, 2], [3, 10, 1, 3, 5, 36]
    batch = predictor.answer_batch(questions, image_ids, top_k, top_boxes)
    assert len(batch) == len(questions)
    for k, got in enumerate(batch):
        want = predictor(questions[k], image_ids[k], top_k=top_k[k], top_boxes=top_boxes[k])
        assert (got.question, got.image_id, got.tokens) == (want.question, want.image_id,
                                                            want.tokens)  # fmt: skip
        assert [a for a, _ in got.answers] == [a for a, _ in want.answers]
        assert np.allclose([s for _, s in got.answers], [s for _, s in want.answers], atol=1e-5)
        assert len(got.boxes) == len(want.boxes) == 3
        for g, w in zip(got.boxes, want.boxes, strict=True):
            assert len(g) == len(w) == min(top_boxes[k], BOX_COUNTS[image_ids[k]])
            assert [b.index for b in g] == [b.index for b in w]  # never a padded box
            assert [b.box for b in g] == [b.box for b in w]
            assert np.allclose([b.weight for b in g], [b.weight for b in w], atol=1e-5)
    # one question alone, and a batch of one image's questions, answer alike too
    alone = predictor.answer_batch(questions[:1], image_ids[:1])[0]
    assert alone.answers[0][0] == predictor(questions[0], image_ids[0]).answers[0][0]
    assert predictor.answer_batch([], []) == []
    with pytest.raises(ValueError, match="2 questions but 1 image ids"):
        predictor.answer_batch(["a", "b"], [1])
    with pytest.raises(KeyError, match="image 99"):
        predictor.answer_batch(["a"], [99])


def test_attended_boxes_are_each_glimpses_heaviest_as_a_naive_loop_finds_them():
    from ban.predict import _attended_boxes

    rng = np.random.default_rng(3)
    mass = torch.from_numpy(rng.random((8, 36), dtype=np.float32))
    pixel_boxes = (rng.random((36, 4)) * 640).astype(np.float32)
    pixel_boxes[0] = [0.125, 2.675, 1.005, 639.995]  # halfway cases for rounding
    for k in (1, 3, 36, 50):
        got = _attended_boxes(mass, pixel_boxes, k)
        assert len(got) == 8
        for glimpse, boxes in zip(mass.tolist(), got, strict=True):
            order = sorted(range(36), key=lambda i: -glimpse[i])[: min(k, 36)]
            assert [b.index for b in boxes] == order
            assert [b.weight for b in boxes] == [round(glimpse[i], 6) for i in order]
            assert [b.box for b in boxes] == [
                [round(float(x), 2) for x in pixel_boxes[i]] for i in order
            ]


def _same(got, want):
    assert [a for a, _ in got.answers] == [a for a, _ in want.answers]
    assert np.allclose([s for _, s in got.answers], [s for _, s in want.answers], atol=1e-5)
    assert [[b.index for b in g] for g in got.boxes] == [[b.index for b in w] for w in want.boxes]


def test_the_image_cache_changes_no_answer(predictor, monkeypatch):
    plain = Predictor(_model(), data=predictor.data_dir, image_cache_bytes=0)
    assert plain.model.image_cache is None
    cache = predictor.model.image_cache
    assert cache is not None and cache.max_bytes == 256 * 2**20  # on by default
    cache.clear()
    hits, misses = cache.hits, cache.misses
    asked = [("what is the color", 3), ("how many red cubes are there", 3), ("how many", 1),
             ("is there a zebra", 3)]  # fmt: skip
    for question, image_id in asked:
        _same(predictor(question, image_id), plain(question, image_id))
    assert (cache.hits - hits, cache.misses - misses, len(cache)) == (2, 2, 2)
    batch = predictor.answer_batch([q for q, _ in asked], [i for _, i in asked])
    for got, (question, image_id) in zip(batch, asked, strict=True):
        _same(got, plain(question, image_id))
    # an uploaded picture given the id of another: answered about the new one, not the kept one
    rng = np.random.default_rng(1)

    def region(boxes):
        xy = rng.uniform(0, 300, (boxes, 2)).astype(np.float32)
        return types.SimpleNamespace(features=rng.random((boxes, 8), dtype=np.float32),
                                     boxes=np.concatenate([xy, xy + 50], axis=1),
                                     width=400, height=400)  # fmt: skip

    pictures = [region(12), region(12)]
    for p in (predictor, plain):
        monkeypatch.setattr(p, "_extractor", lambda picture: pictures[picture])
    for picture in (0, 1):
        assert predictor.add_picture(picture, image_id=-5) == plain.add_picture(picture, -5)
        _same(predictor("how many", -5), plain("how many", -5))
    predictor.remove_picture(-5)
    assert all(key[0] != -5 for key in cache._entries)
    # ids given by add_picture are never one in use or used before
    ids = [predictor.add_picture(0), predictor.add_picture(1, image_id=-2)]
    predictor.remove_picture(ids[0])
    ids.append(predictor.add_picture(1))
    assert ids == [-1, -2, -3]
    for image_id in ids[1:]:
        predictor.remove_picture(image_id)


def test_batcher_takes_what_queued_while_busy():
    started, release, sizes = threading.Event(), threading.Event(), []

    def answer(items):
        sizes.append(len(items))
        started.set()
        release.wait(10)
        return [ValueError("bad") if x == "bad" else x * 2 for x in items]

    batcher = Batcher(answer, max_batch=4)
    first = batcher.submit(1)
    assert started.wait(10)  # a lone question goes at once, in a batch of its own
    queued = [batcher.submit(x) for x in [2, 3, "bad", 5, 6, 7]]
    release.set()
    assert first.result(10) == 2
    assert [f.result(10) for f in queued if f is not queued[2]] == [4, 6, 10, 12, 14]
    with pytest.raises(ValueError, match="bad"):  # only the question at fault fails
        queued[2].result(10)
    assert sizes == [1, 4, 2]  # what queued meanwhile, at most max_batch at a time
    assert (batcher.batches, batcher.questions) == (3, 7)
    batcher.close()


def _gated_batcher(**kwargs):
    """A batcher whose model notes each forward's size and answers once `gate` is set (it is)."""
    gate, sizes = threading.Event(), []

    def answer(items):
        sizes.append(len(items))
        gate.wait(10)
        return items

    gate.set()
    return Batcher(answer, **kwargs), gate, sizes


def _busy_then(batcher, gate, sizes, queued):
    """Hold the model busy with one question while `queued` arrive; release it; the futures."""
    gate.clear()
    busy = batcher.submit(-1)
    count = len(sizes)
    while len(sizes) == count:  # the model is busy with it
        time.sleep(0.01)
    futures = [batcher.submit(k) for k in queued]
    gate.set()
    assert busy.result(10) == -1
    return futures


def test_batcher_waits_for_as_many_as_lately():
    batcher, gate, sizes = _gated_batcher(max_batch=5, max_wait=2.0)
    start = time.perf_counter()
    assert batcher.submit("alone").result(10) == "alone"
    assert time.perf_counter() - start < 1.5  # a lone question after a quiet spell goes at once
    # five questions queue while the model is busy: one forward of five, without waiting
    five = _busy_then(batcher, gate, sizes, [1, 2, 3, 4, 5])
    assert [f.result(10) for f in five] == [1, 2, 3, 4, 5]
    assert sizes == [1, 1, 5]
    futures = [batcher.submit(k) for k in (6, 7, 8)]  # as the five clients ask again
    time.sleep(0.3)  # the three wait (at most 2 s) for as many as the last forward held
    start = time.perf_counter()
    futures += [batcher.submit(k) for k in (9, 10)]
    assert [f.result(10) for f in futures] == [6, 7, 8, 9, 10]
    assert time.perf_counter() - start < 1.5  # the fifth makes the batch go at once
    assert sizes == [1, 1, 5, 5]
    time.sleep(2.5)  # a quiet spell longer than max_wait: nobody is about to ask
    start = time.perf_counter()
    assert batcher.submit("alone again").result(10) == "alone again"
    assert time.perf_counter() - start < 1.5
    batcher.close()
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda items: items, max_batch=0)


def test_batcher_does_not_wait_for_clients_that_do_not_exist():
    # was: under load every forward waited max_wait for a full batch; with four clients and a
    # fast model it waited for twelve that never came (default size, concurrency 4: 284 against
    # 479 requests/s one at a time)
    batcher, gate, sizes = _gated_batcher(max_batch=16, max_wait=60.0)
    assert [f.result(10) for f in _busy_then(batcher, gate, sizes, [1, 2, 3, 4])] == [1, 2, 3, 4]
    for _ in range(3):  # four clients ask again and again: each forward takes the four
        futures = [batcher.submit(k) for k in (5, 6, 7, 8)]
        assert [f.result(30) for f in futures] == [5, 6, 7, 8]  # not after the 60 s
    assert sizes[:2] == [1, 4] and sum(sizes[2:]) == 12 and max(sizes) == 4
    batcher.close()


def test_calls_run_on_the_model_thread_in_turn():
    # was: the model was loaded on the main thread and uploads featurised on request threads; each
    # thread that calls into torch gets its own OpenMP team, and more teams than cores made every
    # forward ~1.8x slower
    entered, gate, order = threading.Event(), threading.Event(), []

    def answer(items):
        entered.set()
        gate.wait(10)
        order.append(("answer", items, threading.current_thread().name))
        return items

    def note(tag):
        order.append(("call", tag, threading.current_thread().name))
        return tag

    batcher = Batcher(answer, max_batch=8)
    busy = batcher.submit(0)
    assert entered.wait(10)  # the model is busy with question 0
    futures = [batcher.submit(1), batcher.call(note, "a"), batcher.submit(2), batcher.submit(3)]
    failing = batcher.call(lambda: 1 / 0)
    gate.set()
    assert [f.result(10) for f in [busy, *futures]] == [0, 1, "a", 2, 3]
    with pytest.raises(ZeroDivisionError):
        failing.result(10)
    # in turn: the batch queued before the call, the call, then the questions queued after it
    assert [(kind, what) for kind, what, _ in order] == [
        ("answer", [0]),
        ("answer", [1]),
        ("call", "a"),
        ("answer", [2, 3]),
    ]
    assert {thread for *_, thread in order} == {"ban-batcher"}
    assert batcher.submit(4).result(10) == 4  # it goes on after a failed call
    batcher.close()


def test_the_served_model_is_loaded_on_the_model_thread(monkeypatch, predictor):
    from ban import serve

    threads = []

    def from_checkpoint(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return predictor

    monkeypatch.setattr(serve.Predictor, "from_checkpoint", from_checkpoint)
    app = serve.load_app("any-run")
    assert threads == ["ban-batcher"] and app.batcher.answer == app._answer_batch
    app.batcher.close()
    monkeypatch.setattr(serve.Predictor, "from_checkpoint", lambda *a, **k: 1 / 0)
    before = threading.active_count()
    with pytest.raises(ZeroDivisionError):  # a failed load leaves no model thread behind
        serve.load_app("any-run")
    assert threading.active_count() == before


def test_served_answers_are_those_of_one_at_a_time(predictor):
    from concurrent.futures import ThreadPoolExecutor

    from ban.serve import App, Question

    batched, single = App(predictor, max_batch=16), App(predictor, max_batch=1)
    asked = ["how many", "what is the color", "is there"] * 12
    questions = [Question(image_id=1 + k % 5, question=q, top_k=3) for k, q in enumerate(asked)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(batched.answer, questions))
    apart = [single.answer(q) for q in questions]
    for a, b in zip(together, apart, strict=True):
        assert [x["answer"] for x in a["answers"]] == [x["answer"] for x in b["answers"]]
        assert json.dumps(a["tokens"]) == json.dumps(b["tokens"])
    assert single.batcher.batches == len(questions)
    batched.batcher.close()
    single.batcher.close()
