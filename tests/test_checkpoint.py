"""The project's own checkpoint format."""

import os

import pytest
import torch

import ban
from ban.checkpoint import load_any, read_metadata
from ban.cli import main
from ban.model import BANConfig


def _model():
    torch.manual_seed(0)
    config = BANConfig(vocab_size=5, embedding_dim=4, hidden=8, glimpses=2, num_answers=3,
                       visual_dim=6)  # fmt: skip
    model = ban.BAN(config)
    model.vocabulary = ["what", "colour", "is", "the", "cube"]
    model.answers = ["red", "blue", "2"]
    return model


def test_round_trip(tmp_path):
    model = _model().eval()
    path = ban.save(model, tmp_path / "sub" / "model.safetensors", notes={"epoch": 3})
    loaded = ban.load(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.vocabulary == model.vocabulary and loaded.answers == model.answers
    assert loaded.notes == {"epoch": 3}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    v, b = torch.rand(2, 10, 6), torch.rand(2, 10, 6)
    q = torch.tensor([[0, 1, 2, 5], [3, 4, 5, 5]])
    assert torch.equal(loaded(v, b, q).logits, model(v, b, q).logits)
    assert load_any(path).config == model.config
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    assert read_metadata(path)["answers"] == ["red", "blue", "2"]


def test_a_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"weights": torch.zeros(3), "run": os.system}, path)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors checkpoint"):
        ban.load(path)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors checkpoint"):
        load_any(path)  # not sent on to the release's pickle reader


@pytest.mark.parametrize("name", ["random.safetensors", "brace.safetensors", "cut.safetensors"])
def test_a_damaged_safetensors_file_is_named(tmp_path, capsys, name):
    path = tmp_path / name
    noise = bytearray(os.urandom(4096))
    if name == "brace.safetensors":
        noise[8:9] = b"{"  # looks like a safetensors header until it is parsed
    if name == "cut.safetensors":
        whole = ban.save(_model(), tmp_path / "whole.safetensors").read_bytes()
        noise = whole[: len(whole) // 2]
    path.write_bytes(bytes(noise))
    with pytest.raises(ValueError, match=f"{name}: not a safetensors checkpoint, or a damaged"):
        load_any(path)
    assert main(["info", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ban: error: {path}: not a safetensors checkpoint, or a damaged")
    assert "Traceback" not in err and "load_official" not in err and len(err.splitlines()) == 1


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = _model()
    path = ban.save(model, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ban.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ban.save(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_info_command(tmp_path, capsys):
    assert main(["info"]) == 0
    assert "parameters: 90,618,566" in capsys.readouterr().out
    path = ban.save(_model(), tmp_path / "m.safetensors")
    assert main(["info", "--checkpoint", str(path)]) == 0
    assert "glimpses=2" in capsys.readouterr().out
    assert main(["info", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
