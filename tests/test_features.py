import base64

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ban.data.features import (
    FeatureStore,
    Region,
    convert_features,
    encode_row,
    read_tsv,
    write_tsv,
)

DIM = 16


def _b64(array):
    return base64.b64encode(array.tobytes()).decode("ascii")


def make_regions(ids=(11, 12, 13, 14), boxes=(5, 3, 5, 7), seed=0):
    rng = np.random.default_rng(seed)
    regions = []
    for image_id, n in zip(ids, boxes, strict=True):
        w, h = 640.0, 480.0
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        b = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
        f = rng.standard_normal((n, DIM)).astype(np.float32)
        regions.append(Region(image_id, w, h, b.astype(np.float32), f))
    return regions


def spatial_reference(boxes, w, h):
    x1, y1, x2, y2 = boxes.T.astype(np.float64)
    return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], 1)


def test_tsv_line_is_the_bottom_up_format(tmp_path):
    r = make_regions()[1]
    fields = encode_row(r).rstrip("\n").split("\t")
    assert fields[:4] == ["12", "640", "480", "3"]
    boxes = np.frombuffer(base64.b64decode(fields[4]), dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(boxes, r.boxes)
    write_tsv(tmp_path / "a.tsv", [r])
    (back,) = list(read_tsv(tmp_path / "a.tsv"))
    np.testing.assert_array_equal(back.features, r.features)
    assert (back.image_id, back.width, back.height) == (12, 640.0, 480.0)


@pytest.mark.parametrize("fp16", [False, True])
def test_tsv_to_hdf5_round_trip(tmp_path, fp16):
    regions = make_regions()
    write_tsv(tmp_path / "a.tsv.0", regions[:2])
    write_tsv(tmp_path / "b.tsv", regions[2:])
    info = convert_features(
        [tmp_path / "a.tsv.0", tmp_path / "b.tsv"], tmp_path / "f.h5", fp16=fp16, progress=False
    )
    assert info == {"images": 4, "boxes": 20, "missing": []}
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["image_features"].dtype == (np.float16 if fp16 else np.float32)
        assert f["image_features"].shape == (20, DIM) and f["image_features"].maxshape[0] is None
        np.testing.assert_array_equal(f["pos_boxes"][()], [[0, 5], [5, 8], [8, 13], [13, 20]])
        np.testing.assert_array_equal(f["image_ids"][()], [11, 12, 13, 14])
        np.testing.assert_array_equal(f["image_size"][()], [[640, 480]] * 4)
    store = FeatureStore(tmp_path / "f.h5")
    assert len(store) == 4 and 13 in store and 99 not in store
    for r in regions:
        features, spatials = store[r.image_id]
        assert features.dtype == np.float32 and spatials.shape == (len(r.boxes), 6)
        expected = r.features.astype(np.float16).astype(np.float32) if fp16 else r.features
        np.testing.assert_array_equal(features, expected)
        np.testing.assert_allclose(
            spatials, spatial_reference(r.boxes, r.width, r.height), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(store.boxes(r.image_id), r.boxes)
    with pytest.raises(KeyError, match="image_id 99"):
        store[99]


def test_image_id_filter_reports_missing(tmp_path):
    write_tsv(tmp_path / "a.tsv", make_regions())
    info = convert_features(
        tmp_path / "a.tsv", tmp_path / "f.h5", image_ids=[12, 14, 77], progress=False
    )
    assert info == {"images": 2, "boxes": 10, "missing": [77]}
    assert FeatureStore(tmp_path / "f.h5").image_ids() == [12, 14]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: f[:4] + [f[4][:-7] + "!!"] + f[5:], "field 'boxes' is not valid base64"),
        (lambda f: f[:5] + [_b64(np.zeros(7, np.float32))], "field 'features' holds 7 floats"),
        (lambda f: f[:5] + [f[5][:-8]], "field 'features' has 315 bytes"),
        (lambda f: f[:3] + ["x"] + f[4:], "field 'num_boxes' is not a number"),
        (lambda f: f[:5], "expected 6 tab-separated fields"),
    ],
)
def test_corrupt_row_names_file_line_and_image(tmp_path, corrupt, message):
    regions = make_regions()
    lines = [encode_row(r) for r in regions]
    fields = lines[2].rstrip("\n").split("\t")
    lines[2] = "\t".join(corrupt(fields)) + "\n"
    (tmp_path / "bad.tsv").write_text("".join(lines))
    out = tmp_path / "out" / "f.h5"
    with pytest.raises(ValueError, match=r"bad.tsv:3 \(image_id 13\)") as error:
        convert_features(tmp_path / "bad.tsv", out, progress=False)
    assert message in str(error.value)
    assert list(out.parent.iterdir()) == []  # no half file, no temporary left


