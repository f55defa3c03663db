"""The scene benchmark featurised by a picture backbone (`generate(features="backbone")`, `ban data
synth --features backbone`): a tiny random conv network through ban.data.images' interface, so the
test needs neither the ban[images] extra nor much time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ban.data import scenes
from ban.data.features import read_tsv

TINY = {"train_images": 4, "val_images": 2, "test_images": 2, "workers": 1}
DIM = 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, DIM, 3, stride=8, padding=1), nn.ReLU()).eval()


def _generate(out: Path, **kwargs) -> Path:
    return scenes.generate(out, seed=3, features="backbone", backbone=_net(), **TINY, **kwargs)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("scenes_bb") / "raw", backbone_size=64, grid=4)


def test_backbone_rows_tile_each_picture(raw):
    truth = json.loads((raw / "scenes.json").read_text())
    options = truth["options"]
    assert options["features"] == "backbone" and options["feature_dim"] == DIM
    assert options["grid"] == 4 and options["size"] == 64 and options["boxes"] == 16
    for split, info in truth["splits"].items():
        path = raw / "features" / f"scenes_{split}.tsv"
        assert path.read_bytes().endswith(b"\r\n")
        rows = list(read_tsv(path))
        assert [r.image_id for r in rows] == [s["image_id"] for s in info["images"]]
        for row, scene in zip(rows, info["images"], strict=True):
            with Image.open(raw / "images" / f"{row.image_id}.png") as picture:
                assert (row.width, row.height) == picture.size
            assert (row.width, row.height) == (scene["width"], scene["height"])
            assert row.boxes.shape == (16, 4) and row.features.shape == (16, DIM)
            b = row.boxes.astype(np.float64)
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            # the cells tile the picture: they fill its area and stay inside it
            area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
            assert area == pytest.approx(row.width * row.height, rel=1e-5)
            assert b[:, :2].min() == 0 and b[:, 2].max() == pytest.approx(row.width)
            assert b[:, 3].max() == pytest.approx(row.height)
            assert np.isfinite(row.features).all() and row.features.std() > 0
    assert not list((raw / "features").glob(".*"))  # no leftover simulated-detector parts


def test_same_seed_same_bytes(raw, tmp_path):
    again = _generate(tmp_path / "again", backbone_size=64, grid=4)
    assert _files(again) == _files(raw)


def test_bad_backbone_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="grid >= 4"):
        _generate(tmp_path / "a", grid=3)
    with pytest.raises(ValueError, match="images=False"):
        _generate(tmp_path / "b", images=False)
    with pytest.raises(ValueError, match="features must be"):
        scenes.generate(tmp_path / "c", features="pixels", **TINY)


def test_prepare_reads_backbone_features(raw, tmp_path):
    import h5py

    from ban.data.prepare import prepare

    out = Path(prepare(raw, tmp_path / "prepared", min_answer_count=1, progress=False))
    h5 = sorted((out / "features").glob("*.h5"))
    assert h5
    with h5py.File(h5[0], "r") as f:
        assert f["image_features"].shape[1] == DIM


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_cli_synth_backbone_file(tmp_path):
    from ban.cli import main

    net = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(_net()), str(net))
    out = tmp_path / "raw"
    args = ["data", "synth", "--out", str(out), "--train-images", "3", "--val-images", "2"]
    args += ["--test-images", "0", "--workers", "1", "--features", "backbone"]
    assert main([*args, "--backbone", str(net), "--size", "64", "--grid", "5"]) == 0
    rows = list(read_tsv(out / "features" / "scenes_train2014.tsv"))
    assert len(rows) == 3 and rows[0].features.shape == (25, DIM)
    assert main([*args, "--backbone", str(net), "--grid", "2"]) == 2
