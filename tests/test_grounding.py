"""Recall@K, the upper bound, per-type recall, the loss, and a tiny end-to-end grounding run."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ban
from ban import cli, configs, engine, metrics
from ban.data import flickr
from ban.data.features import FeatureStore, Region, write_tsv
from ban.tasks import grounding


def test_recall_at_k_ranks_real_boxes_with_stable_ties():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3],  # positive ranked 2nd
            [0.5, 0.5, 0.1, -99.0],  # tie: the lower index wins, so the positive is 2nd
            [0.4, 0.3, 0.2, 0.1],  # no positive proposal
            [0.1, 0.2, 0.0, 5.0],  # the only "positive" is a padded box: never a hit
        ]
    )
    positives = torch.tensor(
        [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    box_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    hits = metrics.phrase_hits(scores, positives, box_mask, ks=(1, 2, 10))
    assert hits.int().tolist() == [[0, 1, 1], [0, 1, 1], [0, 0, 0], [0, 0, 0]]
    top = metrics.ranked_boxes(scores, box_mask, 4)
    assert top[1].tolist() == [0, 1, 2, 3]  # the padded box last
    assert top[3].tolist()[:3] == [1, 0, 2]


def test_recall_report_counts_misses_and_types():
    hits = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 0], [0, 0, 1]], dtype=bool)
    covered = np.array([1, 1, 0, 1], dtype=bool)  # phrase 2: no proposal covers it, a miss
    types = [["people"], ["bodyparts", "people"], ["scene"], ["other"]]
    report = metrics.recall_report(
        hits, covered, types, "any", ks=(1, 5, 10), type_order=flickr.TYPES
    )
    assert report["protocol"] == "any" and report["phrases"] == 4
    assert report["R@1"] == 25.0 and report["R@5"] == 50.0 and report["R@10"] == 75.0
    assert report["upper_bound"] == 75.0
    people = report["per_type"]["people"]  # the multi-type phrase counts in both of its types
    assert people["phrases"] == 2 and people["R@1"] == 50.0 and people["R@5"] == 100.0
    assert report["per_type"]["bodyparts"]["phrases"] == 1
    assert report["per_type"]["scene"]["upper_bound"] == 0.0
    assert set(report["per_type"]) == {"people", "bodyparts", "scene", "other"}


def test_token_ids_are_checked_on_the_host_naming_the_image():
    config = ban.BANConfig(vocab_size=10, embedding_dim=4, tfidf_embedding=False, hidden=8,
                           glimpses=1, visual_dim=6, task="grounding")  # fmt: skip
    model = ban.build(config)
    batch = {"v": torch.rand(2, 5, 6), "q": torch.tensor([[1, 2, 10], [3, 11, 10]]),
             "positions": torch.tensor([[1], [1]]), "box_mask": torch.ones(2, 5, dtype=torch.bool),
             "meta": [{"image_id": 7}, {"image_id": 8}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"image 8: token ids must be in 0..10 .*\[3, 11, 10\]"):
        grounding.forward(model, batch, torch.device("cpu"), model.config.vocab_size)
    batch["q"][1, 1] = 4
    assert grounding.forward(model, batch, torch.device("cpu"), model.config.vocab_size).shape == (
        2,
        1,
        5,
    )


def test_loss_is_bce_summed_over_real_phrases_divided_by_captions():
    scores = torch.randn(3, 2, 5)
    target = (torch.rand(3, 2, 5) > 0.7).float()
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]]).bool()
    expected = sum(
        F.binary_cross_entropy_with_logits(scores[b, e], target[b, e], reduction="sum")
        for b in range(3)
        for e in range(2)
        if mask[b, e]
    )
    loss = grounding.grounding_loss(scores, target, mask).item()
    assert loss == pytest.approx(expected.item() / 3, rel=1e-5)
    # a padded box (score -99, target 0) adds about nothing
    assert F.binary_cross_entropy_with_logits(torch.tensor(-99.0), torch.tensor(0.0)) < 1e-30


# ---------------------------------------------------------------------------------------------
# A tiny RAW directory in the real formats

WORDS = ["red", "blue", "green"]


def _write_raw(root, seed=0):
    rng = np.random.default_rng(seed)
    fl = root / "flickr30k"
    (fl / "Sentences").mkdir(parents=True)
    (fl / "Annotations").mkdir()
    (root / "features").mkdir()
    regions = []
    splits = {"train": [1, 2, 3, 4], "val": [5, 6, 7], "test": [8]}
    for split, ids in splits.items():
        (fl / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for image_id in ids:
            objects = []
            for k, color in enumerate(WORDS):
                x, y = 10 + 60 * k, int(rng.integers(5, 100))
                objects.append((100 * image_id + k + 1, color, [x, y, x + 40, y + 40]))
            lines = [
                f"[/EN#{objects[0][0]}/people A {objects[0][1]} man] , and "
                f"[/EN#{objects[1][0]}/animals/other a {objects[1][1]} dog] near "
                f"[/EN#0/notvisual each other] .",
                f"[/EN#{objects[2][0]}/vehicles The {objects[2][1]} car] is here .",
            ]
            (fl / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
            xml = ["<annotation>", "<size><width>200</width><height>160</height>"]
            xml.append("<depth>3</depth></size>")
            for chain, _, (x1, y1, x2, y2) in objects:
                xml.append(
                    f"<object><name>{chain}</name><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}"
                    f"</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                )
            xml.append("</annotation>")
            (fl / "Annotations" / f"{image_id}.xml").write_text("\n".join(xml) + "\n")
            boxes = [box for _, _, box in objects]
            extra = rng.uniform(0, 100, size=(9, 2))
            boxes += [[a, b, a + 30, b + 30] for a, b in extra]  # 12 boxes, 3 exact
            features = rng.normal(size=(len(boxes), 8)).astype(np.float32)
            features[:3] += np.eye(3, 8, dtype=np.float32) * 3
            regions.append(Region(image_id, 200, 160, np.array(boxes, np.float32), features))
    write_tsv(root / "features" / "tiny.tsv", regions)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    raw = _write_raw(root / "raw")
    return flickr.prepare_flickr(raw, root / "prepared")


def test_prepared_directory_counts(prepared):
    manifest = flickr.read_prepared_manifest(prepared)
    assert manifest["splits"]["val"] == {
        "images": 3,
        "captions": 6,
        "phrases": 12,
        "evaluated_phrases": 9,
        "boxes": 36,
    }
    records = flickr.read_records(prepared, "val")
    assert len(records) == 6


def test_max_images_keeps_the_first_images_of_each_split(prepared, tmp_path):
    raw = flickr.read_prepared_manifest(prepared)["raw_dir"]
    cut = flickr.prepare_flickr(raw, tmp_path / "cut", max_images=2)
    manifest = flickr.read_prepared_manifest(cut)
    assert manifest["max_images"] == 2 and manifest["splits"]["val"]["images"] == 2
    first_two = flickr.read_split(f"{raw}/flickr30k/val.txt")[:2]
    assert {r["image_id"] for r in flickr.read_records(cut, "val")} == set(first_two)
    assert sorted(FeatureStore(cut / "features" / "val.h5").image_ids()) == sorted(first_two)


def test_last_batch_of_one_and_predictions(prepared):
    config = configs.override(
        configs.recipe("flickr-small"), {"model.hidden": 16, "model.embedding_dim": 8}
    )
    model = grounding.build_model(config, prepared)
    report, rows = grounding.evaluate(model, prepared, "test", batch_size=1)  # 2 captions
    assert report["phrases"] == 3 and report["captions"] == 2 and len(rows) == 3
    report5, _ = grounding.evaluate(model, prepared, "val", batch_size=5)  # last batch: 1 caption
    report1, _ = grounding.evaluate(model, prepared, "val", batch_size=1)
    for key in ("R@1", "R@5", "R@10", "upper_bound"):
        assert report5[key] == report1[key]
    assert report5["upper_bound"] == 100.0  # every phrase's box is a proposal
    assert report5["loss"] == pytest.approx(report1["loss"], rel=1e-4)
    row = rows[0]
    assert row["phrase"] == "A red man" and row["types"] == ["people"]
    assert len(row["boxes"]) == 10 and {"hit@1", "hit@5", "hit@10", "covered"} <= set(row)


def test_tiny_end_to_end_train_and_evaluate(prepared, tmp_path, capsys):
    config = configs.resolve(
        "flickr-small",
        overrides={
            "data": str(prepared),
            "epochs": 2,
            "batch_size": 4,
            "model.hidden": 16,
            "model.embedding_dim": 8,
        },
    )
    result = engine.train(config, tmp_path / "run", progress=False)
    assert result.status == "finished" and result.report["protocol"] == "any"
    run = tmp_path / "run"
    assert (run / "best.safetensors").is_file() and (run / "report.json").is_file()
    assert sum(1 for _ in open(run / "predictions.jsonl")) == 9
    code = cli.main(["evaluate", str(run), "--split", "test", "--protocol", "merged"])
    assert code == 0
    out = capsys.readouterr().out
    assert "test [MERGED protocol] 3 phrases" in out
    report = json.loads((run / "eval-test-merged" / "report.json").read_text())
    assert report["protocol"] == "merged" and set(report["per_type"]) == {
        "people",
        "animals",
        "vehicles",
        "other",
    }
    assert report["per_type"]["other"]["phrases"] == 1  # the animals/other phrase, in both
    # the release's positions go to a folder of their own, not over the clean evaluation
    assert (
        cli.main(["evaluate", str(run), "--split", "test", "--protocol", "merged", "--compat"]) == 0
    )
    assert (run / "eval-test-merged-compat" / "report.json").is_file()
    assert json.loads((run / "eval-test-merged" / "report.json").read_text()) == report


def _tiny_grounding(prepared, **overrides):
    values = {
        "data": str(prepared),
        "epochs": 2,
        "batch_size": 4,
        "model.hidden": 16,
        "model.embedding_dim": 8,
        **overrides,
    }
    return configs.resolve("flickr-small", overrides=values)


def test_interrupted_and_resumed_grounding_run_is_exact(prepared, tmp_path):
    from safetensors.torch import load_file

    config = _tiny_grounding(prepared)
    whole = engine.train(config, tmp_path / "whole", progress=False)
    part = engine.train(config, tmp_path / "part", max_steps=3, progress=False)
    assert part.status == "stopped" and part.report is None
    assert (part.progress.epoch, part.progress.step_in_epoch) == (1, 1)  # 2 steps an epoch
    with pytest.raises(ValueError, match="already holds a run"):
        engine.train(config, tmp_path / "part", progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        engine.train(_tiny_grounding(prepared, lr=0.5), tmp_path / "part", resume=True)
    resumed = engine.train(config, tmp_path / "part", resume=True, progress=False)
    assert resumed.status == "finished"
    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.report["R@1"] == whole.report["R@1"]
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        engine.train(config, tmp_path / "empty", resume=True)


def test_grounding_trains_with_bf16_autocast_and_the_unitary_baseline(prepared, tmp_path):
    config = _tiny_grounding(prepared, epochs=1, amp="bf16", **{"model.attention": "unitary"})
    result = engine.train(config, tmp_path / "run", progress=False)
    assert result.status == "finished" and 0 <= result.report["R@1"] <= 100
    model = ban.load(tmp_path / "run" / "best.safetensors")
    assert type(model).__name__ == "UnitaryGrounding"


@pytest.mark.slow
def test_grounding_trains_under_ddp_like_one_process(prepared, tmp_path):
    """Grounding gains DDP from the one engine: 2 gloo processes (local batch 2) against 1 (batch
    4) take the same captions per step, so the same gradient norms and weights up to summation
    order."""
    from safetensors.torch import load_file

    from tests.test_engine import train_in_one_and_two_processes

    common = ["--task", "flickr", "--data", str(prepared), "--epochs", "2", "--batch-size", "4",
              "--quiet", "--set", "model.hidden=16", "--set", "model.embedding_dim=8",
              "--set", "model.dropout=0", "--set", "model.attention_dropout=0",
              "--set", "log_every=1"]  # fmt: skip
    train_in_one_and_two_processes(tmp_path, common)

    def steps(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "step"]

    assert len(steps("one")) == len(steps("two")) == 4
    for a, b in zip(steps("one"), steps("two"), strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    wa = load_file(str(tmp_path / "one" / "last.safetensors"))
    wb = load_file(str(tmp_path / "two" / "last.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-3, msg=key)
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report_one["phrases"] == report_two["phrases"]
