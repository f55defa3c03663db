"""`ban.load_official` against an independent re-statement of the release's computation."""

import os
import pickle

import pytest
import torch

import ban
from ban.cli import main
from ban.official import read_plain_pickle
from tests.release_reference import (
    random_release_state,
    release_flickr_logits,
    release_vqa_forward,
)


def _inputs(vocab, visual, batch=4, boxes=14, tokens=14, seed=1):
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(batch, boxes, visual, generator=gen)
    v[0, 11:] = 0  # padded boxes (the counter still sees >= 10 boxes)
    v[2, 10:] = 0
    corners = torch.rand(batch, boxes, 2, generator=gen) * 0.6
    sizes = torch.rand(batch, boxes, 2, generator=gen) * 0.4 + 0.01
    b = torch.cat([corners, corners + sizes, sizes], dim=2)
    q = torch.randint(0, vocab, (batch, tokens), generator=gen)
    q[0, 5:] = vocab  # right padding with index V, as the release pads
    q[1, 9:] = vocab
    return v, b, q


def _max_relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


CASES = [
    dict(),
    dict(tfidf=False, counter=False, glimpses=1, gain_shape=(1,)),
    dict(glimpses=8, hidden=24, visual=32, answers=11, gain_shape=(1,)),
    dict(glimpses=3, tfidf=False, counter=True, vocab=30, dim=8),
]


@pytest.mark.parametrize("sizes", CASES)
def test_vqa_logits_match_the_release(tmp_path, sizes):
    state = random_release_state(**sizes)
    path = tmp_path / "model_epoch12.pth"
    torch.save({"epoch": 12, "model_state": state, "optimizer_state": {}}, path)
    model = ban.load_official(path)
    assert not model.training
    vocab = state["module.w_emb.emb.weight"].shape[0] - 1
    visual = state["module.v_att.logits.v_net.main.1.weight_v"].shape[1]
    v, b, q = _inputs(vocab, visual)
    with torch.no_grad():
        out = model(v, b, q)
        logits, attention = release_vqa_forward(state, v, b, q)
    assert _max_relative_error(out.logits, logits) < 1e-4
    assert _max_relative_error(out.attention, attention) < 1e-4
    assert out.attention[0, :, 11:].abs().max() == 0  # masked boxes get exactly zero attention


def test_config_is_inferred_from_tensors(tmp_path):
    state = random_release_state(vocab=40, dim=10, hidden=16, glimpses=3, visual=24, answers=9)
    torch.save(state, tmp_path / "bare.pth")  # a bare state dict is accepted too
    config = ban.load_official(tmp_path / "bare.pth").config
    assert (config.vocab_size, config.embedding_dim, config.hidden, config.glimpses) == (
        40,
        10,
        16,
        3,
    )
    assert (config.rank, config.visual_dim, config.num_answers) == (3, 24, 9)
    assert config.tfidf_embedding and config.counter and config.task == "vqa"


def test_grounding_checkpoint_gives_the_release_box_scores(tmp_path):
    state = random_release_state(tfidf=False, glimpses=1, grounding=True, counter=False)
    torch.save({"model_state": state}, tmp_path / "flickr.pth")
    model = ban.load_official(tmp_path / "flickr.pth")
    assert isinstance(model, ban.BANGrounding) and model.config.task == "grounding"
    v, _, q = _inputs(50, 20)
    entity_index = torch.tensor([[0, 3, 4], [8, 8, 8], [1, 2, 13], [5, 6, 7]])
    with torch.no_grad():
        scores = model(v, q, entity_index)
    reference = release_flickr_logits(state, v, q, entity_index)
    assert scores.shape == (4, 3, 14)
    assert _max_relative_error(scores, reference) < 1e-4
    assert torch.all(scores[0, :, 11:] == -99.0)


def test_dictionary_and_answers_are_attached(tmp_path):
    state = random_release_state(vocab=5, answers=3)
    torch.save({"model_state": state}, tmp_path / "m.pth")
    words = ["what", "is", "the", "color", "dog"]
    with open(tmp_path / "dictionary.pkl", "wb") as f:
        pickle.dump([{w: i for i, w in enumerate(words)}, words], f)
    with open(tmp_path / "label2ans.pkl", "wb") as f:
        pickle.dump(["yes", "no", "2"], f)
    model = ban.load_official(
        tmp_path / "m.pth", tmp_path / "dictionary.pkl", tmp_path / "label2ans.pkl"
    )
    assert model.vocabulary == words and model.answers == ["yes", "no", "2"]
    assert model.notes["unknown_word_index"] == 4  # the release maps unknown words to V - 1
    with open(tmp_path / "short.pkl", "wb") as f:
        pickle.dump(["yes"], f)
    with pytest.raises(ValueError, match="1 answers, but the checkpoint has 3"):
        ban.load_official(tmp_path / "m.pth", label2ans=tmp_path / "short.pkl")


def test_convert_official_cli_round_trip(tmp_path):
    state = random_release_state(seed=3)
    torch.save({"model_state": state}, tmp_path / "m.pth")
    assert main(["convert-official", str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors")]) == 0
    converted = ban.load(tmp_path / "m.safetensors")
    original = ban.load_official(tmp_path / "m.pth")
    v, b, q = _inputs(50, 20)
    with torch.no_grad():
        assert torch.equal(converted(v, b, q).logits, original(v, b, q).logits)
    assert converted.notes["unknown_word_index"] == 49


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_carrying_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model_state": random_release_state(), "hook": _Boom()}, path)
    with pytest.raises(ValueError, match="refused"):
        ban.load_official(path)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Boom(), f)
    with pytest.raises(ValueError, match="not a plain-data pickle"):
        read_plain_pickle(tmp_path / "evil.pkl")
    assert "this must never run" not in capsys.readouterr().out


def _no_advice(message):
    """A refusal teaches nothing of how to load the file anyway, and prints no escape codes."""
    for advice in ("weights_only", "add_safe_globals", "safe_globals", "trust", "\x1b["):
        assert advice not in message, (advice, message)


def test_a_refusal_names_the_code_and_gives_no_advice(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model_state": random_release_state(), "hook": print}, path)
    with pytest.raises(ValueError) as caught:
        ban.load_official(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: the file refers to print, which is code")
    _no_advice(message)
    assert main(["info", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "refused" in err
    _no_advice(err)


def _truncated_old_format(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(random_release_state(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    return [data[:n] for n in (1, 40, 120, 300, len(data) // 2, len(data) - 1)]


def test_random_or_truncated_bytes_are_damaged_not_unsafe(tmp_path, capsys):
    torch.save(random_release_state(), tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    cases = {
        "random.pth": os.urandom(4096),
        "pickle-like.pth": b"\x80" + os.urandom(4095),  # a pickle's first byte, then noise
        "cut.pth": whole[: len(whole) // 2],
    }
    for n, data in enumerate(_truncated_old_format(tmp_path)):
        cases[f"cut-old-{n}.pth"] = data  # the release's own (pre-1.6) format, cut short
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as caught:
            ban.load_official(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name}: not a PyTorch checkpoint, or a damaged")
        assert "refused" not in message
        _no_advice(message)
    assert main(["info", "--checkpoint", str(tmp_path / "random.pth")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint, or a damaged" in err and len(err.splitlines()) == 1


def test_unexpected_keys_and_missing_files_are_named(tmp_path):
    state = random_release_state()
    state["module.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="extra.weight"):
        ban.load_official(tmp_path / "odd.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ban.load_official(tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        ban.load_official(tmp_path / "junk.pth")