def test_different_feature_sizes_are_an_error(tmp_path):
    a, b = make_regions()[:2]
    b.features = b.features[:, :8].copy()
    write_tsv(tmp_path / "a.tsv", [a, b])
    with pytest.raises(ValueError, match="image_id 12: 8-d features"):
        convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()


class _Items(Dataset):
    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        features, _ = self.store[self.ids[i]]
        return torch.from_numpy(features).sum(0)


@pytest.mark.parametrize("in_memory", [False, True])
def test_store_is_lazy_and_works_in_dataloader_workers(tmp_path, in_memory):
    regions = make_regions()
    write_tsv(tmp_path / "a.tsv", regions)
    convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    store = FeatureStore(tmp_path / "f.h5", in_memory=in_memory)
    ids = [r.image_id for r in regions] * 3
    assert len(store) == 4
    assert store._file is None  # nothing held open by the main process
    loader = DataLoader(_Items(store, ids), batch_size=2, num_workers=2)
    got = torch.cat(list(loader))
    expected = torch.stack([torch.from_numpy(r.features).sum(0) for r in regions] * 3)
    torch.testing.assert_close(got, expected)
    assert store._file is None


def test_store_open_in_the_parent_still_reads_in_workers(tmp_path):
    regions = make_regions()
    write_tsv(tmp_path / "a.tsv", regions)
    convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    store = FeatureStore(tmp_path / "f.h5")
    ids = [r.image_id for r in regions]
    np.testing.assert_array_equal(store[ids[1]][0], regions[1].features)  # opens the file here
    got = torch.cat(list(DataLoader(_Items(store, ids), batch_size=2, num_workers=2)))
    expected = torch.stack([torch.from_numpy(r.features).sum(0) for r in regions])
    torch.testing.assert_close(got, expected)
    store.close()
    assert store._file is None and store._datasets is None
    np.testing.assert_array_equal(store[ids[2]][0], regions[2].features)  # and reopens


def test_many_long_source_names_fit(tmp_path):
    """HDF5 attributes hold at most 64 KiB: 20,000 long source names used to fail at commit
    ("object header message is too large") after all the work was done."""
    from ban.data.features import FeatureWriter

    names = [f"COCO_train2014_{i:012d}_{'x' * 60}.jpg" for i in range(20_000)]
    writer = FeatureWriter(tmp_path / "f.h5", fp16=False)
    for r in make_regions():
        writer.add(r)
    writer.commit(names, DIM)
    with h5py.File(tmp_path / "f.h5") as f:
        assert [s.decode() for s in f["sources"][[0, -1]]] == [names[0], names[-1]]
        assert len(f["sources"]) == 20_000
    assert len(FeatureStore(tmp_path / "f.h5")) == 4


def _interrupt_after(monkeypatch, k):
    """Make the k+1-th parsed TSV row raise, as a crash in the middle of a conversion; returns
    the list of image ids parsed (to check what a rerun recomputes)."""
    import ban.data.features as features

    parse, parsed = features._parse_row, []

    def failing(row, path, line_no):
        if k is not None and len(parsed) == k:
            raise KeyboardInterrupt("injected")
        region = parse(row, path, line_no)
        parsed.append(region.image_id)
        return region

    monkeypatch.setattr(features, "_parse_row", failing)
    return parsed


