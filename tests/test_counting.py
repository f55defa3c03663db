"""The counting module on hand-made scenes (its piecewise maps start as the identity)."""

import torch

from ban import counting
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


def test_segment_form_equals_the_dense_form_in_value_and_gradients():
    from ban.counting import _SegmentMap, dense_map

    torch.manual_seed(0)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        weight = torch.rand(17, dtype=dtype) * 2
        weight[0] = 0
        # inputs in [0, 1], a few outside it, and the ends (at the inner kinks j / 16 the two
        # forms take different one-sided slopes; random inputs do not land there)
        x = torch.cat(
            [
                torch.rand(3, 50, dtype=dtype),
                torch.tensor([[-0.3, 1.4, 0.0, 1.0] * 12 + [0.3, 0.7]], dtype=dtype),
            ]
        )
        grads = []
        for fn in (_SegmentMap.apply, dense_map):
            xs = x.clone().requires_grad_()
            ws = weight.clone().requires_grad_()
            w = ws.abs() / ws.abs().sum()
            out = fn(xs, w)
            (out * torch.linspace(-1, 2, out.numel(), dtype=dtype).view_as(out)).sum().backward()
            grads.append((out.detach(), xs.grad, ws.grad))
        for a, b in zip(*grads, strict=True):
            assert torch.allclose(a, b, atol=tolerance, rtol=0), (dtype, (a - b).abs().max())


def test_a_nan_input_gives_nan_not_an_error():
    f = PiecewiseLinear(16)
    y = f(torch.tensor([0.3, float("nan"), 2.0, -1.0]))
    assert y[1].isnan() and torch.allclose(y[[0, 2, 3]], torch.tensor([0.3, 1.0, 0.0]))


def _counter_with_random_maps(dtype=torch.float32) -> Counter:
    """A counter whose piecewise-linear maps are away from the identity (from torch's RNG)."""
    counter = Counter().to(dtype)
    with torch.no_grad():
        for f in counter.f:
            f.weight.copy_(torch.rand(17, dtype=dtype) + 0.1)
            f.weight[0] = 0
    return counter


def test_counter_on_cpu_equals_the_dense_counter():
    torch.manual_seed(1)
    counter = _counter_with_random_maps()
    boxes = torch.rand(4, 4, 36)
    boxes[:, 2:] += boxes[:, :2]
    attention = torch.randn(4, 36, requires_grad=True)
    results = []
    for dense in (False, True):
        counter.zero_grad()
        attention.grad = None
        if dense:  # the GPU's form, run on the CPU
            original = counting.PiecewiseLinear.forward
            counting.PiecewiseLinear.forward = lambda self, x: counting.dense_map(
                x, (self.weight.abs() / self.weight.abs().sum()).to(x.dtype)
            )
        try:
            out = counter(boxes, attention)
            (out * torch.arange(11.0)).sum().backward()
        finally:
            if dense:
                counting.PiecewiseLinear.forward = original
        results.append(
            (out.detach(), attention.grad.clone(), [f.weight.grad.clone() for f in counter.f[:8]])
        )
    (a_out, a_att, a_w), (b_out, b_att, b_w) = results
    assert torch.allclose(a_out, b_out, atol=1e-6)
    assert torch.allclose(a_att, b_att, atol=1e-5)
    for ga, gb in zip(a_w, b_w, strict=True):
        assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-4)


def test_counter_equals_the_release_counter_in_value_and_gradient():
    # The release builds every m x m similarity; ours computes the pairs i < j only (the matrix is
    # symmetric with ones on the diagonal). The same counts and attention gradients, in float64.
    from tests.release_reference import _counter

    torch.manual_seed(2)
    counter = _counter_with_random_maps(torch.float64)
    state = {f"module.counter.f.{i}.weight": f.weight for i, f in enumerate(counter.f)}
    boxes = torch.rand(6, 4, 36, dtype=torch.float64) * 0.6
    boxes[:, 2:] += boxes[:, :2] * 0.5 + 0.05  # overlapping boxes of various sizes
    attention = torch.randn(6, 36, dtype=torch.float64) * 2
    grads = []
    for count in (counter, lambda b, a: _counter(state, b, a)):
        a = attention.clone().requires_grad_()
        out = count(boxes, a)
        (out * torch.arange(11.0, dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), a.grad))
    (ours, ours_grad), (release, release_grad) = grads
    assert torch.allclose(ours, release, atol=1e-12, rtol=0)
    assert torch.allclose(ours_grad, release_grad, atol=1e-10, rtol=0)
    assert ours.sum(dim=1).max() > 0.1  # the counts are not all zero


def test_the_benchmarks_previous_counter_forms_compute_the_same():
    """benchmarks/cpu_changes.py times change 10 against frozen previous forms: they must give
    the same counts and gradients, so that its ratios compare like with like."""
    from tests import benchmark_scripts

    changes = benchmark_scripts.load("cpu_changes")
    torch.manual_seed(3)
    counter = _counter_with_random_maps()
    boxes = torch.rand(8, 4, 36) * 0.6
    boxes[:, 2:] += boxes[:, :2] * 0.5 + 0.05
    attention = torch.randn(8, 36) * 2
    results = []
    for segment_map, count in (
        (counting._SegmentMap, Counter._count),
        (changes._SegmentMapBefore, changes._count_before),
    ):
        saved = counting._SegmentMap, Counter._count
        counting._SegmentMap, Counter._count = segment_map, count
        try:
            a = attention.clone().requires_grad_()
            counter.zero_grad()
            (counter(boxes, a) * torch.arange(11.0)).sum().backward()
            results.append((a.grad, [f.weight.grad.clone() for f in counter.f[:8]]))
        finally:
            counting._SegmentMap, Counter._count = saved
    (now, now_w), (before, before_w) = results
    assert torch.allclose(now, before, atol=1e-5) and now.abs().sum() > 0
    for a, b in zip(now_w, before_w, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
