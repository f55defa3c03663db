"""The layers against naive loops over the paper's equations."""

import pytest
import torch

from ban.layers import (
    BilinearAttentionMap,
    BilinearPooling,
    Dropout,
    FCNet,
    WeightNormLinear,
    _folded_logits,
    _FoldedLogits,
    weight_norm,
)


def test_weight_norm_has_one_scalar_gain():
    layer = WeightNormLinear(5, 3)
    assert layer.weight_g.shape == ()
    assert torch.allclose(layer.weight, layer.weight_v)  # g starts at ||v||_F
    with torch.no_grad():
        layer.weight_g.mul_(2.0)
        layer.weight_v.mul_(7.0)  # the scale of v does not matter, only g
    x = torch.randn(4, 5)
    v = layer.weight_v
    expected = x @ (layer.weight_g * v / torch.sqrt((v**2).sum())).t() + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.weight.norm(), layer.weight_g)


def test_fcnet_order_is_dropout_linear_relu():
    net = FCNet(4, 6, relu=True, dropout=0.5).train()
    x = torch.randn(3, 4)
    torch.manual_seed(0)
    got = net(x)
    torch.manual_seed(0)
    assert torch.equal(got, torch.relu(net.linear(Dropout(0.5)(x))))  # dropout on the input
    torch.manual_seed(0)
    assert not torch.equal(got, Dropout(0.5)(torch.relu(net.linear(x))))
    assert torch.equal(net.eval()(x), torch.relu(net.linear(x)))  # no dropout in eval
    assert FCNet(4, 6, relu=False)(x).min() < 0


def test_weight_norm_gradient_matches_autograd_of_the_formula():
    v = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weight_norm, (v, g))
    grad = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.autograd.grad((v * (g / v.norm()) * grad).sum(), (v, g))
    got = torch.autograd.grad((weight_norm(v, g) * grad).sum(), (v, g))
    torch.testing.assert_close(got, expected)


def test_cpu_dropout_keeps_1_minus_p_scaled_and_is_seeded():
    layer, x = Dropout(0.2), torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # 200,000 draws: sd 0.0009
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)  # gradient through the kept entries
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)  # the seed fixes the mask
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def _naive_attention(layer, v, q, box_mask):
    """Eq. 3-4 written as loops over glimpses, boxes and tokens."""
    v_ = torch.relu(layer.v_net.linear(v))
    q_ = torch.relu(layer.q_net.linear(q))
    B, N, T, G = v.shape[0], v.shape[1], q.shape[1], layer.glimpses
    logits = torch.empty(B, G, N, T)
    for b in range(B):
        for g in range(G):
            for n in range(N):
                for t in range(T):
                    logits[b, g, n, t] = (
                        layer.h_mat[g] * v_[b, n] * q_[b, t]
                    ).sum() + layer.h_bias[g]
    logits[~box_mask[:, None, :, None].expand_as(logits)] = float("-inf")
    maps = torch.empty_like(logits)
    for b in range(B):
        for g in range(G):
            e = torch.exp(logits[b, g] - logits[b, g].max())
            maps[b, g] = e / e.sum()  # one softmax over the joint N x T grid
    return maps, logits


def test_attention_map_matches_the_equations():
    torch.manual_seed(0)
    layer = BilinearAttentionMap(6, 5, hidden=4, glimpses=3, rank=3).eval()
    v, q = torch.randn(2, 7, 6), torch.randn(2, 4, 5)
    box_mask = torch.ones(2, 7, dtype=torch.bool)
    box_mask[1, 5:] = False
    maps, logits = layer(v, q, box_mask)
    naive_maps, naive_logits = _naive_attention(layer, v, q, box_mask)
    assert maps.shape == logits.shape == (2, 3, 7, 4)
    assert torch.allclose(logits, naive_logits, atol=1e-5)
    assert torch.allclose(maps, naive_maps, atol=1e-6)
    assert torch.all(maps[1, :, 5:] == 0)  # padded boxes: exactly zero attention
    assert torch.allclose(maps.sum(dim=(2, 3)), torch.ones(2, 3))


def test_cpu_attention_logits_backward_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    v_ = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    q_ = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_FoldedLogits.apply, (v_, q_, p))
    grad = torch.randn(2, 7, 12, dtype=torch.float64)
    naive = torch.einsum("bnk,gk,btk->bngt", v_, p, q_).reshape(2, 7, 12)
    expected = torch.autograd.grad((naive * grad).sum(), (v_, q_, p))
    got = torch.autograd.grad((_FoldedLogits.apply(v_, q_, p) * grad).sum(), (v_, q_, p))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_folded_logits(v_, q_, p), naive)  # the form used on GPUs


def test_attention_trains_under_cpu_autocast():
    torch.manual_seed(0)
    layer = BilinearAttentionMap(6, 5, hidden=4, glimpses=3)
    v, q = torch.randn(2, 7, 6), torch.randn(2, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, _ = layer(v, q, torch.ones(2, 7, dtype=torch.bool))
    (maps[..., 0].float() ** 2).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


def test_question_mask_removes_padded_tokens():
    layer = BilinearAttentionMap(6, 5, hidden=4, glimpses=2).eval()
    v, q = torch.randn(1, 3, 6), torch.randn(1, 5, 5)
    question_mask = torch.tensor([[True, True, False, False, False]])
    maps, _ = layer(v, q, torch.ones(1, 3, dtype=torch.bool), question_mask)
    assert torch.all(maps[..., 2:] == 0)
    assert torch.allclose(maps.sum(dim=(2, 3)), torch.ones(1, 2))


@pytest.mark.parametrize("rank", [1, 3])
def test_pooling_matches_eq5(rank):
    torch.manual_seed(1)
    layer = BilinearPooling(6, 5, hidden=4, rank=rank).eval()
    v, q = torch.randn(2, 7, 6), torch.randn(2, 3, 5)
    attention = torch.softmax(torch.randn(2, 21), dim=1).view(2, 7, 3)
    v_ = torch.relu(layer.v_net.linear(v))
    q_ = torch.relu(layer.q_net.linear(q))
    expected = torch.zeros(2, 4 * rank)
    for b in range(2):
        for n in range(7):
            for t in range(3):
                expected[b] += v_[b, n] * attention[b, n, t] * q_[b, t]
    expected = expected.view(2, 4, rank).sum(dim=2)  # sum-pooling over groups of K
    assert torch.allclose(layer(v, q, attention), expected, atol=1e-5)


def test_inference_weight_cache_follows_updates():
    layer = WeightNormLinear(4, 3)
    x = torch.randn(2, 4)
    with torch.no_grad():
        first = layer(x)
        assert layer(x) is not first and torch.equal(layer(x), first)
        layer.weight_g.mul_(2)  # an in-place update (as an optimizer step makes) is seen
        assert torch.allclose(layer(x) - layer.bias, 2 * (first - layer.bias), atol=1e-6)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        expected = x @ (layer.weight_g * layer.weight_v / layer.weight_v.norm()).t() + layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-6)
        layer.load_state_dict({k: torch.ones_like(v) for k, v in layer.state_dict().items()})
        assert torch.allclose(layer(x), x @ (torch.ones(3, 4) / 12**0.5).t() + 1, atol=1e-6)
