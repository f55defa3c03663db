"""Bilinear Attention Networks (Kim, Jun and Zhang, NeurIPS 2018) for VQA and phrase grounding.

The public API:

    import ban
    model = ban.BAN(ban.preset("ban-8-vqa"))          # or ban.build(config)
    out = model(v, b, q)                              # BANOutput(logits, attention, ...)
    ban.save(model, "model.safetensors"); model = ban.load("model.safetensors")
    model = ban.load_official("model_epoch12.pth")    # the original release's checkpoint
    predictor = ban.Predictor.from_checkpoint("runs/RUN/best.safetensors", data="DATA")
"""

from ban.checkpoint import load, save
from ban.model import (
    BAN,
    BANConfig,
    BANGrounding,
    BANOutput,
    count_parameters,
    flops_per_example,
)
from ban.official import load_official
from ban.predict import Predictor
from ban.presets import PRESETS, build, preset

__version__ = "0.1.0"

__all__ = [
    "BAN",
    "BANConfig",
    "BANGrounding",
    "BANOutput",
    "PRESETS",
    "Predictor",
    "build",
    "count_parameters",
    "flops_per_example",
    "load",
    "load_official",
    "preset",
    "save",
]
