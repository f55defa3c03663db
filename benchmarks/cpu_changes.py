"""Each CPU-side speed change against its previous form, interleaved in one process.

    python benchmarks/cpu_changes.py [--rounds 4] [--steps 3] [--batch 32] [--preset ban-8-vqa]
    python benchmarks/cpu_changes.py --preset ban-small --batch 128 --steps 10   # the CPU default
    python benchmarks/cpu_changes.py --preset ban-small --set glimpses=4 --set counter=true ...
    python benchmarks/cpu_changes.py --only "attention logits"
    python benchmarks/cpu_changes.py --loading DATA   # change 9: VQA batches of a prepared DATA

At the paper's size (batch 32, fp32) unless told, one model and batch. For each change the
previous form is put back by replacing one function, the two alternate round by round, and the
script prints the median seconds of a training step (and of an inference pass) of each, and
their ratio:

- dropout: `ban.layers.Dropout` draws its CPU mask as `rand >= p`; before, torch's dropout
  (its CPU Bernoulli sampler);
- weight norm: `ban.layers.weight_norm` has its own backward (three passes over v); before,
  autograd's backward of `v * (g / v.norm())`;
- token states: `BAN.encode_question` returns contiguous GRU states; before, the batch-first
  GRU's time-major view, on which every linear layer runs as B small products;
- attention logits: on CPU, the bilinear logits (Eq. 4) have their own backward
  (`ban.layers._FoldedLogits`); before, autograd's backward of the broadcast product and the
  batched matmul (`ban.layers._folded_logits`, the form still used on GPUs);
- counter maps: the counter's piecewise-linear maps (`ban.counting._SegmentMap`) take their
  segment by truncation instead of `floor`, read their tables with `torch.take` and sum the
  weights' gradient in the input's dtype; before, `floor`, advanced indexing and float64 sums;
- counter pairs: `Counter._count` computes the symmetric box similarity for the pairs i < j only;
  before, the release's full m x m form (its largest tensor, [B, m, m, m], twice the work).

`--loading DATA` times, instead, the making of training batches from a prepared data directory
(features in memory, batches of `--batch`, in this process as the engine's default loader does):
`VQADataset.__getitem__` builds its target and token tensors with numpy and `collate` stacks
images with equal box counts; before, torch's indexing on small tensors and a copy per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from model_speed import infer_fn, make_batch, train_step_fn  # noqa: E402

import ban  # noqa: E402
from ban import configs, counting, layers  # noqa: E402
from ban.data import vqa as vqa_data  # noqa: E402
from ban.model import BAN  # noqa: E402
from ban.tasks import vqa  # noqa: E402


def _states_as_view(self, q, check_values=True):
    states, _ = self.question_encoder(self.embedding(q))
    return states


class _SegmentMapBefore(torch.autograd.Function):
    """`ban.counting._SegmentMap` before change 10: `floor` for the segment, advanced indexing
    for the tables, the weights' gradient summed in float64."""

    @staticmethod
    def forward(ctx, x, w):
        pieces = w.numel() - 1
        y = x.clamp(0, 1) * pieces
        k = y.floor().nan_to_num(0.0).clamp(max=pieces - 1)
        frac = y - k
        k = k.long()
        cumulative = w.cumsum(0) - w[0]
        ctx.save_for_backward(x, w, k, frac)
        return cumulative[k] + frac * w[k + 1]

    @staticmethod
    def backward(ctx, grad):
        x, w, k, frac = ctx.saved_tensors
        pieces = w.numel() - 1
        inside = (x >= 0) & (x <= 1)
        grad_x = torch.where(inside, grad * (pieces * w[k + 1]), torch.zeros_like(grad))
        flat_k = k.reshape(-1)
        whole = torch.bincount(flat_k, weights=grad.reshape(-1).double(), minlength=pieces)
        part = torch.bincount(flat_k, weights=(grad * frac).reshape(-1).double(), minlength=pieces)
        grad_w = torch.zeros(pieces + 1, dtype=torch.float64, device=w.device)
        grad_w[1:] = whole.flip(0).cumsum(0).flip(0) - whole + part
        return grad_x, grad_w.to(w.dtype)


def _count_before(self, boxes, attention):
    """`Counter._count` before change 10: every m x m similarity (the release's form)."""
    attention, index = attention.topk(self.objects, dim=1)
    boxes = boxes.gather(2, index.unsqueeze(1).expand(-1, boxes.shape[1], -1))
    attention = torch.sigmoid(attention)
    relevancy = counting.outer_product(attention)
    distance = 1 - counting.iou(boxes, boxes)
    score = self.f[0](relevancy) * self.f[1](distance)
    dedup_score = self.f[3](relevancy) * self.f[4](distance)

    def outer_diff(x):
        return (x.unsqueeze(-1) - x.unsqueeze(-2)).abs()

    similarity = self.f[2](1 - outer_diff(dedup_score)).prod(dim=1) * self.f[2](
        1 - outer_diff(attention)
    )
    row_similarity = similarity.sum(dim=2)
    score = score / counting.outer_product(row_similarity)
    correction = self.f[0](attention * attention) / row_similarity
    count = (score.sum(dim=(1, 2)) + correction.sum(dim=1) + 1e-20).sqrt()
    attention_confidence = (self.f[5](attention) - 0.5).abs().mean(dim=1)
    distance_confidence = (self.f[6](distance) - 0.5).abs().mean(dim=(1, 2))
    return count, self.f[7](attention_confidence + distance_confidence)


