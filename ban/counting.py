"""The counting module of Zhang, Hare and Prugel-Bennett, "Learning to Count Objects in Natural
Images for Visual Question Answering", ICLR 2018, as used by BAN.

From attention weights over boxes and the boxes themselves it builds a graph of relevant boxes,
removes intra-object duplicates (the same object seen by overlapping boxes) and inter-object
duplicates, and turns the resulting real-valued count into a soft one-hot vector over 0..objects
scaled by a learned confidence. All learned parts are 16 monotone piecewise-linear maps f_0..f_15
of [0, 1] onto [0, 1] (only f_0..f_7 are used; the rest exist as in the original, for checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn


class PiecewiseLinear(nn.Module):
    """A monotone increasing piecewise-linear map of [0, 1] with f(0) = 0 and f(1) = 1.

    `pieces` equal segments; the slope of each is a learned non-negative weight (|w|, normalised
    to sum to 1). Weight 0 is fixed at zero (its gradient through |.| at 0 is zero).
    """

    def __init__(self, pieces: int = 16):
        super().__init__()
        self.pieces = pieces
        weight = torch.ones(pieces + 1)
        weight[0] = 0
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.abs()
        w = (w / w.sum()).to(x.dtype)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return _SegmentMap.apply(x, w)
        return dense_map(x, w)  # on a GPU, and under torch.compile (which fuses it)


def dense_map(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """f(x) = sum_k w_k * (the covered fraction of segment k), for x in [0, 1]: equal to the
    original's cumulative-sum-and-gather form, but dense, so that on a GPU its backward pass is a
    reduction rather than millions of scattered additions onto 17 weights. `w`: the normalised
    weights [pieces + 1], w[0] = 0."""
    pieces = w.numel() - 1
    starts = torch.arange(pieces, device=x.device, dtype=x.dtype)
    covered = (pieces * x.unsqueeze(-1) - starts).clamp(0, 1)  # [..., pieces]
    return covered @ w[1:]


class _SegmentMap(torch.autograd.Function):
    """`dense_map` computed at each input's segment k only (the original's form): f(x) =
    (w_1 + ... + w_k) + frac * w_{k+1}, with k = floor(pieces * x). On a CPU this costs a few
    operations per input instead of `pieces`; the weights' gradient is two 16-bin sums
    (`bincount`), which a CPU adds fast and a GPU would serialise, hence `dense_map` there.
    Inputs outside [0, 1] are clamped (f = 0 below, 1 above, no gradient), as in `dense_map`.

    Written for speed (the counter's largest map sees 1,000 inputs per image and glimpse):
    k by truncation (it is floor on the clamped, non-negative input; `floor` costs 6x more), the
    17-entry tables read with `torch.take`, and the weights' gradient summed in the input's
    dtype, as autograd's gather backward does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        pieces = w.numel() - 1
        y = x.clamp(0, 1).mul_(pieces)
        # A NaN input converts to some integer: the clamp keeps its segment in range, and its
        # fraction (NaN - k) makes f NaN, as the dense form gives.
        k = y.long().clamp_(0, pieces - 1)
        frac = y.sub_(k)
        cumulative = w.cumsum(0) - w[0]  # w_1 + ... + w_k: w_0 takes no part, as in dense_map
        slope = w[1:]  # w_{k+1}
        ctx.save_for_backward(x, w, k, frac)
        return torch.take(cumulative, k).addcmul_(frac, torch.take(slope, k))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, k, frac = ctx.saved_tensors
        pieces = w.numel() - 1
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            inside = x.clamp(0, 1) == x  # False outside [0, 1] and for NaN
            slope = torch.take(w[1:] * pieces, k)
            grad_x = torch.where(inside, grad * slope, 0.0)
        if ctx.needs_input_grad[1]:
            # d f / d w_j = 1 for j <= k, frac for j = k + 1: per segment, the sums of grad and of
            # grad * frac; w_j collects the first over segments k >= j and the second at k = j-1.
            flat_k = k.reshape(-1)
            grad = grad.to(frac.dtype).reshape(-1)
            whole = torch.bincount(flat_k, weights=grad, minlength=pieces)
            part = torch.bincount(flat_k, weights=grad * frac.reshape(-1), minlength=pieces)
            grad_w = torch.zeros(pieces + 1, dtype=whole.dtype, device=w.device)
            grad_w[1:] = whole.flip(0).cumsum(0).flip(0) - whole + part
            grad_w = grad_w.to(w.dtype)
        return grad_x, grad_w


class Counter(nn.Module):
    """Counting component: `count = Counter(boxes, attention)`.

    Args:
        objects: how many top-attended boxes are considered (10 in BAN); also the largest count.
    Input:
        boxes: `[B, 4, N]` x1, y1, x2, y2 (normalised), N >= objects.
        attention: `[B, N]` attention logits (sigmoid is applied here); padded boxes -inf.
    Output:
        `[B, objects + 1]` soft one-hot count scaled by confidence.
    """

    def __init__(self, objects: int = 10):
        super().__init__()
        self.objects = objects
        self.f = nn.ModuleList(PiecewiseLinear(16) for _ in range(16))
        for unused in self.f[8:]:  # kept for the release's checkpoints; never trained
            unused.weight.requires_grad_(False)

    def forward(self, boxes: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        count, confidence = self.count(boxes, attention)
        one_hot = self.to_one_hot(count) * confidence.unsqueeze(1)
        return one_hot.to(attention.dtype)

    def count(self, boxes: torch.Tensor, attention: torch.Tensor):
        """The real-valued count `[B]` and its confidence `[B]` (inputs as for `forward`).

        Computed in fp32 (or wider), also under autocast: the maps cut [0, 1] into 16 segments,
        and in bf16 `16 x - k` keeps as few as 4 bits of the position within a segment (the
        count's error, docs/performance.md). In fp32 the counter costs the same: it is small.
        """
        if attention.shape[1] < self.objects:
            raise ValueError(
                f"the counter needs at least {self.objects} boxes per image, got "
                f"{attention.shape[1]}; pad the boxes (zero features) up to {self.objects}"
            )
        dtype = torch.float64 if attention.dtype == torch.float64 else torch.float32
        with torch.autocast(attention.device.type, enabled=False):
            return self._count(boxes.to(dtype), attention.to(dtype))

    def _count(self, boxes: torch.Tensor, attention: torch.Tensor):
        # Only the most attended boxes matter; the others would barely change the count.
        attention, index = attention.topk(self.objects, dim=1)
        boxes = boxes.gather(2, index.unsqueeze(1).expand(-1, boxes.shape[1], -1))
        attention = torch.sigmoid(attention)  # [B, m]

        relevancy = outer_product(attention)  # A = a a^T, [B, m, m]
        distance = 1 - iou(boxes, boxes)  # D = 1 - IoU, [B, m, m]

        # Intra-object deduplication: edges between boxes of one object are removed.
        score = self.f[0](relevancy) * self.f[1](distance)

        # Inter-object deduplication: boxes whose edges look alike are the same object. The
        # similarity of boxes i and j, prod_k f_2(1 - |s_ki - s_kj|) * f_2(1 - |a_i - a_j|), is
        # symmetric and 1 on the diagonal (f_2(1) = 1), so it is computed for the pairs i < j
        # only: 45 of the 100 entries, on the counter's largest tensor ([B, m, pairs]).
        dedup_score = self.f[3](relevancy) * self.f[4](distance)
        i, j = torch.triu_indices(self.objects, self.objects, 1, device=attention.device)
        pair_similarity = self.f[2](1 - pair_diff(dedup_score, i, j)).prod(dim=1) * self.f[2](
            1 - pair_diff(attention, i, j)
        )  # [B, pairs]
        row_similarity = 1 + torch.zeros_like(attention).index_add(1, i, pair_similarity).index_add(
            1, j, pair_similarity
        )  # sum_j similarity_ij, [B, m]
        score = score / outer_product(row_similarity)

        # The self-loops (the diagonal), then sum the graph and take the square root.
        correction = self.f[0](attention * attention) / row_similarity
        count = score.sum(dim=(1, 2)) + correction.sum(dim=1)
        count = (count + 1e-20).sqrt()  # [B]

        attention_confidence = (self.f[5](attention) - 0.5).abs().mean(dim=1)
        distance_confidence = (self.f[6](distance) - 0.5).abs().mean(dim=(1, 2))
        confidence = self.f[7](attention_confidence + distance_confidence)
        return count, confidence

    def to_one_hot(self, count: torch.Tensor) -> torch.Tensor:
        """`[B]` non-negative reals -> `[B, objects + 1]`: 2.75 -> 0.25 at 2, 0.75 at 3."""
        count = count.clamp(min=0, max=self.objects)
        floor = count.long().unsqueeze(1)
        fraction = count.frac().unsqueeze(1)
        # One-hot by comparison: F.one_hot reads its input's range first, which on a GPU waits
        # for the device (a host synchronisation in every step).
        values = torch.arange(self.objects + 1, device=count.device)
        below = (values == floor).to(count.dtype)
        above = (values == (floor + 1).clamp(max=self.objects)).to(count.dtype)
        return (1 - fraction) * below + fraction * above


def outer_product(x: torch.Tensor) -> torch.Tensor:
    """`[B, m]` -> `[B, m, m]` with x_i * x_j (also works on `[B, m, m]` -> `[B, m, m, m]`)."""
    return x.unsqueeze(-1) * x.unsqueeze(-2)


def pair_diff(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """|x_i - x_j| over the last dimension for the pairs (i, j): `[..., m]` -> `[..., pairs]`."""
    return (x.index_select(-1, i) - x.index_select(-1, j)).abs()


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes `[B, 4, m]` and `[B, 4, k]` (x1, y1, x2, y2) -> `[B, m, k]`."""
    top_left = torch.max(a[:, :2, :, None], b[:, :2, None, :])
    bottom_right = torch.min(a[:, 2:, :, None], b[:, 2:, None, :])
    sides = (bottom_right - top_left).clamp(min=0)
    intersection = sides[:, 0] * sides[:, 1]
    area_a = area(a).unsqueeze(2)
    area_b = area(b).unsqueeze(1)
    return intersection / (area_a + area_b - intersection + 1e-12)


def area(boxes: torch.Tensor) -> torch.Tensor:
    """`[B, 4, m]` -> `[B, m]`."""
    width = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    height = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return width * height
