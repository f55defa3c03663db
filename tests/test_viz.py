"""`ban visualize` and `ban evaluate --gallery`: pictures made, non-empty, of the right size."""

import numpy as np
import pytest
from PIL import Image

from ban import viz
from ban.cli import main
from tests.test_engine import TINY_MODEL
from tests.viz_run import first_question, tiny_viz_run

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_viz_run(tmp_path_factory)


def assert_picture(path, size=None):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    if size is not None:
        assert (pixels.shape[1], pixels.shape[0]) == size
    assert pixels.std() > 10  # not a blank page


def test_visualize_writes_the_picture(run, tmp_path, capsys):
    run_dir, data = run
    entry = first_question(data)
    out = tmp_path / "a.png"
    code = main(["visualize", str(run_dir), "--image-id", str(entry["image_id"]),
                 "--question", entry["question"], "--out", str(out)])  # fmt: skip
    assert code == 0
    assert_picture(out, viz.figure_size(TINY_MODEL["model.glimpses"]))
    assert "wrote" in capsys.readouterr().out


def test_attention_maps_and_glimpse_colours(run):
    from ban.predict import Predictor

    run_dir, data = run
    predictor = Predictor.from_checkpoint(run_dir, data=data)
    entry = first_question(data)
    prediction, attention = viz.attend(predictor, entry["question"], entry["image_id"])
    glimpses = TINY_MODEL["model.glimpses"]
    assert attention.shape[0] == glimpses and attention.shape[2] == len(prediction.tokens)
    # a softmax over regions x positions, of which the question's words are shown
    assert (attention >= 0).all() and (attention.sum(axis=(1, 2)) <= 1 + 1e-5).all()
    # the top boxes of glimpse 1 are drawn in its colour on the picture
    picture = viz.render(
        prediction, attention, Image.new("RGB", (320, 240), "white"), np.zeros((1, 4))
    )
    assert picture.size == viz.figure_size(glimpses)
    blue = np.array([0x1F, 0x77, 0xB4])
    assert (np.abs(np.asarray(picture).astype(int) - blue).sum(axis=2) < 30).sum() > 50


def test_image_folder_builds_names_from_ids_only(run, tmp_path):
    _, data = run
    images = viz.ImageFolder.for_data(data)
    entry = first_question(data)
    assert images.path(entry["image_id"]).name == f"{entry['image_id']}.png"
    for bad in ["../../etc/passwd", "1.png", -1, True, 1.5, None]:
        assert images.path(bad) is None
    # no picture: a blank canvas covering the boxes
    blank = viz.ImageFolder(tmp_path).open(7, np.array([[0, 0, 100, 50]], dtype=np.float32))
    assert blank.size == (100, 50)
    with pytest.raises(FileNotFoundError, match="image folder"):
        viz.ImageFolder.for_data(data, tmp_path / "missing")


def test_evaluate_gallery(run, tmp_path, capsys):
    run_dir, data = run
    out = tmp_path / "eval"
    code = main(["evaluate", str(run_dir), "--data", str(data), "--out", str(out),
                 "--gallery", "3", "--device", "cpu"])  # fmt: skip
    assert code == 0
    pictures = sorted((out / "gallery").glob("*-*.png"))
    assert len(pictures) == 3
    assert all(p.name.startswith(("right-", "wrong-")) for p in pictures)
    for p in pictures:
        assert_picture(p, viz.figure_size(TINY_MODEL["model.glimpses"]))
    assert_picture(out / "gallery" / "accuracy_by_question_type.png")
    assert "wrote 4 pictures" in capsys.readouterr().out


def test_pictured_lists_the_ids_that_path_finds(tmp_path):
    (tmp_path / "val2014").mkdir()
    for name in ("5.png", "6.jpg", "007.png", "x.png", "val2014/COCO_val2014_000000000042.jpg"):
        (tmp_path / name).write_bytes(b"")
    folder = viz.ImageFolder(tmp_path)
    ids = [5, 6, 7, 8, 42]
    assert folder.pictured(ids) == {i for i in ids if folder.path(i) is not None} == {5, 6, 42}
    assert viz.ImageFolder(None).pictured(ids) == set()
