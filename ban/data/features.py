"""Bottom-up-attention region features: TSV reader, TSV -> HDF5 converter, lazy HDF5 reader.

TSV (Anderson et al. 2018): tab-separated ``image_id, image_w, image_h, num_boxes, boxes,
features``; ``boxes`` and ``features`` are base64 of little-endian float32 arrays ``[num_boxes, 4]``
(x1, y1, x2, y2 in pixels) and ``[num_boxes, D]`` (D = 2048). 36 fixed or 10-100 adaptive boxes.

HDF5 (one file per image split; the release's adaptive layout plus an image-id index):

- ``image_features [total_boxes, D]`` float32 (float16 with ``fp16=True``)
- ``image_bb [total_boxes, 4]`` float32, pixels
- ``spatial_features [total_boxes, 6]`` float32, ``x1/w, y1/h, x2/w, y2/h, (x2-x1)/w, (y2-y1)/h``
- ``pos_boxes [num_images, 2]`` int64, the ``[start, end)`` rows of each image
- ``image_ids [num_images]`` int64 and ``image_size [num_images, 2]`` float32 (width, height)

Why it is long (about 670 lines): the real format's reader and writer, the resumable converter
and the lazy store share the layout and its checks; split, each half would restate them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
FORMAT = "ban-features-v1"


@dataclass
class Region:
    """One TSV row: an image and its boxes."""

    image_id: int
    width: float
    height: float
    boxes: np.ndarray  # [n, 4] float32, pixels
    features: np.ndarray  # [n, D] float32


def spatial_features(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """``[n, 6]`` float32: x1/w, y1/h, x2/w, y2/h, bw/w, bh/h, computed as the release does."""
    boxes = boxes.astype(np.float32, copy=False)
    w = np.float32(width)
    h = np.float32(height)
    bw = (boxes[:, 2] - boxes[:, 0]) / w
    bh = (boxes[:, 3] - boxes[:, 1]) / h
    x = boxes[:, 0] / w
    y = boxes[:, 1] / h
    return np.stack([x, y, x + bw, y + bh, bw, bh], axis=1).astype(np.float32)


def _decode(text: bytes, shape_cols: int | None, num_boxes: int, field: str, where: str):
    try:
        raw = base64.b64decode(text)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{where}: field {field!r} is not valid base64 ({error})") from None
    if len(raw) % 4:
        raise ValueError(f"{where}: field {field!r} has {len(raw)} bytes, not whole float32s")
    array = np.frombuffer(raw, dtype="<f4")
    cols = shape_cols if shape_cols is not None else array.size // num_boxes
    if cols == 0 or array.size != num_boxes * cols:
        expected = f"{num_boxes} x {shape_cols}" if shape_cols else f"a multiple of {num_boxes}"
        raise ValueError(f"{where}: field {field!r} holds {array.size} floats, expected {expected}")
    return array.reshape(num_boxes, cols).astype(np.float32)


def _parse_row(row: list[bytes], path: Path, line_no: int) -> Region:
    image_id = row[0].decode("ascii", "replace") if row else "?"
    where = f"{path}:{line_no} (image_id {image_id})"
    if len(row) != len(FIELDS):
        raise ValueError(
            f"{where}: expected {len(FIELDS)} tab-separated fields "
            f"{', '.join(FIELDS)}; got {len(row)}"
        )
    try:
        image_id = int(row[0])
    except ValueError:
        raise ValueError(f"{where}: field 'image_id' is not an integer") from None
    values = {}
    for field, text in zip(FIELDS[1:4], row[1:4], strict=True):
        try:
            values[field] = float(text)
        except ValueError:
            raise ValueError(f"{where}: field {field!r} is not a number: {text[:20]!r}") from None
    num_boxes = int(values["num_boxes"])
    if num_boxes != values["num_boxes"] or num_boxes < 1:
        raise ValueError(f"{where}: field 'num_boxes' must be a positive integer, got {row[3]!r}")
    if values["image_w"] <= 0 or values["image_h"] <= 0:
        raise ValueError(f"{where}: image_w and image_h must be positive, got {row[1]}, {row[2]}")
    boxes = _decode(row[4], 4, num_boxes, "boxes", where)
    features = _decode(row[5], None, num_boxes, "features", where)
    check_finite(boxes, where, "boxes")
    check_finite(features, where)
    return Region(image_id, values["image_w"], values["image_h"], boxes, features)


def read_tsv(
    paths: str | Path | Iterable[str | Path], progress: tqdm | None = None
) -> Iterator[Region]:
    """Stream the rows of bottom-up TSV files, one :class:`Region` at a time (constant memory).

    The fields hold only numbers and base64, never tabs or quotes, so a line is split on tabs
    directly: the same result as the release's ``csv`` reader (with its field size limit raised),
    several times faster. A row that does not decode raises ``ValueError`` naming the file, line
    number and image id.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"feature file not found: {path}")
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if progress is not None:
                    progress.update(len(line))
                line = line.rstrip(b"\r\n")
                if line:
                    yield _parse_row(line.split(b"\t"), path, line_no)


