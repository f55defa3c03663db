"""The baselines (ban/baselines.py) against naive re-statements of their equations."""

import pytest
import torch
import torch.nn.functional as F

import ban
from ban.baselines import (
    ConcatAttention,
    QuestionOnly,
    UnitaryAttentionVQA,
    UnitaryGrounding,
    last_token_states,
)
from ban.model import BAN, BANGrounding
from ban.presets import preset

VOCAB, DV = 30, 12


def small(**overrides):
    values = dict(vocab_size=VOCAB, embedding_dim=8, hidden=16, visual_dim=DV, num_answers=7)
    values["max_objects"] = 4  # the counter reads the 4 most attended of 5 boxes
    return preset("ban-small", **{**values, **overrides})


def inputs(batch=3, boxes=5, tokens=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(batch, boxes, DV, generator=g) + 0.1
    corners = torch.rand(batch, boxes, 2, generator=g) * 0.5
    b = torch.cat([corners, corners + 0.3], dim=2)
    q = torch.randint(0, VOCAB, (batch, tokens), generator=g)
    q[0, 3:] = VOCAB  # right padding
    return v, b, q


def test_concat_attention_equals_the_concatenation():
    torch.manual_seed(0)
    attention = ConcatAttention(DV, 9, 11).eval()
    v, q = torch.randn(2, 5, DV), torch.randn(2, 3, 9)
    pairs = torch.cat(
        [v[:, :, None, :].expand(-1, -1, 3, -1), q[:, None, :, :].expand(-1, 5, -1, -1)], dim=3
    )  # [B, N, E, Dv + Dq]
    hidden = attention.hidden
    weight = hidden.weight_v * (hidden.weight_g / hidden.weight_v.norm())
    joint = F.relu(pairs @ weight.T + hidden.bias)
    out = attention.output
    expected = joint @ (out.weight_v * (out.weight_g / out.weight_v.norm())).T + out.bias
    torch.testing.assert_close(attention(v, q), expected.squeeze(3), rtol=1e-5, atol=1e-5)


def test_last_token_states_reads_the_last_real_token():
    states = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    q = torch.tensor([[1, 2, 9, 9], [9, 9, 9, 9]])  # padding index 9; the second is empty
    assert last_token_states(states, q, padding_idx=9).flatten().tolist() == [1.0, 4.0]


def test_unitary_vqa_matches_its_equations():
    torch.manual_seed(1)
    model = UnitaryAttentionVQA(small(attention="unitary", counter=False)).eval()
    v, b, q = inputs()
    v[1, 4] = 0  # a padded box
    out = model(v, b, q)

    states, _ = model.question_encoder(model.embedding(q))
    lengths = (q != VOCAB).sum(dim=1)
    question = torch.stack([states[i, lengths[i] - 1] for i in range(len(q))])  # [B, H]
    scores = model.attention(v, question[:, None]).squeeze(2)  # [B, N]
    scores[1, 4] = float("-inf")
    weights = scores.softmax(dim=1)
    attended = (weights[:, :, None] * v).sum(dim=1)
    joint = model.question_net(question) * model.visual_net(attended)
    torch.testing.assert_close(out.logits, model.classifier(joint))
    assert out.attention.shape == (3, 1, 5, 1)
    assert out.attention[1, 0, 4, 0] == 0
    torch.testing.assert_close(out.attention.sum(dim=(1, 2, 3)), torch.ones(3))


def test_unitary_counter_changes_the_answer_through_the_boxes():
    torch.manual_seed(2)
    model = UnitaryAttentionVQA(small(attention="unitary", counter=True)).eval()
    v, b, q = inputs()
    far = b.clone()
    far[:, :, :2] = torch.arange(5.0)[None, :, None] * 2  # boxes far apart: no duplicates
    far[:, :, 2:] = far[:, :, :2] + 1
    assert not torch.allclose(model(v, b, q).logits, model(v, far, q).logits)


def test_question_only_never_reads_the_image():
    torch.manual_seed(3)
    model = QuestionOnly(small(attention="none")).eval()
    v, b, q = inputs()
    out = model(v, b, q)
    assert torch.equal(out.logits, model(v.flip(1) * 3, b, q).logits)
    assert out.attention.shape == (3, 0, 5, 1)
    with pytest.raises(ValueError, match="no boxes"):
        model(torch.zeros_like(v), b, q)


def test_unitary_grounding_scores_and_padding():
    torch.manual_seed(4)
    config = preset("ban-flickr", vocab_size=VOCAB, embedding_dim=8, hidden=16, visual_dim=DV)
    model = UnitaryGrounding(preset("ban-flickr", **{**config.to_dict(), "attention": "unitary"}))
    model.eval()
    v, _, q = inputs()
    v[2, 3:] = 0
    phrase_index = torch.tensor([[1, 2], [0, -1], [5, 4]])
    scores = model(v, q, phrase_index)
    assert scores.shape == (3, 2, 5)
    assert (scores[2, :, 3:] == UnitaryGrounding.padding_score).all()
    states = model.encode_question(q)
    expected = model.attention(v[:1], states[:1, [1, 2]]).transpose(1, 2)
    torch.testing.assert_close(scores[:1], expected)


def test_build_dispatches_and_bilinear_classes_refuse_baselines():
    assert type(ban.build(small(attention="unitary"))) is UnitaryAttentionVQA
    assert type(ban.build(small(attention="none"))) is QuestionOnly
    assert type(ban.build(small())) is BAN
    grounding = preset("ban-flickr", hidden=16, embedding_dim=8, vocab_size=VOCAB)
    assert type(ban.build(grounding)) is BANGrounding
    unitary_grounding = preset("ban-flickr", **{**grounding.to_dict(), "attention": "unitary"})
    assert type(ban.build(unitary_grounding)) is UnitaryGrounding
    with pytest.raises(ValueError, match="ban.build"):
        BAN(small(attention="unitary"))
    with pytest.raises(ValueError, match="attention must be one of"):
        small(attention="coattention")
    with pytest.raises(ValueError, match="grounding model needs"):
        preset("ban-flickr", attention="none")


@pytest.mark.parametrize("attention", ["unitary", "none"])
def test_baselines_round_trip_through_checkpoints(tmp_path, attention):
    torch.manual_seed(5)
    model = ban.build(small(attention=attention)).eval()
    model.vocabulary, model.answers = [f"w{i}" for i in range(VOCAB)], list("abcdefg")
    loaded = ban.load(ban.save(model, tmp_path / "m.safetensors"))
    assert type(loaded) is type(model)
    v, b, q = inputs()
    assert torch.equal(model(v, b, q).logits, loaded(v, b, q).logits)


def test_flops_count_the_baselines_smaller_than_ban():
    bilinear = ban.flops_per_example(small())
    unitary = ban.flops_per_example(small(attention="unitary"))
    question = ban.flops_per_example(small(attention="none"))
    assert question < unitary < bilinear
