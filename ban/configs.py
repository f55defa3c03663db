"""Training recipes: the paper's and small CPU defaults, overridable by YAML and flags.

A `TrainConfig` is everything that decides what a training run computes. It is written to the run
directory as `config.yaml`, so `ban train --config RUN/config.yaml` repeats a run and
`ban train --resume RUN` continues one.

Why it is long (about 400 lines): the typed settings and the words of their error messages.
"""

from __future__ import annotations

import functools
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ban import presets
from ban.files import atomic_write_text
from ban.model import BANConfig


class ConfigError(ValueError):
    """A training setting of the wrong type or value; the message names the key and what it
    expects, and where the value came from (a YAML file, the command line, ...)."""


def _refuse_bool(expected: str):
    def check(value: Any) -> Any:
        # YAML reads `yes`/`true` as booleans; pydantic's lax mode would take them as 1 or 1.0
        if isinstance(value, bool):
            raise PydanticCustomError("not_bool", "{expected}", {"expected": expected})
        return value

    return check


def _listed(value: Any) -> Any:
    # `--set lr_decay_epochs=10` means [10], as `--set train_splits=train2014` means [train2014]
    return [value] if isinstance(value, (str, int, float)) else value


Integer = Annotated[int, BeforeValidator(_refuse_bool("an integer"))]  # 3, "3"; not 2.5, "ten"
Number = Annotated[float, BeforeValidator(_refuse_bool("a number"))]  # 1e-3, "1e-3" (YAML: a str)
# An epoch or a point within one (1.5); whole values stay ints (10, not 10.0, in config.yaml).
EpochPoint = Annotated[Number, AfterValidator(lambda x: int(x) if x.is_integer() else x)]


def _error(message: str) -> PydanticCustomError:
    """A validation error whose message is `message` as it stands (braces and all)."""
    return PydanticCustomError("ban_config", "{message}", {"message": message})


class TrainConfig(BaseModel):
    """One training run. Epochs are 0-indexed throughout, as in the release's `train.py`.

    Every field is typed and validated (pydantic): a value of the wrong type or out of range is
    an error naming the key (`override` and `resolve` raise `ConfigError`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    task: Literal["vqa", "flickr"] = "vqa"  # 'flickr': phrase grounding, ban/grounding.py
    model: str = "ban-small"  # a preset of ban.presets.PRESETS
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # BANConfig fields
    data: str | None = None  # a prepared directory; None = the built-in benchmark
    train_splits: Annotated[list[str], BeforeValidator(_listed), Field(min_length=1)] = Field(
        default_factory=lambda: ["train2014"]
    )
    eval_split: str | None = "val2014"  # None: no evaluation during training (train+val runs)
    epochs: Annotated[Integer, Field(ge=1)] = 13
    batch_size: Annotated[Integer, Field(ge=1)] = 256  # global: over processes and accumulation
    optimizer: Literal["adamax"] = "adamax"
    # base rate; None = 1e-3 with an eval split, 7e-4 without (release)
    lr: Annotated[Number, Field(gt=0, allow_inf_nan=False)] | None = None
    lr_warmup: Annotated[
        list[Annotated[Number, Field(gt=0, allow_inf_nan=False)]], BeforeValidator(_listed)
    ] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    # Epochs (0-indexed) from which the rate is multiplied by lr_decay_factor. Whole epochs as in
    # the release; a fraction (1.5: half-way through epoch 1) decays from that step on.
    lr_decay_epochs: Annotated[
        list[Annotated[EpochPoint, Field(ge=0, allow_inf_nan=False)]], BeforeValidator(_listed)
    ] = Field(default_factory=lambda: [10, 12])
    lr_decay_factor: Annotated[Number, Field(gt=0, allow_inf_nan=False)] = 0.25
    grad_clip: Annotated[Number, Field(ge=0, allow_inf_nan=False)] = 0.25  # 2-norm; 0 disables
    seed: Annotated[Integer, Field(ge=0)] = 1204
    grad_accum: Annotated[Integer, Field(ge=1)] = 1
    amp: Literal["bf16", "fp16"] | None = None
    compile: bool = False
    device: str | None = None  # None = cuda when available, else cpu
    num_workers: Annotated[Integer, Field(ge=0)] = 0
    # Read the region features into RAM before training (said first, refused when they would not
    # fit); False: read from the HDF5 files as batches need them (the page cache keeps what fits).
    in_memory: bool = False
    eval_batch_size: Annotated[Integer, Field(ge=1)] | None = None  # None = batch_size
    log_every: Annotated[Integer, Field(ge=1)] = 50  # optimizer steps between JSONL step records
    protocol: Literal["any", "merged"] = "any"  # flickr: 'any' (the release's) or 'merged' boxes
    compat: bool = False  # flickr: the release's phrase positions (first match, before commas)
    # A NaN or infinite loss or gradient stops training with an error (False), or the step is
    # skipped and counted in the epoch's record (True; reading the check waits for the device).
    skip_nonfinite: bool = False

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in presets.PRESETS:
            raise _error(
                f"model must be a model preset, one of {', '.join(presets.PRESETS)}; got {name!r}"
            )
        return name

    @field_validator("model_overrides")
    @classmethod
    def _model_fields(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        types = _model_field_types()
        checked = {}
        for key, value in overrides.items():
            if key not in types:
                raise _error(
                    f"model.{key}: unknown model setting; expected one of model."
                    + ", model.".join(types)
                )
            try:
                checked[key] = types[key].validate_python(value)
            except ValidationError as error:
                raise _error(f"model.{key} {_expects(error.errors()[0])}, got {value!r}") from None
        return checked

    @field_validator("device")
    @classmethod
    def _device(cls, device: str | None) -> str | None:
        if device is not None:
            try:
                torch.device(device)
            except RuntimeError:
                raise _error(
                    f"device must be a device such as cpu, cuda, cuda:1 or mps, got {device!r}"
                ) from None
        return device

    @model_validator(mode="after")
    def _model_fits_task(self) -> TrainConfig:
        # The model's own checks (glimpses 1..32, fusion, ...) and its task, before a run starts.
        try:
            model = presets.preset(self.model, **self.model_overrides)
        except ValueError as error:
            # BANConfig's checks start with the field's name: "glimpses must be in 1..32, ..."
            named = str(error).split()[0] in self.model_overrides
            raise _error(f"model.{error}" if named else f"model {self.model}: {error}") from None
        expected = "grounding" if self.task == "flickr" else "vqa"
        if model.task != expected:
            raise _error(
                f"task {self.task} needs a {expected} model, but model {self.model} is a "
                f"{model.task} model"
            )
        return self

    def base_lr(self) -> float:
        """The base rate: explicit, or the release's rule (1e-3 train-only, 7e-4 train+val)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.eval_split else 7e-4

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