def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    from ban.data.features import convert_features_many, partial_path

    regions = make_regions(ids=tuple(range(1, 21)), boxes=(3, 5) * 10)
    write_tsv(tmp_path / "a.tsv", regions[:12])
    write_tsv(tmp_path / "b.tsv", regions[12:])
    tsvs = [tmp_path / "a.tsv", tmp_path / "b.tsv"]
    outputs = {tmp_path / "odd.h5": range(1, 21, 2), tmp_path / "all.h5": None}
    whole = convert_features_many(
        tsvs, {tmp_path / "ref" / k.name: v for k, v in outputs.items()}, progress=False
    )
    parsed = _interrupt_after(monkeypatch, 14)
    with pytest.raises(KeyboardInterrupt):
        convert_features_many(tsvs, outputs, progress=False, checkpoint_every=4)
    assert not (tmp_path / "all.h5").exists() and partial_path(tmp_path / "all.h5").exists()
    parsed.clear()
    monkeypatch.undo()
    parsed = _interrupt_after(monkeypatch, None)
    info = convert_features_many(tsvs, outputs, progress=False, checkpoint_every=4)
    assert parsed == list(range(13, 21))  # rows 1-12 were checkpointed: not decoded again
    assert not partial_path(tmp_path / "all.h5").exists()
    assert info == {tmp_path / k.name: v for k, v in whole.items()}
    for name in ("odd.h5", "all.h5"):
        with h5py.File(tmp_path / name) as a, h5py.File(tmp_path / "ref" / name) as b:
            assert set(a) == set(b)
            for key in b:
                np.testing.assert_array_equal(a[key][()], b[key][()])


def _convert_and_crash_after_two_rows(tmp_path, monkeypatch):
    """a.tsv converted to f.h5 until a crash at its third row: f.h5's partial file is left."""
    write_tsv(tmp_path / "a.tsv", make_regions())
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    monkeypatch.undo()


def test_partial_file_of_other_inputs_starts_over(tmp_path, monkeypatch):
    from ban.data.features import partial_path

    _convert_and_crash_after_two_rows(tmp_path, monkeypatch)
    assert partial_path(tmp_path / "f.h5").exists()
    with pytest.warns(UserWarning, match="other inputs or options; starting over"):
        info = convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", fp16=True, progress=False)
    assert info["images"] == 4 and FeatureStore(tmp_path / "f.h5")[14][0].shape == (7, DIM)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_refused_at_conversion(tmp_path, bad):
    regions = make_regions()
    regions[2].features[1, 3] = bad
    write_tsv(tmp_path / "a.tsv", regions)
    with pytest.raises(ValueError, match=r"a\.tsv:3 \(image_id 13\): features hold non-finite"):
        convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("in_memory", [False, True])
def test_non_finite_features_refused_at_loading(tmp_path, in_memory):
    write_tsv(tmp_path / "a.tsv", make_regions())
    convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    with h5py.File(tmp_path / "f.h5", "a") as f:  # a file written by something else
        f["image_features"][6, 0] = np.inf
    store = FeatureStore(tmp_path / "f.h5", in_memory=in_memory)
    assert store[11][0].shape == (5, DIM)
    with pytest.raises(ValueError, match=r"f\.h5: image_id 12: features hold non-finite"):
        store[12]


