"""The project's own checkpoint format: one safetensors file that rebuilds a ready model.

The tensors are the model's `state_dict`; the safetensors header's metadata (strings only) holds
JSON of the configuration, the vocabulary, the answer list and free-form notes. A safetensors file
cannot carry code, so loading one never executes anything. Files are written atomically: to a
temporary name in the same folder, then renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ban.files import atomic_write
from ban.model import BAN, BANConfig, BANGrounding
from ban.official import load_official
from ban.presets import build

FORMAT = "ban-checkpoint/1"


def save(model: BAN | BANGrounding, path: str | os.PathLike, notes: dict | None = None) -> Path:
    """Write `model` (config, vocabulary, answers, weights) to one `.safetensors` file.

    `notes` is any JSON-serialisable dict kept beside them (for example where the weights came
    from, or how unknown words are indexed); `model.notes` is saved when `notes` is None.
    """
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "vocabulary": json.dumps(model.vocabulary),
        "answers": json.dumps(model.answers),
        "notes": json.dumps(notes if notes is not None else getattr(model, "notes", {})),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a checkpoint: config, vocabulary, answers, notes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except SafetensorError as error:
        raise damaged(path, error) from None
    if raw.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a ban checkpoint (format {raw.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        return {key: json.loads(raw[key]) for key in ("config", "vocabulary", "answers", "notes")}
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({error})") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> BAN | BANGrounding:
    """Rebuild the model saved by `save`, in eval mode, with `.vocabulary`, `.answers`, `.notes`."""
    metadata = read_metadata(path)
    model = build(BANConfig.from_dict(metadata["config"]))
    try:
        state = load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise damaged(path, error) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not match the saved configuration: {error}") from None
    model.vocabulary = metadata["vocabulary"]
    model.answers = metadata["answers"]
    model.notes = metadata["notes"]
    return model.to(device).eval()


def damaged(path: str | os.PathLike, error: Exception) -> ValueError:
    """The error for a `.safetensors` file whose header or tensors do not read: random bytes, a
    truncated copy, or another kind of file renamed."""
    return ValueError(
        f"{path}: not a safetensors checkpoint, or a damaged (truncated or corrupt) one: "
        f"{' '.join(str(error).split())}"
    )


def is_own_checkpoint(path: str | os.PathLike) -> bool:
    """True for a safetensors file (8-byte header length, then a JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_any(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dictionary: str | os.PathLike | None = None,
    label2ans: str | os.PathLike | None = None,
) -> BAN | BANGrounding:
    """Load either this project's checkpoint or one of the original release (`load_official`,
    with the release's `dictionary.pkl` / `trainval_label2ans.pkl` when given)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_own_checkpoint(path):
        return load(path, device)
    if Path(path).suffix == ".safetensors":  # not a pickle of the release: say what it is not
        raise damaged(path, SafetensorError("its header is not JSON"))
    return load_official(path, dictionary=dictionary, label2ans=label2ans, device=device)


def convert_official(
    source: str | os.PathLike,
    target: str | os.PathLike,
    dictionary: str | os.PathLike | None = None,
    label2ans: str | os.PathLike | None = None,
) -> Path:
    """Write a release checkpoint in this project's format (one `.safetensors` file)."""
    return save(load_official(source, dictionary, label2ans), target)