@functools.cache
def _model_field_types() -> dict[str, TypeAdapter]:
    """A validator for each BANConfig field, from its type hint (int, float, bool, str)."""
    numbers = {int: Integer, float: Number}
    return {
        name: TypeAdapter(numbers.get(hint, hint))
        for name, hint in typing.get_type_hints(BANConfig).items()
    }


def _expects(error: dict) -> str:
    """What pydantic's error says the value should be, in the words of this project."""
    kind, ctx = error["type"], error.get("ctx", {})
    words = {
        "int_parsing": "must be an integer",
        "int_type": "must be an integer",
        "int_from_float": "must be an integer",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a mapping",
        "too_short": "must not be empty",
        "extra_forbidden": "is not a training setting",
    }
    if kind in words:
        return words[kind]
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "not_bool":
        return f"must be {ctx['expected']}, not true/false"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    return error["msg"]


def _describe(error: ValidationError, source: str) -> ConfigError:
    """One line per wrong setting: `SOURCE: KEY must be WHAT, got VALUE`."""
    lines = []
    for item in error.errors():
        key = ""
        for part in item["loc"]:
            key += f"[{part}]" if isinstance(part, int) else f"{'.' if key else ''}{part}"
        if item["type"] == "ban_config":  # written whole by a validator above
            message = item["ctx"]["message"]
        else:
            expects = _expects(item)
            field = TrainConfig.model_fields.get(str(item["loc"][0])) if item["loc"] else None
            if item["type"] == "literal_error" and field and field.default is None:
                expects += " or null"
            message = f"{key} {expects}, got {item['input']!r}"
        lines.append(f"{source}: {message}")
    return ConfigError("\n".join(lines))


