"""The counting module's toy task (Zhang, Hare and Prugel-Bennett, ICLR 2018, section 5).

    python benchmarks/counting_toy.py                      # default sweeps, CPU, a few minutes
    python benchmarks/counting_toy.py --points 11 --steps 1000 --batch 1024   # the paper's size

Each example has 10 square proposals of side l at uniformly random positions inside the unit
square. The true count c is uniform in 0..10 and the first c proposals are the objects. The
attention on a proposal is its largest IoU with a true box (1 for the objects themselves, 0 for
every proposal when c = 0), mixed with uniform noise of weight q: a = (1 - q) a + q U(0, 1). The
task is 11-way classification of c.

Two models are trained on the same batches with Adam and cross-entropy:
  * counter:  `ban.counting.Counter` -> a linear layer to 11 logits;
  * baseline: the sum of the attention weights as the same soft one-hot (`Counter.to_one_hot`,
    2.75 -> 0.25 at 2 and 0.75 at 3) -> a linear layer to 11 logits.
Both linear layers start at the identity, as in the original toy code.

`ban.counting.Counter` takes attention logits and applies a sigmoid itself, whereas the toy's
attention is a probability. We feed logit(p) = log(p / (1 - p)) with p clamped to
[1e-6, 1 - 1e-6], so the counter sees p again (up to float32 rounding).

The sweeps vary l with q = 0 (easy) and q = 0.5 (hard), and q with l ~ 0 (easy) and l = 0.5
(hard). l = 0 itself gives zero-area boxes whose IoU is undefined (the counter's IoU would be 0
even for a box with itself), so the smallest side is `--min-side` (0.01). Prints a table of test
accuracies and writes a PNG plot of accuracy against l and against q.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ban.counting import Counter

PROPOSALS = 10
LOGIT_EPS = 1e-6


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes `[B, n, 4]` and `[B, k, 4]` (x1, y1, x2, y2) -> `[B, n, k]`."""
    top_left = torch.max(a[:, :, None, :2], b[:, None, :, :2])
    bottom_right = torch.min(a[:, :, None, 2:], b[:, None, :, 2:])
    sides = (bottom_right - top_left).clamp(min=0)
    inter = sides[..., 0] * sides[..., 1]
    area_a = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]))[:, :, None]
    area_b = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[:, None, :]
    return inter / (area_a + area_b - inter)


def make_batch(
    batch: int, side: float, noise: float, generator: torch.Generator, proposals: int = PROPOSALS
):
    """One batch of the toy task.

    Returns boxes `[B, 4, N]` (x1, y1, x2, y2 in [0, 1]), attention probabilities `[B, N]` in
    [0, 1] and counts `[B]` (int64, uniform in 0..N); proposals 0..c-1 are the true objects.
    """
    if not 0 < side <= 1:
        raise ValueError(f"side must be in (0, 1], got {side}")
    corner = torch.rand(batch, proposals, 2, generator=generator) * (1 - side)
    boxes = torch.cat([corner, corner + side], dim=2)  # [B, N, 4]
    counts = torch.randint(0, proposals + 1, (batch,), generator=generator)
    overlap = box_iou(boxes, boxes)  # [B, N, N]
    is_object = torch.arange(proposals)[None, :] < counts[:, None]  # [B, N]
    overlap = overlap.masked_fill(~is_object[:, None, :], 0)
    attention = overlap.max(dim=2).values
    attention[is_object] = 1.0  # a box's IoU with itself (exact, whatever the rounding)
    uniform = torch.rand(batch, proposals, generator=generator)
    attention = (1 - noise) * attention + noise * uniform
    return boxes.transpose(1, 2).contiguous(), attention, counts


