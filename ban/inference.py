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
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ban.layers import WeightNormLinear

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


class InferenceModel(nn.Module):
    """A frozen, converted copy of a model: floating-point inputs are cast to the copy's dtype
    and floating-point outputs come back in fp32. Carries the model's `config`, `vocabulary`,
    `answers` and `notes`."""

    def __init__(self, model: nn.Module, precision: str, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.precision = precision
        self.dtype = dtype
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

    def forward(self, *args, **kwargs):
        args = [self._cast(a) for a in args]
        kwargs = {k: self._cast(a) for k, a in kwargs.items()}
        return _to_fp32(self.model(*args, **kwargs))

    def _cast(self, x):
        if torch.is_tensor(x) and x.is_floating_point():
            return x.to(self.dtype)
        return x

    def extra_repr(self) -> str:
        return f"precision={self.precision}"


def inference_model(
    model: nn.Module, precision: str = "auto", device: str | torch.device | None = None
) -> InferenceModel:
    """A frozen inference copy of `model` in `precision` ('auto', 'fp32', 'bf16' or 'int8'), on
    `device` (default: the model's). The weight norm is folded first; `model` is not changed."""
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
    return InferenceModel(folded, precision, _DTYPES[precision])


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
