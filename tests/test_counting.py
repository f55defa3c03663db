"""The counting module on hand-made scenes (its piecewise maps start as the identity)."""

import torch

from ban.counting import Counter, PiecewiseLinear, iou

BOXES = 12  # the counter looks at the 10 most attended


def _scene(boxes, attended):
    b = torch.zeros(1, 4, BOXES)
    for i, box in enumerate(boxes):
        b[0, :, i] = torch.tensor(box)
    attention = torch.full((1, BOXES), -50.0)  # sigmoid -> exactly 0
    attention[0, attended] = 50.0  # sigmoid -> exactly 1
    return b, attention


def _separate(k):
    return [(0.1 * i, 0.0, 0.1 * i + 0.05, 0.05) for i in range(k)]


def test_separate_boxes_count_exactly():
    counter = Counter(objects=10)
    for k in range(0, 8):
        count, _ = counter.count(*_scene(_separate(k), list(range(k))))
        assert abs(count.item() - k) < 1e-4, k


def test_a_box_and_its_duplicate_count_once():
    counter = Counter()
    duplicates = [(0.0, 0.0, 0.2, 0.2), (0.0, 0.0, 0.2, 0.2), (0.5, 0.5, 0.6, 0.6)]
    count, _ = counter.count(*_scene(duplicates[:2], [0, 1]))
    assert abs(count.item() - 1) < 1e-4
    count, _ = counter.count(*_scene(duplicates, [0, 1, 2]))
    assert abs(count.item() - 2) < 1e-4


def test_unattended_boxes_count_zero():
    count, _ = Counter().count(*_scene(_separate(6), []))
    assert count.item() < 1e-4
    out = Counter()(*_scene(_separate(6), []))
    assert out.shape == (1, 11) and out.argmax().item() == 0


def test_soft_one_hot_interpolates():
    one_hot = Counter(objects=3).to_one_hot(torch.tensor([0.0, 2.75, 3.0, 7.0]))
    expected = torch.tensor(
        [[1, 0, 0, 0], [0, 0, 0.25, 0.75], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.float
    )
    assert torch.allclose(one_hot, expected)


def test_piecewise_linear_is_monotone_with_fixed_ends():
    f = PiecewiseLinear(16)
    x = torch.linspace(0, 1, 101)
    assert torch.allclose(f(x), x, atol=1e-6)  # identity at initialisation
    with torch.no_grad():
        f.weight.copy_(torch.rand(17) * 3)
        f.weight[0] = 0
    y = f(x)
    assert y[0].item() == 0 and abs(y[-1].item() - 1) < 1e-6
    assert torch.all(y[1:] >= y[:-1])


def test_iou():
    a = torch.tensor([[[0.0, 0.5], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])  # [1, 4, 2]
    assert torch.allclose(iou(a, a), torch.tensor([[[1.0, 0.5], [0.5, 1.0]]]))


def test_needs_at_least_ten_boxes():
    import pytest

    with pytest.raises(ValueError, match="at least 10 boxes"):
        Counter()(torch.zeros(1, 4, 5), torch.zeros(1, 5))


def test_counts_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    counter = Counter()
    with torch.no_grad():
        for f in counter.f:
            f.weight.add_(torch.rand(17))
    corners = torch.rand(64, 36, 2) * 0.7
    boxes = torch.cat([corners, corners + 0.05 + torch.rand(64, 36, 2) * 0.3], 2).transpose(1, 2)
    attention = (torch.randn(64, 36) * 3).bfloat16()  # as the bf16 attention logits come
    expected = counter(boxes, attention.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        count, _ = counter.count(boxes, attention)
        out = counter(boxes, attention)
    assert count.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out, expected.bfloat16())
    # fp64 stays fp64 (a gradcheck needs it)
    assert counter.count(boxes.double(), attention.double())[0].dtype == torch.float64
