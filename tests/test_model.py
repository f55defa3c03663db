"""The full models: shapes, masking, gradients, parameter counts, input errors."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ban
from ban.model import BANConfig, count_parameters, flops_per_example


def _tiny(**overrides):
    values = dict(vocab_size=30, embedding_dim=8, tfidf_embedding=False, hidden=16, glimpses=2,
                  num_answers=7, visual_dim=12)  # fmt: skip
    return BANConfig(**{**values, **overrides})


def _batch(config, batch=3, boxes=12, tokens=14):
    torch.manual_seed(0)
    v = torch.rand(batch, boxes, config.visual_dim)
    v[0, 10:] = 0
    corners = torch.rand(batch, boxes, 2) * 0.5
    b = torch.cat([corners, corners + 0.3, torch.full((batch, boxes, 2), 0.3)], dim=2)
    q = torch.randint(0, config.vocab_size, (batch, tokens))
    q[0, 6:] = config.vocab_size
    return v, b, q


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(glimpses=1, counter=False), dict(glimpses=8, tfidf_embedding=True),
     dict(fusion="sum"), dict(fusion="concat", glimpses=3), dict(rank=1),
     dict(mask_question_padding=True)],
)  # fmt: skip
def test_shapes_and_masking(overrides):
    config = _tiny(**overrides)
    model = ban.BAN(config).eval()
    v, b, q = _batch(config)
    out = model(v, b, q)
    assert out.logits.shape == (3, 7)
    assert out.attention.shape == out.attention_logits.shape == (3, config.glimpses, 12, 14)
    assert torch.all(out.attention[0, :, 10:] == 0)  # padded boxes get exactly zero attention
    assert torch.isinf(out.attention_logits[0, :, 10:]).all()
    assert torch.allclose(out.attention.sum(dim=(2, 3)), torch.ones(3, config.glimpses))
    if config.mask_question_padding:
        assert torch.all(out.attention[0, :, :, 6:] == 0)


def test_explicit_box_mask_equals_the_zero_row_rule():
    config = _tiny()
    model = ban.BAN(config).eval()
    v, b, q = _batch(config)
    mask = v.abs().sum(dim=2) != 0
    assert torch.equal(model(v, b, q).logits, model(v, b, q, box_mask=mask).logits)


@pytest.mark.parametrize("fusion", ["residual", "sum", "concat"])
def test_every_parameter_receives_a_gradient(fusion):
    config = _tiny(fusion=fusion, tfidf_embedding=True)
    model = ban.BAN(config).train()
    v, b, q = _batch(config)
    model(v, b, q).logits.sum().backward()
    # f_8..f_15 of the counter exist only to mirror the release; it uses f_0..f_7.
    unused = {f"counter.f.{i}.weight" for i in range(8, 16)}
    for name, parameter in model.named_parameters():
        if name in unused:
            assert parameter.grad is None
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_release_parameter_counts():
    assert count_parameters(ban.BAN(ban.preset("ban-8-vqa"))) == 90_618_566
    assert count_parameters(ban.BAN(ban.preset("ban-8-ablation", glimpses=1))) == 32_198_378
    assert count_parameters(ban.BAN(ban.preset("ban-8-ablation", glimpses=4))) == 44_799_734


@pytest.mark.parametrize(
    "overrides",
    [{}, {"counter": False}, {"fusion": "concat"}, {"attention": "unitary"}, {"attention": "none"},
     {"task": "grounding", "glimpses": 1, "counter": False, "tfidf_embedding": False}],
)  # fmt: skip
def test_flops_equal_torchs_count_of_the_forward(overrides):
    """`flops_per_example` is torch's own FLOP count of one forward (FlopCounterMode: every matrix
    product, the GRU's included) plus the products the model does elementwise: per glimpse the
    fold of p_g into the question side (T x HK) and, in VQA, the row-wise dot of pooling (N x H)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = ban.preset(
        "ban-8-vqa", vocab_size=50, hidden=32, num_answers=20, visual_dim=24, **overrides
    )
    model, (n, t) = ban.build(c).eval(), (36, 14)
    v, b, q = torch.randn(1, n, 24), torch.rand(1, n, 6), torch.randint(0, 50, (1, t))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(v, q, torch.full((1, t), t - 1)) if c.task == "grounding" else model(v, b, q)
    elementwise = 0
    if c.attention == "bilinear":
        elementwise = (
            c.glimpses * t * c.hidden * c.rank + (c.task == "vqa") * c.glimpses * n * c.hidden
        )
    assert flops_per_example(c, n, t) == counter.get_total_flops() + 2 * elementwise
    if not overrides:  # the paper's size: about 2.9 GFLOPs per question
        assert flops_per_example(ban.preset("ban-8-vqa")) == 2_874_844_160


