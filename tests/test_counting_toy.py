"""The counting toy task of benchmarks/counting_toy.py: its data and a tiny training run."""

import pytest
import torch

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def toy():
    return benchmark_scripts.load("counting_toy")


def batch(toy, side=0.3, noise=0.0, seed=0, size=2000):
    return toy.make_batch(size, side, noise, torch.Generator().manual_seed(seed))


def test_shapes_and_ranges(toy):
    boxes, attention, counts = batch(toy, noise=0.5)
    assert boxes.shape == (2000, 4, 10) and attention.shape == (2000, 10)
    assert counts.shape == (2000,) and counts.dtype == torch.int64
    assert counts.min() == 0 and counts.max() == 10
    assert set(counts.tolist()) == set(range(11))  # uniform over 0..10: every count appears
    assert (attention >= 0).all() and (attention <= 1).all()
    assert (boxes >= 0).all() and (boxes <= 1).all()
    side = boxes[:, 2:] - boxes[:, :2]
    assert torch.allclose(side, torch.full_like(side, 0.3), atol=1e-6)


def test_first_count_boxes_are_the_objects(toy):
    boxes, attention, counts = batch(toy, noise=0.0)
    for b in range(200):
        c = counts[b].item()
        assert (attention[b, :c] == 1).all()
        if c == 0:
            assert (attention[b] == 0).all()
            continue
        # the others: their best IoU with the first c boxes
        iou = toy.box_iou(boxes[b : b + 1].transpose(1, 2), boxes[b : b + 1, :, :c].transpose(1, 2))
        assert torch.allclose(attention[b, c:], iou[0, c:].max(dim=1).values)


def test_noise_mixes_towards_uniform(toy):
    _, clean, _ = batch(toy, noise=0.0, seed=1)
    _, noisy, _ = batch(toy, noise=1.0, seed=1)
    assert not torch.equal(clean, noisy)
    assert abs(noisy.mean().item() - 0.5) < 0.02  # pure U(0, 1)


def test_seeded_determinism(toy):
    a = batch(toy, seed=7, noise=0.5)
    b = batch(toy, seed=7, noise=0.5)
    c = batch(toy, seed=8, noise=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_logits_round_trip(toy):
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(torch.sigmoid(toy.to_logits(p)), p, atol=1e-5)


def test_tiny_training_beats_chance(toy):
    acc = toy.train_and_evaluate(
        side=0.2, noise=0.0, steps=40, batch=64, lr=0.01, test_examples=1000, seed=0
    )
    assert acc["counter"] > 0.5 and acc["baseline"] > 0.3  # chance is 1/11
