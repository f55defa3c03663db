"""benchmarks/scene_ablation.py: the reference rows by hand, and the script end to end (tiny)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import benchmark_scripts
from tests.test_engine import make_tiny_data

SCRIPT = benchmark_scripts.BENCHMARKS / "scene_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    return benchmark_scripts.load("scene_ablation")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("ablation"))


def test_reference_rows_score_chance_with_the_official_metric(ablation, tiny):
    from ban.data.prepare import read_manifest
    from ban.metrics import vqa_accuracy

    rows = {row["row"]: row for row in ablation.reference_rows(tiny)}
    raw = Path(read_manifest(tiny)["raw_dir"])
    train = json.loads((raw / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    val = json.loads((raw / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    seen = {}
    for a in train:
        seen.setdefault(a["question_type"], set()).add(a["multiple_choice_answer"])
    expected = [
        sum(vqa_accuracy(c, [h["answer"] for h in a["answers"]]) for c in seen[a["question_type"]])
        / len(seen[a["question_type"]])
        for a in val
    ]
    assert rows["chance"]["overall"] == pytest.approx(100 * sum(expected) / len(expected))
    for row in rows.values():
        assert 0 <= row["overall"] <= 100 and row["parameters"] == 0


def test_script_trains_rows_writes_the_table_and_reads_finished_runs_back(tiny, tmp_path):
    command = [sys.executable, str(SCRIPT), "--data", str(tiny), "--out", str(tmp_path)]
    command += ["--rows", "question-only", "ban-1", "--epochs", "1", "--set", "batch_size=16"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "training in" in first.stdout
    table = (tmp_path / "table.md").read_text()
    for label in ("question only (no image)", "BAN-1", "chance"):
        assert f"| {label}" in table
    results = json.loads((tmp_path / "results.json").read_text())
    trained = {r["row"]: r for r in results if r["seed"] is not None}
    assert set(trained) == {"question-only", "ban-1"}
    assert trained["ban-1"]["parameters"] > trained["question-only"]["parameters"]
    for row in trained.values():
        families = [row[f] for f in ("existence", "counting", "attribute", "comparison")]
        assert all(0 <= value <= 100 for value in families)
        assert "spatial" not in row  # not in the default mix
    assert "| spatial |" not in table and "| comparison |" in table
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "training in" not in second.stdout  # finished rows are read back, not retrained
    assert (tmp_path / "table.md").read_text() == table


def test_family_probe_scores_every_family_on_the_first_images(tiny):
    probe = benchmark_scripts.load("family_probe")
    train, families = probe.family_subset(tiny, "train2014", None, images=5)
    assert len(train) == len(families) and 5 <= len(train) <= 20  # at most 4 questions an image
    assert {train.dataset.entries[i]["image_id"] for i in train.indices} == set(
        range(1_000_001, 1_000_006)
    )
    only, _ = probe.family_subset(tiny, "train2014", {"counting"})
    assert len(only) == 24  # one counting question per image
    command = [sys.executable, str(benchmark_scripts.BENCHMARKS / "family_probe.py")]
    command += ["--data", str(tiny), "--family", "all", "--train-images", "8", "--steps", "2"]
    command += ["--every", "1", "--batch-size", "4", "--threads", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert out.count("val score") == 2 and "existence" in out and "comparison" in out