def encode_row(region: Region) -> str:
    """One TSV line (with its newline) for ``region``, in the bottom-up-attention format."""
    boxes = np.ascontiguousarray(region.boxes, dtype="<f4")
    features = np.ascontiguousarray(region.features, dtype="<f4")
    fields = [
        str(region.image_id),
        f"{region.width:g}",
        f"{region.height:g}",
        str(len(boxes)),
        base64.b64encode(boxes.tobytes()).decode("ascii"),
        base64.b64encode(features.tobytes()).decode("ascii"),
    ]
    return "\t".join(fields) + "\n"


def write_tsv(path: str | Path, regions: Iterable[Region]) -> None:
    """Write regions as a bottom-up-attention TSV file (for tests and synthetic data)."""
    with open(path, "w", encoding="ascii", newline="") as f:
        for region in regions:
            f.write(encode_row(region))


def partial_path(path: str | Path) -> Path:
    """Where the work on ``path`` is kept until it is whole: ``PATH.partial`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def resume_key(*parts) -> str:
    """A short digest of what a file is made from (inputs and options): a partial file is
    resumed only by a run whose key is the same."""
    return hashlib.sha256(json.dumps(parts, default=str).encode("utf-8")).hexdigest()[:32]


def check_finite(array: np.ndarray, where: str, field: str = "features") -> None:
    """``ValueError`` naming ``where`` (file, line, image id) when ``array`` holds NaN or Inf."""
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        value = array[tuple(bad)]
        raise ValueError(
            f"{where}: {field} hold non-finite values ({value} at row {int(bad[0])}); "
            "NaN or Inf features would train a NaN model"
        )


class FeatureWriter:
    """Appends images to ``PATH.partial`` beside the target; ``commit`` renames it into place.

    Everything written so far is in the partial file; :meth:`checkpoint` records how far it is
    whole (and the caller's ``state``, such as a TSV position). A new writer with the same ``key``
    (a digest of the inputs and options, :func:`resume_key`) reopens that partial file and goes on
    from its last checkpoint (``resumed`` holds the state then); a partial file of other inputs,
    or one that does not open (a crash mid-write), is started over with a warning.
    """

    META = (
        ("image_ids", (), np.int64),
        ("pos_boxes", (2,), np.int64),
        ("image_size", (2,), np.float32),
    )

    def __init__(self, path: Path, fp16: bool, key: str = "", buffer_boxes: int = 4096) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_path(self.path)
        self.key = key
        self.fp16 = fp16
        self.buffer_boxes = buffer_boxes
        self.dim = None
        self.rows = 0  # feature rows written
        self.images = 0  # images written
        self.pending: list[Region] = []
        self.pending_boxes = 0
        self.resumed: dict | None = self._reopen()
        if self.resumed is None:
            self.file = h5py.File(self.tmp, "w")
            for name, cols, dtype in self.META:
                self.file.create_dataset(
                    name, shape=(0, *cols), maxshape=(None, *cols), dtype=dtype,
                    chunks=(4096, *cols),
                )  # fmt: skip
            self.file.attrs["resume_key"] = key
            self.checkpoint({})

    def _reopen(self) -> dict | None:
        if not self.tmp.exists():
            return None
        try:
            f = h5py.File(self.tmp, "a")
        except BlockingIOError:  # HDF5's file lock: a conversion running now owns this file
            raise ValueError(
                f"{self.tmp}: another process is writing this file now (HDF5 file lock); wait "
                f"for it to finish, or stop it, before writing {self.path}"
            ) from None
        except OSError as error:
            warnings.warn(
                f"{self.tmp}: partial file does not open ({error}); starting over", stacklevel=3
            )
            self.tmp.unlink()
            return None
        if f.attrs.get("resume_key") != self.key or "done_images" not in f.attrs:
            f.close()
            warnings.warn(
                f"{self.tmp}: partial file of other inputs or options; starting over", stacklevel=3
            )
            self.tmp.unlink()
            return None
        self.file = f
        self.images = int(f.attrs["done_images"])
        self.rows = int(f.attrs["done_rows"])
        for name, _, _ in self.META:  # drop what came after the last checkpoint
            f[name].resize(self.images, axis=0)
        if "image_features" in f:
            self.dim = int(f["image_features"].shape[1])
            for name in ("image_features", "image_bb", "spatial_features"):
                f[name].resize(self.rows, axis=0)
        return json.loads(f.attrs.get("resume_state", "{}"))

    def done_ids(self) -> np.ndarray:
        """The image ids written up to now (after a resume: those of the partial file)."""
        return self.file["image_ids"][: self.images]

    def _create(self, dim: int) -> None:
        self.dim = dim
        dtype = np.float16 if self.fp16 else np.float32
        # small feature chunks: one image (10-100 rows) reads few bytes it does not need
        for name, cols, dt, rows in [
            ("image_features", dim, dtype, 16),
            ("image_bb", 4, np.float32, 1024),
            ("spatial_features", 6, np.float32, 1024),
        ]:
            self.file.create_dataset(
                name, shape=(0, cols), maxshape=(None, cols), dtype=dt, chunks=(rows, max(cols, 1))
            )

    def add(self, region: Region) -> None:
        if self.dim is None:
            self._create(region.features.shape[1])
        self.pending.append(region)
        self.pending_boxes += len(region.boxes)
        if self.pending_boxes >= self.buffer_boxes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        start, end = self.rows, self.rows + self.pending_boxes
        counts = np.asarray([len(r.boxes) for r in self.pending], dtype=np.int64)
        ends = start + np.cumsum(counts)
        n0, n1 = self.images, self.images + len(self.pending)
        columns = [
            ("image_features", np.concatenate([r.features for r in self.pending])),
            ("image_bb", np.concatenate([r.boxes for r in self.pending])),
            (
                "spatial_features",
                np.concatenate(
                    [spatial_features(r.boxes, r.width, r.height) for r in self.pending]
                ),
            ),
        ]
        meta = [
            ("image_ids", np.asarray([r.image_id for r in self.pending], dtype=np.int64)),
            ("pos_boxes", np.stack([ends - counts, ends], axis=1)),
            ("image_size", np.asarray([(r.width, r.height) for r in self.pending], np.float32)),
        ]
        for name, data in columns:
            self.file[name].resize(end, axis=0)
            self.file[name][start:end] = data
        for name, data in meta:
            self.file[name].resize(n1, axis=0)
            self.file[name][n0:n1] = data
        self.rows, self.images = end, n1
        self.pending, self.pending_boxes = [], 0

    def checkpoint(self, state: dict) -> None:
        """Write what is pending and record it, with ``state``, as whole (a resume starts here)."""
        self.flush()
        self.file.attrs["done_images"] = self.images
        self.file.attrs["done_rows"] = self.rows
        self.file.attrs["resume_state"] = json.dumps(state)
        self.file.flush()

    def commit(self, sources: list[str], dim: int) -> None:
        self.flush()
        if self.dim is None:  # no image for this file: empty datasets
            self.dim = dim
            dtype = np.float16 if self.fp16 else np.float32
            for name, cols, dt in [
                ("image_features", dim, dtype),
                ("image_bb", 4, np.float32),
                ("spatial_features", 6, np.float32),
            ]:
                self.file.create_dataset(name, shape=(0, cols), dtype=dt)
        f = self.file
        for name in ("done_images", "done_rows", "resume_state"):
            if name in f.attrs:
                del f.attrs[name]
        f.attrs["format"] = FORMAT
        f.attrs["feature_dim"] = self.dim
        f.attrs["fp16"] = self.fp16
        # a dataset, not an attribute: HDF5 attributes hold at most 64 KiB (a few thousand names)
        names = [str(s) for s in sources]
        f.create_dataset("sources", data=np.asarray(names, dtype=object), dtype=h5py.string_dtype())
        f.close()
        with open(self.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)

    def close(self) -> None:
        """Close the partial file, keeping it for a resume (after a failure)."""
        if self.file.id.valid:
            self.file.close()

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _tsv_key(tsv_paths: list[Path], wanted: dict[Path, set[int] | None], fp16: bool) -> dict:
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in tsv_paths]
    return {
        path: resume_key(
            "tsv",
            files,
            fp16,
            None
            if ids is None
            else hashlib.sha256(
                np.sort(np.fromiter(ids, np.int64, len(ids))).tobytes()
            ).hexdigest(),
        )
        for path, ids in wanted.items()
    }


def convert_features_many(
    tsv_paths: Iterable[str | Path],
    outputs: dict[str | Path, Iterable[int] | None],
    fp16: bool = False,
    progress: bool = True,
    checkpoint_every: int = 2000,
    checkpoint_seconds: float = 30.0,
) -> dict[Path, dict]:
    """One pass over the TSV files routing each image to the output(s) that want its id. A path
    ending in ``.h5`` is read as an HDF5 feature file of this module's layout instead (what
    ``ban features extract`` writes), with the same checks.

    ``outputs`` maps an HDF5 path to the set of image ids it should hold (``None``: every image).
    Each file is written to ``PATH.partial`` beside it and renamed at the end, so a file under
    the final name is always whole. Every ``checkpoint_every`` TSV rows (or ``checkpoint_seconds``
    seconds, whichever comes first) the partial files record
    how far they are; a run interrupted (an error, Ctrl-C, a full disk) and run again with the same
    TSV files, ids and options goes on from there instead of starting over. Images outside every
    set are skipped; an image seen twice keeps its first row (with a warning); a row with NaN or
    Inf values is an error naming the file, line and image id. Returns per output ``{"images",
    "boxes", "missing": sorted ids asked for but not found}``.
    """
    tsv_paths = [Path(p) for p in tsv_paths]
    if not tsv_paths:
        raise FileNotFoundError("convert_features: no TSV files given")
    for p in tsv_paths:
        if not p.is_file():
            raise FileNotFoundError(f"feature file not found: {p}")
    wanted = {Path(k): (None if v is None else {int(i) for i in v}) for k, v in outputs.items()}
    keys = _tsv_key(tsv_paths, wanted, fp16)
    writers: dict[Path, FeatureWriter] = {}
    seen: dict[Path, set[int]] = {}
    duplicates = 0
    sizes = [p.stat().st_size for p in tsv_paths]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="features", disable=not progress)
    dim = None
    try:
        # each output resumes from its own checkpoint; the pass starts at the earliest of them
        # and an output skips the rows before its own
        starts: dict[Path, tuple[int, int, int]] = {}
        for path in wanted:
            try:
                writer = writers[path] = FeatureWriter(path, fp16, keys[path])
            except ValueError:  # another process owns a partial file: leave every file as it is
                for opened in writers.values():
                    opened.close()
                writers.clear()
                raise
            state = writer.resumed or {}
            starts[path] = tuple(state.get("position", (0, 0, 0)))
            seen[path] = set(writer.done_ids().tolist())
            if writer.dim is not None:
                dim = writer.dim
        start = min(starts.values())
        resumed_h5 = start[0] < len(tsv_paths) and is_h5_source(tsv_paths[start[0]])
        bar.update(sum(sizes[: start[0]]) + (0 if resumed_h5 else start[1]))  # HDF5: its reader
        if start > (0, 0, 0):
            unit = "image" if resumed_h5 else "line"
            bar.write(f"resuming from {tsv_paths[start[0]]} {unit} {start[2] + 1}")
        rows, next_checkpoint = 0, time.monotonic() + checkpoint_seconds
        for region, position in _read_from(tsv_paths, start, bar):
            rows += 1
            if dim is None:
                dim = region.features.shape[1]
            elif region.features.shape[1] != dim:
                raise ValueError(
                    f"image_id {region.image_id}: {region.features.shape[1]}-d "
                    f"features, but earlier rows have {dim}-d"
                )
            for path, ids in wanted.items():
                if position <= starts[path] or (ids is not None and region.image_id not in ids):
                    continue
                if region.image_id in seen[path]:
                    duplicates += 1
                    continue
                seen[path].add(region.image_id)
                writers[path].add(region)
            if rows % checkpoint_every == 0 or time.monotonic() > next_checkpoint:
                for writer in writers.values():
                    writer.checkpoint({"position": position})
                next_checkpoint = time.monotonic() + checkpoint_seconds
        for writer in writers.values():
            writer.commit([str(p) for p in tsv_paths], dim or 0)
    except ValueError:  # bad input: the inputs must change, so nothing could be resumed
        for writer in writers.values():
            writer.abort()
        raise
    except BaseException:
        for writer in writers.values():
            writer.close()  # the partial files stay: a rerun goes on from their checkpoint
        raise
    finally:
        bar.close()
    if duplicates:
        warnings.warn(
            f"{duplicates} repeated image rows in the TSV files were skipped (first row kept)",
            stacklevel=2,
        )
    return {
        path: {
            "images": len(seen[path]),
            "boxes": writers[path].rows,
            "missing": sorted(ids - seen[path]) if ids is not None else [],
        }
        for path, ids in wanted.items()
    }


def raw_feature_files(raw_dir: Path) -> list[Path]:
    """A RAW folder's region features: ``RAW/features/*.tsv*`` (bottom-up TSV, also the
    release's ``*.tsv.0``, ``*.tsv.1`` parts) and ``RAW/features/*.h5`` (this module's HDF5
    layout, as ``ban features extract`` writes)."""
    folder = raw_dir / "features"
    if not folder.is_dir():
        return []
    return sorted(p for p in [*folder.glob("*.tsv*"), *folder.glob("*.h5")] if p.is_file())


def is_h5_source(path: Path) -> bool:
    """Whether a feature source is an HDF5 file of this module's layout (else a TSV file)."""
    return path.suffix == ".h5"