CHANGES = {  # name: (the object, the attribute, its previous form)
    "dropout": (layers.Dropout, "forward", nn.Dropout.forward),
    "weight norm": (layers, "weight_norm", lambda v, g: v * (g / v.norm())),
    "token states": (BAN, "encode_question", _states_as_view),
    "attention logits": (layers, "_FoldedLogits", SimpleNamespace(apply=layers._folded_logits)),
    "counter maps": (counting, "_SegmentMap", _SegmentMapBefore),
    "counter pairs": (counting.Counter, "_count", _count_before),
}


def _item_before(self, index):
    """`VQADataset.__getitem__` before change 9: torch tensors built from Python lists."""
    entries = self.entries
    image_id = entries.get(index, "image_id")
    features, spatials = self.stores[self._store_of[index]][image_id]
    item = {
        "features": torch.from_numpy(features),
        "spatials": torch.from_numpy(spatials),
        "question": torch.tensor(entries.get(index, "tokens"), dtype=torch.int64),
        "question_id": entries.get(index, "question_id"),
        "image_id": image_id,
        "answer_type": entries.get(index, "answer_type"),
        "question_type": entries.get(index, "question_type"),
    }
    if self.has_target:
        target = torch.zeros(len(self.answers), dtype=torch.float32)
        labels = entries.get(index, "labels")
        if labels:
            scores = entries.get(index, "scores")
            target[torch.tensor(labels)] = torch.tensor(scores, dtype=torch.float32)
        item["target"] = target
    return item


def _collate_before(samples):
    """`collate` before change 9: a copy into the padded batch for every image."""
    n = max(s["features"].shape[0] for s in samples)
    b, dv = len(samples), samples[0]["features"].shape[1]
    features = torch.zeros(b, n, dv)
    spatials = torch.zeros(b, n, samples[0]["spatials"].shape[1])
    box_mask = torch.zeros(b, n, dtype=torch.bool)
    for i, s in enumerate(samples):
        k = s["features"].shape[0]
        features[i, :k], spatials[i, :k], box_mask[i, :k] = s["features"], s["spatials"], True
    return vqa_data._batch(samples, features, spatials, box_mask)


_item_now = vqa_data.VQADataset.__getitem__


def loading(data: str, batch: int, rounds: int, steps: int) -> None:
    """Change 9: seconds to make a training batch, before and after, alternated."""
    dataset = vqa.open_split(data, "train2014", in_memory=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = iter(range(0, len(order) - batch, batch))

    def make(item, collate):
        def one():
            start = next(batches)
            return collate([item(dataset, i) for i in order[start : start + batch]])

        return one

    seconds = {False: [], True: []}
    for _ in range(rounds):
        seconds[False] += timed_calls(make(_item_before, _collate_before), steps)
        seconds[True] += timed_calls(make(_item_now, vqa_data.collate), steps)
    before, after = (statistics.median(seconds[k]) for k in (False, True))
    print(f"loading, batch {batch}, in memory; median seconds over {rounds * steps} batches")
    print(f"{'change':<18}{'before':>14}{'after':>13}{'x':>6}")
    print(f"{'batches':<18}{before:>14.4f}{after:>13.4f}{before / after:>6.2f}")


def timed_calls(fn, steps):
    """The seconds of `steps` calls of `fn`, after one untimed call (after each switch)."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--preset", default="ban-8-vqa", help="model preset (ban-8-vqa)")
    parser.add_argument("--only", nargs="+", choices=list(CHANGES), help="these changes alone")
    parser.add_argument("--loading", metavar="DATA", help="time change 9 on prepared DATA")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a model setting over the preset's: --set counter=true (the counter rows need it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.loading:
        loading(args.loading, args.batch, args.rounds, max(args.steps, 10))
        return
    torch.manual_seed(0)
    overrides = {"vocab_size": 20000} if args.preset == "ban-8-vqa" else {}
    overrides.update(configs.parse_settings(args.set))
    config = ban.preset(args.preset, **overrides)
    model = ban.BAN(config)
    inputs = make_batch(config, args.batch, 36, torch.device("cpu"))
    train = train_step_fn(model, torch.optim.Adamax(model.parameters(), lr=1e-4), inputs, None)
    infer = infer_fn(model, inputs, None)
    print(f"{args.preset}, batch {args.batch}, fp32, {torch.get_num_threads()} threads; "
          f"median seconds over {args.rounds * args.steps} calls")  # fmt: skip
    print(f"{'change':<18}{'train before':>14}{'train after':>13}{'x':>6}"
          f"{'infer before':>14}{'infer after':>13}{'x':>6}")  # fmt: skip
    for name, (owner, attribute, previous) in CHANGES.items():
        if args.only and name not in args.only:
            continue
        if owner in (counting, counting.Counter) and not config.counter:
            print(f"{name:<18}skipped: the model has no counter (--set counter=true)")
            continue
        current = getattr(owner, attribute)
        seconds = {("train", False): [], ("train", True): [], ("infer", False): [],
                   ("infer", True): []}  # fmt: skip
        try:
            for _ in range(args.rounds):
                for now in (False, True):
                    setattr(owner, attribute, current if now else previous)
                    model.train()
                    seconds["train", now] += timed_calls(train, args.steps)
                    model.eval()
                    seconds["infer", now] += timed_calls(infer, args.steps)
        finally:
            setattr(owner, attribute, current)
        m = {key: statistics.median(values) for key, values in seconds.items()}
        print(f"{name:<18}{m['train', False]:>14.3f}{m['train', True]:>13.3f}"
              f"{m['train', False] / m['train', True]:>6.2f}{m['infer', False]:>14.3f}"
              f"{m['infer', True]:>13.3f}{m['infer', False] / m['infer', True]:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