def to_logits(attention: torch.Tensor) -> torch.Tensor:
    """Probabilities -> logits for `Counter`, which applies a sigmoid itself."""
    p = attention.clamp(LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.log(p) - torch.log1p(-p)


class CounterModel(nn.Module):
    """`Counter` -> linear layer to `objects + 1` logits."""

    def __init__(self, objects: int = PROPOSALS):
        super().__init__()
        self.counter = Counter(objects)
        self.classifier = nn.Linear(objects + 1, objects + 1)
        nn.init.eye_(self.classifier.weight)

    def forward(self, boxes: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.counter(boxes, to_logits(attention)))


class BaselineModel(nn.Module):
    """Sum of attention as a soft one-hot (`Counter.to_one_hot`) -> linear layer."""

    def __init__(self, objects: int = PROPOSALS):
        super().__init__()
        self.counter = Counter(objects)  # only for `to_one_hot`; it has no parameters there
        self.classifier = nn.Linear(objects + 1, objects + 1)
        nn.init.eye_(self.classifier.weight)

    def forward(self, boxes: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.counter.to_one_hot(attention.sum(dim=1)))


def train_and_evaluate(
    side: float,
    noise: float,
    steps: int,
    batch: int,
    lr: float,
    test_examples: int,
    seed: int,
) -> dict[str, float]:
    """Trains both models on the same batches; returns their test accuracies."""
    torch.manual_seed(seed)
    models = {"counter": CounterModel(), "baseline": BaselineModel()}
    optimizers = {
        name: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
        for name, m in models.items()
    }
    train_gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        boxes, attention, counts = make_batch(batch, side, noise, train_gen)
        for name, model in models.items():
            loss = F.cross_entropy(model(boxes, attention), counts)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    test_gen = torch.Generator().manual_seed(seed + 1_000_003)
    boxes, attention, counts = make_batch(test_examples, side, noise, test_gen)
    accuracy = {}
    with torch.no_grad():
        for name, model in models.items():
            predicted = model(boxes, attention).argmax(dim=1)
            accuracy[name] = (predicted == counts).float().mean().item()
    return accuracy


def sweep_settings(points: int, min_side: float):
    """(sweep name, setting, swept values, [(side, noise)]) for the four curves."""
    grid = torch.linspace(0, 1, points).tolist()
    sides = [max(x, min_side) for x in grid]
    return [
        ("l", "easy (q = 0)", sides, [(x, 0.0) for x in sides]),
        ("l", "hard (q = 0.5)", sides, [(x, 0.5) for x in sides]),
        ("q", f"easy (l = {min_side:g})", grid, [(min_side, x) for x in grid]),
        ("q", "hard (l = 0.5)", grid, [(0.5, x) for x in grid]),
    ]


def plot(results, settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, swept in zip(axes, ("l", "q"), strict=True):
        for _, setting, values, configs in (s for s in settings if s[0] == swept):
            style = "-" if setting.startswith("easy") else "--"
            for name, colour in (("counter", "tab:blue"), ("baseline", "tab:orange")):
                accs = [results[c][name] for c in configs]
                ax.plot(values, accs, style, color=colour, marker=".", label=f"{name}, {setting}")
        ax.set_xlabel(swept)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("Counting toy task: counter vs sum-of-attention baseline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=6, help="values per sweep, over [0, 1]")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--test-examples", type=int, default=10000)
    parser.add_argument("--min-side", type=float, default=0.01, help="l used in place of 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("counting_toy.png"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    settings = sweep_settings(args.points, args.min_side)
    configs = sorted({c for s in settings for c in s[3]})
    results = {}
    start = time.perf_counter()
    for i, (side, noise) in enumerate(configs):
        results[(side, noise)] = train_and_evaluate(
            side, noise, args.steps, args.batch, args.lr, args.test_examples, args.seed + i
        )
        acc = results[(side, noise)]
        print(
            f"[{time.perf_counter() - start:6.1f}s] l={side:.2f} q={noise:.2f} "
            f"counter {acc['counter']:.3f} baseline {acc['baseline']:.3f}",
            flush=True,
        )

    print()
    for swept, setting, values, cfgs in settings:
        print(f"sweep of {swept}, {setting}")
        print(f"| {swept} | counter | baseline |")
        print("|---|---|---|")
        for v, c in zip(values, cfgs, strict=True):
            print(f"| {v:.2f} | {results[c]['counter']:.3f} | {results[c]['baseline']:.3f} |")
        print()
    plot(results, settings, args.plot)
    print(f"plot written to {args.plot}; {time.perf_counter() - start:.0f}s in all")


if __name__ == "__main__":
    main()