def validate(values: dict[str, Any], source: str = "settings") -> TrainConfig:
    """A TrainConfig of `values` (every field named, or the defaults); a wrong key, type or value
    is a `ConfigError` naming `source`, the key and what it expects."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise _describe(error, source) from None


# Fields that may change when a run is resumed: they decide where and how fast, not what.
RUNTIME_FIELDS = frozenset(
    {"device", "num_workers", "in_memory", "compile", "log_every", "eval_batch_size"}
)

# Training recipes. Their names say the task and the scale; the model presets they train are
# `ban.presets.PRESETS` (`ban info --list` lists both).
RECIPES: dict[str, TrainConfig] = {
    # The release's recipe (docs/reference.md, "Training recipe"): Adamax, batch 256, 13 epochs,
    # warm-up 0.5/1.0/1.5/2.0 x base over epochs 0-3, x0.25 at every second epoch from 10 (the
    # release's range(10, 20, 2): 10 and 12 within 13 epochs), clipping 0.25, seed 1204.
    # Train on train2014 and validate on val2014 (base 1e-3); for train+val(+VG) use
    # `--set train_splits=[train2014,val2014] --set eval_split=null` (base 7e-4 then).
    "vqa-paper": TrainConfig(model="ban-8-vqa", lr_decay_epochs=[10, 12, 14, 16, 18]),
    # The CPU default for the built-in benchmark (docs/benchmark.md, "The default `ban train`"):
    # a small model (BAN-8, H 128), many scenes seen few times. The models start on a plateau at
    # chance whose length varies with the seed, so the rate stays at its base for three epochs
    # and the fourth decays it. Adamax and clipping 0.25 as in the release.
    "vqa-small": TrainConfig(
        model="ban-small",
        epochs=4,
        batch_size=128,
        lr=2e-3,
        lr_warmup=[1.0],
        lr_decay_epochs=[3],
        in_memory=True,
        log_every=10,
    ),
    # Flickr30k Entities with the release's recipe (the same schedule; select on val R@1).
    "flickr-paper": TrainConfig(
        task="flickr",
        model="ban-flickr",
        train_splits=["train"],
        eval_split="val",
        lr_decay_epochs=[10, 12, 14, 16, 18],  # the release's range(10, 20, 2), as for VQA
    ),
    # The CPU default for grounding on the built-in benchmark: a small BANGrounding, the recipe
    # compressed to five epochs.
    "flickr-small": TrainConfig(
        task="flickr",
        in_memory=True,
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


def recipe(name: str) -> TrainConfig:
    """A copy of the named training recipe."""
    if name not in RECIPES:
        hint = ""
        if name in presets.PRESETS:
            trains = [r for r, c in RECIPES.items() if c.model == name]
            hint = f"; {name!r} is a model preset" + (
                f", trained by the recipe {trains[0]!r}" if trains else ""
            )
        raise ConfigError(
            f"unknown training recipe {name!r}; expected one of {', '.join(RECIPES)}{hint}"
        )
    return RECIPES[name].model_copy(deep=True)


def override(config: TrainConfig, values: dict[str, Any], source: str = "overrides") -> TrainConfig:
    """`config` with `values` applied. Keys are field names; `model.X` sets a model field X
    (merged into `model_overrides`). Unknown keys, and values of the wrong type or range, are a
    `ConfigError` naming `source` and the key."""
    names = set(TrainConfig.model_fields)
    merged = config.to_dict()
    model_overrides = dict(config.model_overrides)
    for key, value in values.items():
        if key.startswith("model."):
            model_overrides[key.removeprefix("model.")] = value
        elif key == "model_overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: model_overrides must be a mapping, got {value!r}")
            model_overrides.update(value)
        elif key in names:
            merged[key] = value
        else:
            raise ConfigError(
                f"{source}: unknown training setting {key!r}; expected one of {sorted(names)} "
                "or model.<BANConfig field>"
            )
    merged["model_overrides"] = model_overrides
    return validate(merged, source)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (a full config or a partial one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a YAML file ({_one_line(error)})") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: expected a mapping of training settings, got {type(values).__name__}"
        )
    if not all(isinstance(key, str) for key in values):
        raise ConfigError(f"{path}: the keys must be setting names, got {list(values)}")
    return values


def resolve(
    name: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Recipe, then YAML file, then flags: each layer overrides the one before. A YAML file may
    name its own base recipe with a `recipe:` key (default: vqa-small, or flickr-small for
    task flickr)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    if "preset" in values:
        raise ConfigError(f"{yaml_path}: 'preset:' is now 'recipe:' (a training recipe)")
    task = (overrides or {}).get("task", values.get("task", "vqa"))
    base = (
        name or values.pop("recipe", None) or ("flickr-small" if task == "flickr" else "vqa-small")
    )
    values.pop("recipe", None)
    config = recipe(base)
    if values:
        config = override(config, values, source=str(yaml_path))
    if overrides:
        config = override(config, overrides, source="command line")
    return config


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    """Write `config` as YAML, atomically (a reader sees the old file or the whole new one)."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a dict, each value read as YAML (`parse_value`)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        settings[key.strip()] = parse_value(key.strip(), value)
    return settings


def parse_value(key: str, text: str) -> Any:
    """The value of `--set KEY=TEXT`, read as YAML (`10`, `1e-3`, `[10, 12]`, `null`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}={text}: not a YAML value ({_one_line(error)})") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def from_yaml(path: str | Path) -> TrainConfig:
    """Exactly the config in `path` (a run's `config.yaml`), with no preset underneath."""
    return override(TrainConfig(), load_yaml(path), source=str(path))


def lr_at(config: TrainConfig, epoch: float) -> float:
    """The learning rate at `epoch` (0-indexed; a fraction is a point within an epoch): the
    warm-up factor of its whole epoch (then the last warm-up factor), multiplied by
    `lr_decay_factor` at each decay epoch reached. With whole decay epochs the rate changes only
    at the start of an epoch, as in the release."""
    base = config.base_lr()
    warmup = config.lr_warmup or [1.0]
    whole = math.floor(epoch)
    factor = warmup[whole] if whole < len(warmup) else warmup[-1]
    for decay_epoch in config.lr_decay_epochs:
        if epoch >= decay_epoch:
            factor *= config.lr_decay_factor
    return base * factor