def test_dropout_is_off_in_eval_and_seeded_in_train():
    config = _tiny()
    v, b, q = _batch(config)
    torch.manual_seed(3)
    first = ban.BAN(config)
    torch.manual_seed(3)
    second = ban.BAN(config)
    assert torch.equal(first.eval()(v, b, q).logits, second.eval()(v, b, q).logits)
    first.train(), second.train()
    torch.manual_seed(5)
    a = first(v, b, q).logits
    torch.manual_seed(5)
    assert torch.equal(a, second(v, b, q).logits)
    assert not torch.equal(a, first(v, b, q).logits)


def test_grounding_model_scores_boxes_per_phrase():
    config = _tiny(glimpses=1, counter=False, task="grounding", num_answers=1)
    model = ban.build(config).eval()
    assert isinstance(model, ban.BANGrounding)
    v, _, q = _batch(config)
    scores = model(v, q, torch.tensor([[1, 4], [2, 2], [0, 13]]))
    assert scores.shape == (3, 2, 12)
    assert torch.all(scores[0, :, 10:] == -99.0) and torch.isfinite(scores).all()
    scores.sum().backward()


def test_embedding_init_and_padding_row():
    config = _tiny(tfidf_embedding=True)
    model = ban.BAN(config)
    glove, tfidf = torch.randn(30, 8), torch.randn(30, 8)
    model.init_embeddings(glove=glove, tfidf=tfidf)
    assert torch.equal(model.embedding.words.weight[:30], glove)
    assert torch.equal(model.embedding.tfidf.weight[:30], tfidf)
    assert torch.all(model.embedding.words.weight[30] == 0)
    with pytest.raises(ValueError, match="expected \\(30, 8\\)"):
        model.init_embeddings(glove=torch.randn(29, 8))


def test_bad_inputs_are_named():
    config = _tiny()
    model = ban.BAN(config).eval()
    v, b, q = _batch(config)
    with pytest.raises(ValueError, match="v must be"):
        model(v[..., :5], b, q)
    with pytest.raises(ValueError, match="b must be"):
        model(v, b[:, :3], q)
    with pytest.raises(ValueError, match="token ids must be in 0..30"):
        model(v, b, q + 100)
    with pytest.raises(ValueError, match="token ids must be integers"):
        model(v, b, q.float())
    empty = v.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"batch rows \[1\] have no boxes"):
        model(empty, b, q)


class _HostReads(TorchDispatchMode):
    """Records the operators that copy a tensor's value to the host (on a GPU: a wait)."""

    READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["bilinear", "unitary", "none"])
def test_a_step_without_value_checks_never_reads_values_on_the_host(attention):
    config = _tiny(attention=attention)  # the counter is on
    model = ban.build(config).train()
    v, b, q = _batch(config)
    with _HostReads() as host:
        model(v, b, q, check_values=False).logits.sum().backward()
    assert host.reads == []
    with _HostReads() as host:
        model(v, b, q)
    assert host.reads  # the default checks do read values
    with pytest.raises(ValueError, match="v must be"):  # shapes are always checked
        model(v[..., :5], b, q, check_values=False)


class _Operators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_token_state_projections_are_single_matrix_products():
    # A batch-first GRU returns a time-major view; on it, each linear layer would run as a
    # batched product over a broadcast weight. Only the attention logits and the G poolings
    # are batched products.
    config = _tiny(glimpses=3)
    model = ban.BAN(config).eval()
    with torch.no_grad(), _Operators() as operators:
        model(*_batch(config))
    assert operators.names.count("bmm") == 1 + config.glimpses


def test_compiles_with_graph_breaks_only_around_the_gru():
    config = _tiny(glimpses=3)
    model = ban.BAN(config).train()
    v, b, q = _batch(config)
    explanation = torch._dynamo.explain(functools.partial(model, check_values=False))(v, b, q)
    assert explanation.graph_break_count == 2
    assert all("GRU" in reason.reason for reason in explanation.break_reasons)


def test_config_validation():
    with pytest.raises(ValueError, match="fusion"):
        BANConfig(fusion="product")
    with pytest.raises(ValueError, match="glimpses"):
        BANConfig(glimpses=0)
    with pytest.raises(ValueError, match="unknown BANConfig field"):
        BANConfig.from_dict({"hidden": 3, "colour": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        ban.preset("ban-99")
    assert ban.preset("ban-8-vqa", glimpses=4).glimpses == 4