def test_in_memory_says_and_checks_the_ram_it_takes(tmp_path, monkeypatch, capsys):
    import ban.data.features as features

    write_tsv(tmp_path / "a.tsv", make_regions())
    convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    need = 20 * (DIM + 6 + 4) * 4
    assert FeatureStore(tmp_path / "f.h5").memory_needed() == need
    monkeypatch.setattr(features, "available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=r"in_memory needs 0\.0 MiB .* 0\.0 MiB are available"):
        FeatureStore(tmp_path / "f.h5", in_memory=True)
    monkeypatch.setattr(features, "available_memory", lambda: need)
    store = FeatureStore(tmp_path / "f.h5", in_memory=True)
    assert "into memory" in capsys.readouterr().err
    assert store._arrays is not None  # loaded before any DataLoader worker forks
    assert features.available_memory() > 0  # this machine's figure (/proc/meminfo)


def test_partial_file_locked_by_another_process_is_left_alone(tmp_path, monkeypatch):
    from ban.data.features import partial_path

    _convert_and_crash_after_two_rows(tmp_path, monkeypatch)
    opened = h5py.File

    def locked(name, mode="r", *args, **kwargs):  # what HDF5 says while another process writes
        if str(name).endswith(".partial") and mode == "a":
            raise BlockingIOError(11, "unable to lock file")
        return opened(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", locked)
    with pytest.raises(ValueError, match=r"f\.h5\.partial: another process is writing this file"):
        convert_features(tmp_path / "a.tsv", tmp_path / "f.h5", progress=False)
    assert partial_path(tmp_path / "f.h5").exists()  # not deleted under the other process


def _h5_source(tmp_path, regions, name="src.h5"):
    """An HDF5 feature file of ban's layout (what `ban features extract` writes), via a TSV."""
    write_tsv(tmp_path / f"{name}.tsv", regions)
    convert_features(tmp_path / f"{name}.tsv", tmp_path / name, progress=False)
    (tmp_path / f"{name}.tsv").unlink()
    return tmp_path / name


def test_an_hdf5_feature_file_converts_like_its_tsv(tmp_path):
    # from-images hands its extraction to `prepare` as RAW/features/*.h5, not as a TSV copy
    from ban.data.features import convert_features_many

    regions = make_regions(ids=tuple(range(1, 9)), boxes=(3, 5) * 4)
    write_tsv(tmp_path / "a.tsv", regions[:4])
    source = _h5_source(tmp_path, regions[4:])
    outputs = {"odd.h5": range(1, 9, 2), "all.h5": None}
    from_h5 = convert_features_many(
        [tmp_path / "a.tsv", source], {tmp_path / k: v for k, v in outputs.items()}, progress=False
    )
    write_tsv(tmp_path / "b.tsv", regions[4:])
    from_tsv = convert_features_many(
        [tmp_path / "a.tsv", tmp_path / "b.tsv"],
        {tmp_path / "ref" / k: v for k, v in outputs.items()},
        progress=False,
    )
    assert {k.name: v for k, v in from_h5.items()} == {k.name: v for k, v in from_tsv.items()}
    for name in outputs:
        with h5py.File(tmp_path / name) as a, h5py.File(tmp_path / "ref" / name) as b:
            for key in ("image_features", "image_bb", "spatial_features", "pos_boxes"):
                np.testing.assert_array_equal(a[key][()], b[key][()])
            np.testing.assert_array_equal(a["image_ids"][()], b["image_ids"][()])


def test_an_interrupted_conversion_of_an_hdf5_file_resumes(tmp_path, monkeypatch):
    import ban.data.features as features
    from ban.data.features import convert_features_many, partial_path

    regions = make_regions(ids=tuple(range(1, 21)), boxes=(3, 5) * 10)
    source = _h5_source(tmp_path, regions)
    reference = convert_features(source, tmp_path / "ref.h5", progress=False)
    read, crash = features._read_h5_from, {"after": 11}
    seen = []

    def reading(path, index, first_image, bar):
        for region, position in read(path, index, first_image, bar):
            if len(seen) == crash["after"]:
                raise KeyboardInterrupt("injected")
            seen.append(region.image_id)
            yield region, position

    monkeypatch.setattr(features, "_read_h5_from", reading)
    with pytest.raises(KeyboardInterrupt):
        convert_features_many(
            [source], {tmp_path / "f.h5": None}, progress=False, checkpoint_every=4
        )
    assert partial_path(tmp_path / "f.h5").exists() and not (tmp_path / "f.h5").exists()
    seen.clear()
    crash["after"] = None
    info = convert_features(source, tmp_path / "f.h5", progress=False)
    assert seen == list(range(9, 21))  # images 1-8 were checkpointed: not read again
    assert info == reference
    with h5py.File(tmp_path / "f.h5") as a, h5py.File(tmp_path / "ref.h5") as b:
        np.testing.assert_array_equal(a["image_features"][()], b["image_features"][()])


def test_a_bad_hdf5_feature_file_is_named(tmp_path):
    source = _h5_source(tmp_path, make_regions())
    with h5py.File(source, "a") as f:
        f["image_features"][9, 3] = np.nan  # image 2 (id 13) holds rows 8-12
    with pytest.raises(
        ValueError, match=r"src\.h5: image 2 \(image_id 13\): features hold non-fin"
    ):
        convert_features(source, tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["image_ids"] = np.arange(3)
    with pytest.raises(ValueError, match=r"other\.h5: not a feature file of ban's HDF5 layout"):
        convert_features(tmp_path / "other.h5", tmp_path / "g.h5", progress=False)
    (tmp_path / "junk.h5").write_bytes(b"not HDF5 at all" * 8)
    with pytest.raises(ValueError, match=r"junk\.h5: not an HDF5 file, or a damaged one"):
        convert_features(tmp_path / "junk.h5", tmp_path / "h.h5", progress=False)
    truncated = _h5_source(tmp_path, make_regions(), name="cut.h5")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.h5: a damaged HDF5 file, truncated"):
        convert_features(truncated, tmp_path / "i.h5", progress=False)
