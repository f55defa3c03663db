"""Training presets: the paper's recipe and a small CPU default, overridable by YAML and flags.

A `TrainConfig` is everything that decides what a training run computes. It is written to the run
directory as `config.yaml`, so `ban train --config RUN/config.yaml` repeats a run and
`ban train --resume RUN` continues one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TrainConfig:
    """One training run. Epochs are 0-indexed throughout, as in the release's `train.py`."""

    task: str = "vqa"  # 'vqa' or 'flickr' (phrase grounding, ban/grounding.py)
    model: str = "ban-small"  # a preset of ban.model.PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)  # BANConfig fields
    data: str | None = None  # a prepared directory; None = the built-in benchmark
    train_splits: list[str] = field(default_factory=lambda: ["train2014"])
    eval_split: str | None = "val2014"  # None: no evaluation during training (train+val runs)
    epochs: int = 13
    batch_size: int = 256  # global: summed over processes and accumulation steps
    optimizer: str = "adamax"
    lr: float | None = None  # base rate; None = 1e-3 with an eval split, 7e-4 without (release)
    lr_warmup: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    lr_decay_epochs: list[int] = field(default_factory=lambda: [10, 12])
    lr_decay_factor: float = 0.25
    grad_clip: float = 0.25  # global 2-norm; 0 disables
    seed: int = 1204
    grad_accum: int = 1
    amp: str | None = None  # None | 'bf16' | 'fp16'
    compile: bool = False
    device: str | None = None  # None = cuda when available, else cpu
    num_workers: int = 0
    eval_batch_size: int | None = None  # None = batch_size
    log_every: int = 50  # optimizer steps between JSONL step records
    protocol: str = "any"  # flickr: 'any' (the release's) or 'merged' (one union box per phrase)
    compat: bool = False  # flickr: the release's phrase positions (first match, before commas)
    # A NaN or infinite loss or gradient stops training with an error (False), or the step is
    # skipped and counted in the epoch's record (True; reading the check waits for the device).
    skip_nonfinite: bool = False

    def base_lr(self) -> float:
        """The base rate: explicit, or the release's rule (1e-3 train-only, 7e-4 train+val)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.eval_split else 7e-4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that may change when a run is resumed: they decide where and how fast, not what.
RUNTIME_FIELDS = frozenset({"device", "num_workers", "compile", "log_every", "eval_batch_size"})

PRESETS: dict[str, TrainConfig] = {
    # The release's recipe (docs/reference.md, "Training recipe"): Adamax, batch 256, 13 epochs,
    # warm-up 0.5/1.0/1.5/2.0 x base over epochs 0-3, x0.25 at every second epoch from 10 (the
    # release's range(10, 20, 2): 10 and 12 within 13 epochs), clipping 0.25, seed 1204.
    # Train on train2014 and validate on val2014 (base 1e-3); for train+val(+VG) use
    # `--set train_splits=[train2014,val2014] --set eval_split=null` (base 7e-4 then).
    "ban-8-vqa": TrainConfig(model="ban-8-vqa", lr_decay_epochs=[10, 12, 14, 16, 18]),
    # The CPU default for the built-in benchmark: the recipe's shape (Adamax, warm-up, step decay,
    # clipping 0.25) compressed to eight epochs of a small model, to train and evaluate in about
    # ten minutes on two cores. The models stay at chance for the first 3-4 epochs there before
    # they learn to read the scenes (docs/benchmark.md), so the decay comes late.
    "ban-small": TrainConfig(
        model="ban-small",
        epochs=8,
        batch_size=128,
        lr=2e-3,
        lr_warmup=[0.5, 1.0],
        lr_decay_epochs=[6, 7],
        log_every=10,
    ),
    # Flickr30k Entities with the release's recipe (the same schedule; select on val R@1).
    "ban-flickr": TrainConfig(
        task="flickr",
        model="ban-flickr",
        train_splits=["train"],
        eval_split="val",
        lr_decay_epochs=[10, 12, 14, 16, 18],  # the release's range(10, 20, 2), as for VQA
    ),
    # The CPU default for grounding on the built-in benchmark: a small BANGrounding, the recipe
    # compressed to five epochs.
    "ban-flickr-small": TrainConfig(
        task="flickr",
        model="ban-flickr",
        model_overrides={"embedding_dim": 64, "hidden": 128},
        train_splits=["train"],
        eval_split="val",
        epochs=5,
        batch_size=128,
        lr=2e-3,
        lr_warmup=[0.5, 1.0],
        lr_decay_epochs=[3],
        log_every=10,
    ),
}


def preset(name: str) -> TrainConfig:
    """A copy of the named training preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **_copy_containers(PRESETS[name]))


def _copy_containers(config: TrainConfig) -> dict[str, Any]:
    return {
        f.name: type(getattr(config, f.name))(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if isinstance(getattr(config, f.name), (list, dict))
    }


def override(config: TrainConfig, values: dict[str, Any], source: str = "overrides") -> TrainConfig:
    """`config` with `values` applied. Keys are field names; `model.X` sets a model field X
    (merged into `model_overrides`). Unknown keys are an error naming `source`."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    model_overrides = dict(config.model_overrides)
    for key, value in values.items():
        if key.startswith("model."):
            model_overrides[key.removeprefix("model.")] = value
        elif key == "model_overrides":
            if not isinstance(value, dict):
                raise ValueError(f"{source}: model_overrides must be a mapping, got {value!r}")
            model_overrides.update(value)
        elif key in names:
            changes[key] = _coerce(key, value, source)
        else:
            raise ValueError(
                f"{source}: unknown training setting {key!r}; expected one of {sorted(names)} "
                "or model.<BANConfig field>"
            )
    return dataclasses.replace(config, **changes, model_overrides=model_overrides)


def _coerce(key: str, value: Any, source: str) -> Any:
    default = getattr(TrainConfig(), key)
    if isinstance(default, list) and isinstance(value, (str, int, float)):
        value = [value]
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
        raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
    if key == "amp" and value not in (None, "bf16", "fp16"):
        raise ValueError(f"{source}: amp must be bf16, fp16 or null, got {value!r}")
    if key == "task" and value not in ("vqa", "flickr"):
        raise ValueError(f"{source}: task must be vqa or flickr, got {value!r}")
    if key == "protocol" and value not in ("any", "merged"):
        raise ValueError(f"{source}: protocol must be any or merged, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (a full config or a partial one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of training settings, got {type(values)}")
    return values


def resolve(
    name: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Preset, then YAML file, then flags: each layer overrides the one before. A YAML file may
    name its own base preset with a `preset:` key."""
    values = load_yaml(yaml_path) if yaml_path else {}
    base = name or values.pop("preset", None) or "ban-small"
    values.pop("preset", None)
    config = preset(base)
    if values:
        config = override(config, values, source=str(yaml_path))
    if overrides:
        config = override(config, overrides, source="command line")
    return config


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def from_yaml(path: str | Path) -> TrainConfig:
    """Exactly the config in `path` (a run's `config.yaml`), with no preset underneath."""
    return override(TrainConfig(), load_yaml(path), source=str(path))


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of `epoch` (0-indexed), set at the start of each epoch as the release
    does: warm-up factors for the first epochs, then the last warm-up factor, multiplied by
    `lr_decay_factor` at each decay epoch reached."""
    base = config.base_lr()
    warmup = config.lr_warmup or [1.0]
    factor = warmup[epoch] if epoch < len(warmup) else warmup[-1]
    for decay_epoch in config.lr_decay_epochs:
        if epoch >= decay_epoch:
            factor *= config.lr_decay_factor
    return base * factor
