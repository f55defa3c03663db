"""Reading the original release's checkpoints (jnhwkim/ban-vqa), see docs/reference.md section 2.

The release saves `{'epoch', 'model_state', 'optimizer_state'}` with `module.`-prefixed keys and
weight-normalised layers as `weight_g` (a scalar, shape [] or [1]) and `weight_v`. Every size is
inferred from the tensors. Files are read with `torch.load(weights_only=True)`, so a file that
holds anything but tensors and plain containers is refused, and no code in it ever runs.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
from pathlib import Path

import torch

from ban.model import BAN, BANConfig, BANGrounding
from ban.presets import build

# The release's key -> this project's key (applied after the `module.` prefix is removed).
_RENAMES = [
    (r"^w_emb\.emb\.weight$", "embedding.words.weight"),
    (r"^w_emb\.emb_\.weight$", "embedding.tfidf.weight"),
    (r"^q_emb\.rnn\.", "question_encoder."),
    (r"^v_att\.logits\.h_mat_([gv])$", r"attention.h_mat_\1"),
    (r"^v_att\.logits\.h_bias$", "attention.h_bias"),
    (r"^v_att\.logits\.([vq])_net\.main\.\d+\.", r"attention.\1_net.linear."),
    (r"^b_net\.(\d+)\.([vq])_net\.main\.\d+\.", r"pooling.\1.\2_net.linear."),
    (r"^q_prj\.(\d+)\.main\.\d+\.", r"question_projections.\1.linear."),
    (r"^c_prj\.(\d+)\.main\.\d+\.", r"count_projections.\1.linear."),
    (r"^classifier\.main\.0\.", "classifier.hidden.linear."),
    (r"^classifier\.main\.3\.", "classifier.output."),
    (r"^counter\.f\.(\d+)\.weight$", r"counter.f.\1.weight"),
]
# A checkpoint re-saved with torch's parametrized weight norm names g and v like this.
_PARAMETRIZED = [(".parametrizations.weight.original0", ".weight_g"),
                 (".parametrizations.weight.original1", ".weight_v")]  # fmt: skip


def read_official_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The release's `model_state` (or a bare state dict), without `module.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    reason = _unreadable(path)
    if reason:
        raise _damaged(path, reason)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refused_or_damaged(path, str(error)) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, struct.error) as error:
        raise _damaged(path, _plain(str(error))) from None
    state = data.get("model_state", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors or {{'model_state': ...}}")
    cleaned = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in _PARAMETRIZED:
            key = key.replace(old, new)
        cleaned[key] = value
    return cleaned


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be a file of `torch.save`, found without running anything in it; None
    when it may be one. A zip archive (PyTorch >= 1.6) is checked by torch's zip reader; a file of
    the old format (the release's) is five pickles then the tensors' bytes, and its pickles are
    walked opcode by opcode (pickletools, which executes nothing) to find a truncated or corrupt
    one before torch reads it."""
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"PK":
            return None
        if head[:1] != b"\x80":  # pickle protocol 2+ starts with PROTO
            return "it is neither a zip archive nor a pickle"
        f.seek(0)
        for _ in range(5):  # magic number, protocol version, system info, the object, storages
            try:
                for _ in pickletools.genops(f):
                    pass
            except ValueError as error:
                return f"its pickle is cut short or corrupt: {error}"
    return None


# torch's refusals of a reference to code (a function, class or module in the pickle); other
# refusals ("Unsupported operand 33", "String is too long") are bytes that are not a pickle.
_CODE_REFERENCE = [
    r"Unsupported global: GLOBAL (\S+)",
    r"unsupported GLOBAL (\S+) whose module",
    r"Can only create new object .* but got (.+?)(?:\. |$)",
    r"Can only build Tensor, Parameter, OrderedDict .* but got (.+?)(?:\. |$)",
]


