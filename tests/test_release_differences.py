"""The release's behaviours listed in docs/release_differences.md, each checked against a plain
restatement of the release's code (jnhwkim/ban-vqa: train.py, language_model.py, base_model.py)."""

import copy

import pytest
import torch

import ban
from ban import configs
from ban.model import BANConfig


def release_lrs(base, epochs):
    """train.py: warm-up for epochs 0-3, then x0.25 at each epoch in range(10, 20, 2)."""
    warmup = [0.5 * base, 1.0 * base, 1.5 * base, 2.0 * base]
    lr, out = base, []
    for epoch in range(epochs):
        if epoch < len(warmup):
            lr = warmup[epoch]
        elif epoch in range(10, 20, 2):
            lr *= 0.25
        out.append(lr)
    return out


@pytest.mark.parametrize("eval_split", ["val2014", None])
def test_paper_preset_decays_at_every_second_epoch_from_10(eval_split):
    config = configs.override(configs.recipe("vqa-paper"), {"eval_split": eval_split})
    base = 1e-3 if eval_split else 7e-4
    for epochs in (13, 20, 25):  # past 13 epochs too: 14, 16 and 18 decay as well
        ours = [configs.lr_at(config, e) for e in range(epochs)]
        assert ours == pytest.approx(release_lrs(base, epochs), rel=1e-12)
    assert configs.lr_at(config, 14) == pytest.approx(2 * base * 0.25**3)


def _tiny(**overrides):
    values = dict(vocab_size=30, embedding_dim=8, tfidf_embedding=True, hidden=16, glimpses=2,
                  num_answers=7, visual_dim=12)  # fmt: skip
    return BANConfig(**{**values, **overrides})


def test_c_embedding_without_tfidf_is_a_frozen_copy_of_glove():
    # language_model.py: `emb_` is created frozen and holds the GloVe init unless a tf-idf
    # matrix is given (then it is T @ GloVe and trainable)
    model = ban.build(_tiny())
    glove = torch.randn(30, 8)
    model.init_embeddings(glove=glove)
    assert torch.equal(model.embedding.tfidf.weight[:30], glove)
    assert torch.all(model.embedding.tfidf.weight[30] == 0)
    assert not model.embedding.tfidf.weight.requires_grad
    assert model.embedding.words.weight.requires_grad
    # a training step (the engine optimises the parameters that require grad) leaves it as is
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adamax(params, lr=0.1)
    v = torch.rand(2, 12, 12)
    b = torch.rand(2, 12, 6)
    q = torch.randint(0, 30, (2, 14))
    model(v, b, q).logits.sum().backward()
    optimizer.step()
    assert torch.equal(model.embedding.tfidf.weight[:30], glove)
    assert model.embedding.words.weight.grad is not None

    with_tfidf = ban.build(_tiny())
    tfidf = torch.randn(30, 8)
    with_tfidf.init_embeddings(glove=glove, tfidf=tfidf)
    assert torch.equal(with_tfidf.embedding.tfidf.weight[:30], tfidf)
    assert with_tfidf.embedding.tfidf.weight.requires_grad


def _grounding(release_entity_mask):
    config = _tiny(tfidf_embedding=False, glimpses=1, counter=False, task="grounding",
                   num_answers=1, release_entity_mask=release_entity_mask)  # fmt: skip
    torch.manual_seed(0)
    return ban.build(config).eval()


def test_grounding_entity_mask_at_position_zero_under_compat():
    # base_model.py BanModel_flickr: mask = (e == 0), except column 0, set to -99 on `.data`
    plain, compat = _grounding(False), _grounding(True)
    compat.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    v = torch.rand(2, 5, 12)
    v[1, 4:] = 0  # a padded box
    q = torch.randint(0, 30, (2, 10))
    positions = torch.tensor([[0, 3, 0, 5], [2, 0, 7, 0]])
    expected = plain(v, q, positions).detach().clone()  # [B, E, N]
    hit = (positions == 0).clone()
    hit[:, 0] = False
    expected[hit] = -99.0
    scores = compat(v, q, positions)
    torch.testing.assert_close(scores, expected)
    assert scores[0, 0].ne(-99).all() and scores[1, 1].eq(-99).all()
    assert scores[1, 0, 4] == -99  # the padded box, as before
    # only the values change: the gradient reaches the masked columns' logits as in the release
    grad_plain = torch.autograd.grad(
        plain(v, q, positions)[0, 2].sum(), plain.attention.parameters()
    )
    grad_compat = torch.autograd.grad(scores[0, 2].sum(), compat.attention.parameters())
    for a, b in zip(grad_plain, grad_compat, strict=True):
        torch.testing.assert_close(a, b)


def test_grounding_entity_mask_is_off_by_default():
    model = _grounding(False)
    scores = model(torch.rand(1, 4, 12), torch.randint(0, 30, (1, 6)), torch.tensor([[0, 0]]))
    assert scores.ne(-99).all()
    assert copy.deepcopy(BANConfig()).release_entity_mask is False
