"""Frozen inference copies of a trained model, in the precision a question is answered in.

    from ban.inference import inference_model
    fast = inference_model(model, "auto")      # a new module; `model` is left as it was
    fast(v, b, q).logits                       # fp32 logits, whatever the precision

At batch 1 the time of a question is spent reading the weights (about 78 million at the paper's
size), so they are kept in the inference dtype once rather than converted on every call:

- `fp32`: the weight norm of every `WeightNormLinear` (w = g v / ||v||_F) folded into a plain
  `nn.Linear`: the same numbers as the model, bit for bit.
- `bf16`: the folded model with its weights and activations in bfloat16 (half the bytes of fp32).
  Fast only on CPUs with bf16 arithmetic (AVX-512-BF16 or AMX) and on GPUs.
- `int8`: the folded model with dynamic int8 quantisation of every linear layer and of the GRU
  (int8 weights with one scale per output row, per matrix in the GRU; activations quantised per
  call; a quarter of the bytes of fp32; PyTorch's fbgemm/oneDNN kernels, CPU only).
- `auto`: what `choose_precision` picks for the device and the CPU.

In every precision the counting module computes in fp32 with fp32 weights (`Counter.count`: in
bf16 its piecewise-linear maps would keep a few bits) and the outputs are returned in fp32; int8
leaves the embeddings and the attention's glimpse vectors (`h_mat`, 8 x 3840) in fp32.

An image's own share of the work is kept for the images last asked about (`ImageCache`):

    fast = inference_model(model, "auto", image_cache_bytes=256 * 2**20)
    fast(v, b, q, image_keys=[image_id, ...]).logits   # a key per row, naming its features
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ban.layers import BilinearAttentionMap, BilinearPooling, WeightNormLinear

PRECISIONS = ("auto", "fp32", "bf16", "int8")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}

# Below this many parameters `auto` keeps fp32: int8 saves nothing there (the weights are not
# what a question waits for; benchmarks/results/inference_modes_cpu.txt, the default-size rows).
SMALL_MODEL_PARAMETERS = 5_000_000


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    return precision


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux names them (`avx512_bf16`, `amx_bf16`, `avx2`, ...);
    empty where `cpuinfo` cannot be read (other systems)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.split())
    return set()


def int8_supported() -> bool:
    """Whether this torch has a CPU engine for dynamically quantised linear layers and GRUs."""
    return bool(
        {"x86", "fbgemm", "onednn", "qnnpack"} & set(torch.backends.quantized.supported_engines)
    )


def choose_precision(
    device: str | torch.device = "cpu",
    flags: set[str] | None = None,
    parameters: int | None = None,
) -> str:
    """The precision `auto` stands for.

    On CUDA: bf16 where the GPU supports it, else fp32. On a CPU: bf16 where it has bf16
    arithmetic (flag `avx512_bf16` or `amx_bf16`), else int8 where torch can quantise, else fp32;
    and fp32 for a model of fewer than `SMALL_MODEL_PARAMETERS` parameters (when `parameters` is
    given), where a narrower dtype gains no time. `flags` defaults to this machine's.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu" or (parameters is not None and parameters < SMALL_MODEL_PARAMETERS):
        return "fp32"
    flags = cpu_flags() if flags is None else flags
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    if int8_supported():
        return "int8"
    return "fp32"


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in which every `WeightNormLinear` is an `nn.Linear` holding its
    effective weight `g v / ||v||_F` (computed once), in eval mode without gradients."""
    folded = copy.deepcopy(model)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, WeightNormLinear):
                linear = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight_v.device,
                    dtype=child.weight_v.dtype,
                )
                with torch.no_grad():
                    linear.weight.copy_(child.weight)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return folded.eval().requires_grad_(False)


class ImageCache:
    """The visual projections of the images last asked about: the part of an answer that
    depends on the image alone.

    BAN's visual layers, the attention's `v_net` (Eq. 4: ReLU(Y W_v)) and each glimpse's
    pooling `v_net` (Eq. 5: ReLU(Y U)), read only the region features Y. At the paper's size
    they are 1.04 G of a question's 1.44 G multiply-adds (`ban info`), so a second question
    about an image costs a fraction of the first. Kept per (image key, padded box count), each
    entry holding every visual layer's output for that image; least recently used entries are
    dropped once the outputs exceed `max_bytes` (checked after each forward, so a batch of new
    images may exceed it while it runs). A key must always name the same features: `Predictor`
    uses image ids and forgets an uploaded picture's when its id is given to another.
    """

    def __init__(self, max_bytes: int, layers: int):
        if max_bytes <= 0:
            raise ValueError(f"an image cache needs max_bytes > 0, got {max_bytes}")
        self.max_bytes, self.layers = max_bytes, layers
        self.bytes = 0
        self.hits = self.misses = 0  # a keyed forward's images found whole (every layer), or not
        self.lock = threading.Lock()  # held by `InferenceModel` through a keyed forward
        self._current = threading.local()  # that forward's keys, seen by its thread only
        self._entries: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def keys(self) -> list | None:
        """The (image key, boxes) of each row of this thread's keyed forward; None outside one
        (a forward without keys, on any thread, runs the layers as they are)."""
        return getattr(self._current, "keys", None)

    def begin(self, keys: list, boxes: int) -> None:
        """Start a forward whose rows are the images `keys`, padded to `boxes` boxes."""
        self._current.keys = [(key, boxes) for key in keys]
        for key in dict.fromkeys(self.keys):
            entry = self._entries.get(key)
            complete = entry is not None and len(entry) == self.layers
            self.hits += complete
            self.misses += not complete
            if entry is not None:
                self._entries.move_to_end(key)

    def end(self) -> None:
        """After a forward: forget its keys, then the least recently used past `max_bytes`."""
        self._current.keys = None
        while self.bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self.bytes -= sum(_nbytes(t) for t in entry.values())

    def project(self, layer: nn.Module, name: str, v: torch.Tensor) -> torch.Tensor:
        """`layer(v)` for the current forward's rows, computing only the images not kept (once
        each, in one call) and keeping what it computes."""
        keys = self.keys
        todo: dict[tuple, int] = {}  # image -> its first row, for images without this layer
        for row, key in enumerate(keys):
            if name not in self._entries.get(key, {}):
                todo.setdefault(key, row)
        every_row = len(todo) == len(keys)  # every row a different new image: one plain call
        if todo:
            if not every_row:  # only the rows of images not kept, one row each
                v = v.index_select(0, torch.tensor(list(todo.values()), device=v.device))
            out = layer(v)
            for key, projected in zip(todo, out, strict=True):
                projected = projected.clone()  # its own storage: an entry's bytes are its own
                self._entries.setdefault(key, {})[name] = projected
                self.bytes += _nbytes(projected)
            if every_row:
                return out
        return torch.stack([self._entries[key][name] for key in keys])

    def forget(self, key) -> None:
        """Drop what is kept of image `key` (at every box count)."""
        with self.lock:
            for entry_key in [k for k in self._entries if k[0] == key]:
                entry = self._entries.pop(entry_key)
                self.bytes -= sum(_nbytes(t) for t in entry.values())

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()
            self.bytes = 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _CachedVisualLayer(nn.Module):
    """A visual layer whose outputs `cache` keeps per image, when the forward names its rows'
    images; otherwise the layer itself."""

    def __init__(self, layer: nn.Module, name: str, cache: ImageCache):
        super().__init__()
        self.layer, self.name = layer, name
        self.__dict__["cache"] = cache  # shared by the model's visual layers, not a submodule

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.cache.keys is None:
            return self.layer(v)
        return self.cache.project(self.layer, self.name, v)


def _cache_visual_layers(model: nn.Module, max_bytes: int) -> ImageCache | None:
    """Put the `v_net` of every `BilinearAttentionMap` and `BilinearPooling` of `model` behind
    one `ImageCache` (None for a model without them)."""
    owners = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (BilinearAttentionMap, BilinearPooling))
    ]
    if not owners:
        return None
    cache = ImageCache(max_bytes, layers=len(owners))
    for name, module in owners:
        module.v_net = _CachedVisualLayer(module.v_net, f"{name}.v_net", cache)
    return cache


class InferenceModel(nn.Module):
    """A frozen, converted copy of a model: floating-point inputs are cast to the copy's dtype
    and floating-point outputs come back in fp32. Carries the model's `config`, `vocabulary`,
    `answers` and `notes`, and `image_cache` (an `ImageCache`, or None).

    `forward(*inputs, image_keys=[...])` names the image of each row (hashable keys, the same
    key always for the same features): with an image cache, the rows' visual projections are
    taken from it where kept, computed once per image otherwise. Without `image_keys`, or without
    a cache, the model runs as it is. One keyed forward runs at a time (the cache's lock);
    forwards without keys, on other threads, run beside it as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str,
        dtype: torch.dtype,
        image_cache: ImageCache | None = None,
    ):
        super().__init__()
        self.model = model
        self.precision = precision
        self.dtype = dtype
        self.image_cache = image_cache
        self.config = model.config
        self.vocabulary = getattr(model, "vocabulary", None)
        self.answers = getattr(model, "answers", None)
        self.notes = getattr(model, "notes", {})
        self.eval()

    def train(self, mode: bool = True) -> InferenceModel:
        """Eval mode only: the copy is frozen (its dropout must stay off)."""
        if mode:
            raise ValueError("an inference copy cannot be put in training mode; train the model")
        return super().train(False)

    def forward(self, *args, image_keys=None, **kwargs):
        args = [self._cast(a) for a in args]
        kwargs = {k: self._cast(a) for k, a in kwargs.items()}
        if image_keys is None or self.image_cache is None:
            return _to_fp32(self.model(*args, **kwargs))
        v = args[0] if args else kwargs["v"]
        if len(image_keys) != v.shape[0]:
            raise ValueError(f"{len(image_keys)} image keys for a batch of {v.shape[0]} rows")
        with self.image_cache.lock:
            self.image_cache.begin(list(image_keys), v.shape[1])
            try:
                return _to_fp32(self.model(*args, **kwargs))
            finally:
                self.image_cache.end()

    def _cast(self, x):
        if torch.is_tensor(x) and x.is_floating_point():
            return x.to(self.dtype)
        return x

    def extra_repr(self) -> str:
        return f"precision={self.precision}"