def _damaged_h5_error(path: Path, error: OSError) -> ValueError:
    """What h5py's ``OSError`` on reading ``path`` means, as a ``ValueError`` naming the file."""
    if "truncated" in str(error):  # h5py: "truncated file: eof = ..., stored_eof = ..."
        return ValueError(
            f"{path}: a damaged HDF5 file, truncated ({error}); write or copy it again"
        )
    return ValueError(f"{path}: not an HDF5 file, or a damaged one ({error})")


def _read_h5_from(
    path: Path, index: int, first_image: int, bar: tqdm
) -> Iterator[tuple[Region, tuple[int, int, int]]]:
    """The images of an HDF5 feature file from image ``first_image`` on, as TSV rows, each with
    the position just after it: ``(index, images read, images read)``."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise _damaged_h5_error(path, error) from None
    with file as f:
        fields = ("image_ids", "image_size", "pos_boxes", "image_bb", "image_features")
        missing = [k for k in fields if k not in f]
        if missing:
            raise ValueError(f"{path}: not a feature file of ban's HDF5 layout (no {missing[0]})")
        ids, sizes, pos = f["image_ids"][()], f["image_size"][()], f["pos_boxes"][()]
        per_image = path.stat().st_size // max(len(ids), 1)  # for the progress bar, in bytes
        bar.update(first_image * per_image)
        for i in range(first_image, len(ids)):
            start, end = (int(x) for x in pos[i])
            where = f"{path}: image {i} (image_id {int(ids[i])})"
            features = f["image_features"][start:end].astype(np.float32)
            boxes = f["image_bb"][start:end].astype(np.float32)
            check_finite(boxes, where, "boxes")
            check_finite(features, where)
            bar.update(per_image)
            region = Region(int(ids[i]), float(sizes[i][0]), float(sizes[i][1]), boxes, features)
            yield region, (index, i + 1, i + 1)


def _read_from(
    paths: list[Path], start: tuple[int, int, int], bar: tqdm
) -> Iterator[tuple[Region, tuple[int, int, int]]]:
    """Rows of the feature files from ``start`` on, each with the position just after it: for a
    TSV file ``(file index, byte offset, line number)``, for an HDF5 file ``(file index, images
    read, images read)``."""
    first, offset, line_no = start
    for index in range(first, len(paths)):
        path = paths[index]
        if is_h5_source(path):
            yield from _read_h5_from(path, index, offset if index == first else 0, bar)
            continue
        with open(path, "rb") as f:
            if index == first:
                f.seek(offset)
            else:
                offset, line_no = 0, 0
            for line in f:
                line_no += 1
                offset += len(line)
                bar.update(len(line))
                line = line.rstrip(b"\r\n")
                if line:
                    yield _parse_row(line.split(b"\t"), path, line_no), (index, offset, line_no)


def convert_features(
    tsv_paths: str | Path | Iterable[str | Path],
    out_h5: str | Path,
    image_ids: Iterable[int] | None = None,
    fp16: bool = False,
    progress: bool = True,
) -> dict:
    """Convert bottom-up TSV files to one HDF5 file (layout in this module's docstring).

    Keeps only ``image_ids`` when given. Constant memory in the TSV size; atomic result.
    Returns ``{"images", "boxes", "missing"}`` (ids asked for but absent from the TSV files).
    """
    if isinstance(tsv_paths, (str, Path)):
        tsv_paths = [tsv_paths]
    return convert_features_many(tsv_paths, {out_h5: image_ids}, fp16=fp16, progress=progress)[
        Path(out_h5)
    ]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (``MemAvailable`` of /proc/meminfo, else
    psutil when installed); None when neither says."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


class FeatureStore:
    """Lazy reader of a converted HDF5 file.

    ``store[image_id] -> (features [n, D] float32, spatials [n, 6] float32)``.

    The file is opened on first read in each process (never in ``__init__``), so a store can be
    handed to DataLoader workers. ``in_memory=True`` loads everything into RAM here, in
    ``__init__`` (so forked DataLoader workers share it), after saying how much on stderr; it
    raises ``MemoryError`` when that is more than the RAM available (:func:`available_memory`).
    Features keep their stored dtype; items are returned as float32. An item with NaN or Inf
    values is a ``ValueError`` naming the file and image id.
    """

    def __init__(self, path: str | Path, in_memory: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature file not found: {self.path}")
        self.in_memory = in_memory
        self._index: dict[int, int] | None = None
        self._pos: np.ndarray | None = None
        self._file = None
        self._datasets: dict | None = None  # the open file's datasets (a lookup costs ~0.2 ms)
        self._pid = None
        self._arrays: dict[str, np.ndarray] | None = None
        if in_memory:  # here, before DataLoader workers fork: they share these pages
            self._arrays = self._load_arrays()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_datasets"] = None
        state["_pid"] = None
        if not self.in_memory:
            state["_arrays"] = None
        return state

    def _load_index(self) -> None:
        try:
            with h5py.File(self.path, "r") as f:
                ids = f["image_ids"][()]
                self._pos = f["pos_boxes"][()]
                self.dim = int(f["image_features"].shape[1])
        except OSError as error:
            raise _damaged_h5_error(self.path, error) from None
        except KeyError as error:
            raise ValueError(
                f"{self.path}: not a feature file of this project ({error}); "
                "convert TSV files with `ban data convert-features`"
            ) from error
        self._index = {int(i): row for row, i in enumerate(ids)}

    @property
    def index(self) -> dict[int, int]:
        if self._index is None:
            self._load_index()
        return self._index

    def _handle(self) -> dict:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            names = ("image_features", "spatial_features", "image_bb")
            self._datasets = {name: self._file[name] for name in names}
        return self._datasets

    def _source(self):
        if not self.in_memory:
            return self._handle()
        if self._arrays is None:
            self._arrays = self._load_arrays()
        return self._arrays

    def memory_needed(self) -> int:
        """Bytes that ``in_memory=True`` holds: the three per-box datasets at their stored dtype."""
        names = ("image_features", "spatial_features", "image_bb")
        try:
            with h5py.File(self.path, "r") as f:
                return sum(int(np.prod(f[n].shape)) * f[n].dtype.itemsize for n in names)
        except (OSError, KeyError) as error:
            raise ValueError(f"{self.path}: not a feature file of this project ({error})") from None

    def _load_arrays(self) -> dict[str, np.ndarray]:
        need = self.memory_needed()
        available = available_memory()
        if available is not None and need > available:
            raise MemoryError(
                f"{self.path}: in_memory needs {_size(need)} of RAM for its features, "
                f"but {_size(available)} are available; read them from the file instead "
                "(in_memory off: the page cache keeps what fits)"
            )
        free = "" if available is None else f" of {_size(available)} available"
        print(f"loading {self.path} into memory: {_size(need)}{free}", file=sys.stderr)
        with h5py.File(self.path, "r") as f:
            return {
                name: f[name][()] for name in ("image_features", "spatial_features", "image_bb")
            }

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: object) -> bool:
        return int(image_id) in self.index

    def image_ids(self) -> list[int]:
        return list(self.index)

    def _rows(self, image_id: int) -> tuple[int, int]:
        try:
            row = self.index[int(image_id)]
        except KeyError:
            raise KeyError(f"image_id {image_id} has no features in {self.path}") from None
        start, end = self._pos[row]
        return int(start), int(end)

    def __getitem__(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self._rows(image_id)
        source = self._source()
        features = np.asarray(source["image_features"][start:end], dtype=np.float32)
        spatials = np.asarray(source["spatial_features"][start:end], dtype=np.float32)
        check_finite(features, f"{self.path}: image_id {image_id}")
        check_finite(spatials, f"{self.path}: image_id {image_id}", "spatial features")
        return features, spatials

    def boxes(self, image_id: int) -> np.ndarray:
        """``[n, 4]`` float32 boxes in pixels (x1, y1, x2, y2)."""
        start, end = self._rows(image_id)
        return np.asarray(self._source()["image_bb"][start:end], dtype=np.float32)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._datasets = None