def _plain(message: str) -> str:
    """One of torch's error messages without its advice to load the file unsafely
    (`weights_only=False`, `add_safe_globals`), its ANSI escape codes and its line breaks."""
    message = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", message)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    message = message.split("Please use `torch.serialization")[0]
    message = message.split("Check the documentation of torch.load")[0]
    return " ".join(message.split()).rstrip(". ")


def _damaged(path: Path, detail: str) -> ValueError:
    detail = detail.split(". ")[0]  # the first sentence: what failed
    return ValueError(
        f"{path}: not a PyTorch checkpoint, or a damaged (truncated or corrupt) one ({detail})"
    )


def _refused_or_damaged(path: Path, message: str) -> ValueError:
    detail = _plain(message)
    for pattern in _CODE_REFERENCE:
        found = re.search(pattern, detail)
        if found:
            return ValueError(
                f"{path}: refused: the file refers to {found.group(1).rstrip('.')}, which is code, "
                "not tensors or plain data; a checkpoint holds only those, so this file is not "
                "loaded (nothing in it was run)"
            )
    return _damaged(path, detail)


def config_from_state(state: dict[str, torch.Tensor]) -> BANConfig:
    """Infer every size of the release's model from its tensors."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"not a BAN checkpoint of the release: key {key!r} is missing")
        return tuple(state[key].shape)

    if any(key.startswith("v_att.logits.h_net") for key in state):
        raise ValueError("checkpoints with more than 32 glimpses (h_net) are not supported")
    rows, embedding_dim = shape("w_emb.emb.weight")
    hidden = shape("q_emb.rnn.weight_hh_l0")[1]
    h_mat = shape("v_att.logits.h_mat_v")  # [1, G, 1, H*K]
    glimpses, joint = h_mat[1], h_mat[-1]
    if joint % hidden:
        raise ValueError(f"attention size {joint} is not a multiple of the GRU size {hidden}")
    visual_dim = shape("v_att.logits.v_net.main.1.weight_v")[1]
    task = "vqa" if "classifier.main.3.weight_v" in state else "grounding"
    values = dict(
        vocab_size=rows - 1,
        embedding_dim=embedding_dim,
        tfidf_embedding="w_emb.emb_.weight" in state,
        hidden=hidden,
        glimpses=glimpses,
        rank=joint // hidden,
        visual_dim=visual_dim,
        task=task,
    )
    if task == "vqa":
        counter = "counter.f.0.weight" in state
        values.update(num_answers=shape("classifier.main.3.weight_v")[0], counter=counter)
        if counter:
            values["max_objects"] = shape("c_prj.0.main.0.weight_v")[1] - 1
        found = sum(1 for k in state if re.fullmatch(r"q_prj\.\d+\.main\.1\.weight_v", k))
        if found != glimpses:
            raise ValueError(f"the attention has {glimpses} glimpses but {found} q_prj layers")
    else:
        values.update(num_answers=1, counter=False)
    return BANConfig(**values)


def state_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the release's keys to this project's and reshape where layouts differ."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in _RENAMES:
            new_key, found = re.subn(pattern, replacement, key)
            if found:
                break
        else:
            raise ValueError(f"unexpected key in the release checkpoint: {key!r}")
        if new_key.endswith("_g"):
            value = value.reshape(())  # gains saved as [1] by old PyTorch, [] since 0.4
        elif new_key == "attention.h_mat_v":
            value = value.reshape(value.shape[1], value.shape[-1])  # [1, G, 1, HK] -> [G, HK]
        elif new_key == "attention.h_bias":
            value = value.reshape(-1)  # [1, G, 1, 1] -> [G]
        converted[new_key] = value
    return converted


def load_official(
    path: str | os.PathLike,
    dictionary: str | os.PathLike | None = None,
    label2ans: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> BAN | BANGrounding:
    """A checkpoint of the original release as this project's model, in eval mode.

    It computes the release's logits for the same `(v, b, q)` in the release's token indexing
    (right padding with index V). `dictionary` (the release's `dictionary.pkl`) and `label2ans`
    (`trainval_label2ans.pkl`) fill `model.vocabulary` and `model.answers` when given. The
    release maps unknown words to index V-1; `model.notes['unknown_word_index']` says so.
    """
    state = read_official_state(path)
    try:
        config = config_from_state(state)
        converted = state_from_official(state)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    model = build(config)
    try:
        model.load_state_dict(converted)
    except RuntimeError as error:
        raise ValueError(f"{path}: tensors do not fit the inferred model: {error}") from None
    model.notes = {"source": f"original release checkpoint {Path(path).name}",
                   "unknown_word_index": config.vocab_size - 1}  # fmt: skip
    if dictionary is not None:
        word2idx, idx2word = read_plain_pickle(dictionary)
        if len(idx2word) != config.vocab_size:
            raise ValueError(
                f"{dictionary}: {len(idx2word)} words, but the checkpoint has {config.vocab_size}"
            )
        model.vocabulary = list(idx2word)
    if label2ans is not None:
        answers = list(read_plain_pickle(label2ans))
        if len(answers) != config.num_answers:
            raise ValueError(
                f"{label2ans}: {len(answers)} answers, but the checkpoint has {config.num_answers}"
            )
        model.answers = answers
    return model.to(device).eval()


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is read")


def read_plain_pickle(path: str | os.PathLike):
    """Read a pickle of plain containers (lists, dicts, strings, numbers) and nothing else.

    The release's `dictionary.pkl` and `trainval_label2ans.pkl` are such files. Any class or
    function reference is refused, so no code runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        try:
            return _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"{path}: not a plain-data pickle ({error})") from None