def inference_model(
    model: nn.Module,
    precision: str = "auto",
    device: str | torch.device | None = None,
    image_cache_bytes: int = 0,
) -> InferenceModel:
    """A frozen inference copy of `model` in `precision` ('auto', 'fp32', 'bf16' or 'int8'), on
    `device` (default: the model's). The weight norm is folded first; `model` is not changed.
    `image_cache_bytes` > 0 keeps up to that many bytes of visual projections (`ImageCache`)
    for forwards given `image_keys`."""
    check_precision(precision)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if precision == "auto":
        parameters = sum(p.numel() for p in model.parameters())
        precision = choose_precision(device, parameters=parameters)
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision 'int8' runs on the CPU only, not on {device}")
    if precision == "int8" and not int8_supported():
        raise ValueError("precision 'int8': this torch build has no quantized CPU engine")
    folded = fold_weight_norm(model).to(device)  # a copy: `model` keeps its dtype and device
    if precision == "bf16":
        folded = folded.to(torch.bfloat16)
        counter = getattr(folded, "counter", None)
        if counter is not None:
            counter.float()  # its maps' slopes stay fp32 (see the module docstring)
    elif precision == "int8":
        folded = _quantize_dynamic(folded)
    else:
        folded = folded.float()
    cache = _cache_visual_layers(folded, image_cache_bytes) if image_cache_bytes > 0 else None
    return InferenceModel(folded, precision, _DTYPES[precision], cache)


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    # torch.ao.quantization is marked deprecated in favour of torchao, but its dynamic int8
    # modules and fbgemm/oneDNN kernels still ship with torch 2.13 and are the fastest batch-1
    # path measured here (docs/performance.md, "Inference precision").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )

        # Linear layers: one scale per output row (as fast as one per matrix here, and closer
        # to fp32 on the trained model); the GRU's quantised module takes one per matrix.
        qconfigs = {nn.Linear: per_channel_dynamic_qconfig, nn.GRU: default_dynamic_qconfig}
        return quantize_dynamic(model, qconfigs)


def _to_fp32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple such as BANOutput
        return type(out)(*(_to_fp32(x) for x in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_to_fp32(x) for x in out)
    return out
