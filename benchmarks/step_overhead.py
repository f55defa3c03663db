"""What a training step costs the host, apart from arithmetic: ours against the original.

    python benchmarks/step_overhead.py                   # CPU
    python benchmarks/step_overhead.py --device cuda

On a GPU an eager step is bound by the host when the host's work per step (one Python call and
one dispatch per operator, a kernel launch for most) takes longer than the device's arithmetic;
on an H200, BAN at batch 256 does about 2.2 TFLOP per training step, under 3 ms at the bf16 peak.
This script measures the host's side on any machine, with the paper's structure (BAN-8, the
counter, 36 boxes, 14 tokens) but tiny widths, so that the arithmetic is negligible:

- operators per training step (forward, loss, backward, clipping at 0.25, Adamax with foreach as
  on CUDA), all of them and those that do work (views and allocations left out): on a GPU about
  one kernel launch each (on CPU the GRU runs as about ten operators per token and dropout as
  four; CUDA runs each as one kernel, cuDNN's GRU and fused dropout, so a GPU counts fewer);
- host reads per step: operators that copy a tensor's value to the host (`.item()`, `nonzero`,
  `bool(tensor)`) in the forward, loss, backward and clipping; on a GPU each makes the host wait
  until the device has caught up;
- graph breaks of the forward under torch.compile (torch._dynamo.explain);
- the host's time per training step and per inference batch (median milliseconds).

Rows: the original computation (benchmarks/original_ban.py), `ban.BAN` with its input checks, and
`ban.BAN` called as the engine calls it (`check_values=False`; the engine checks on the host).
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from original_ban import OriginalBAN  # noqa: E402

import ban  # noqa: E402

HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}
NO_WORK = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.all = self.work = 0
        self.host_reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.all += 1
        if not func.is_view and name not in NO_WORK and name not in HOST_READS:
            self.work += 1
        if name in HOST_READS:
            self.host_reads[name] += 1
        return func(*args, **(kwargs or {}))


def make_inputs(config, batch, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(batch, 36, config.visual_dim, generator=gen)
    corners = torch.rand(batch, 36, 2, generator=gen) * 0.6
    b = torch.cat([corners, corners + 0.3, torch.full((batch, 36, 2), 0.3)], dim=2)
    q = torch.randint(0, config.vocab_size, (batch, 14), generator=gen)
    q[:, 10:] = config.vocab_size
    target = (torch.rand(batch, config.num_answers, generator=gen) > 0.9).float()
    return [t.to(device) for t in (v, b, q, target)]


def step_fns(forward, model, optimizer, inputs):
    """`gradients` (forward, loss, backward, clipping) and `step` (those, then Adamax)."""
    v, b, q, target = inputs

    def gradients():
        logits = forward(v, b, q)
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)

    def step():
        gradients()
        optimizer.step()

    return gradients, step


def median_ms(fn, device, runs):
    times = []
    for _ in range(runs + 3):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ban.preset(
        "ban-8-vqa", vocab_size=100, embedding_dim=8, hidden=16, visual_dim=32, num_answers=50
    )
    ours = ban.BAN(config).to(device)
    original = OriginalBAN.from_ban(ours.cpu()).to(device)
    ours.to(device)
    inputs = make_inputs(config, args.batch, device)
    rows = [
        ("original", original, lambda v, b, q: original(v, b, q)[0]),
        ("ban", ours, lambda v, b, q: ours(v, b, q).logits),
        ("ban, engine", ours, lambda v, b, q: ours(v, b, q, check_values=False).logits),
    ]
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    structure = f"G {config.glimpses}, counter, 36 boxes, 14 tokens"
    print(f"paper structure ({structure}), tiny widths, batch {args.batch}")
    print(f"\n{'model':<13}{'work ops':>9}{'all ops':>9}{'host reads':>11}{'graph breaks':>13}"
          f"{'step ms':>9}{'x orig':>8}{'infer ms':>10}{'x orig':>8}")  # fmt: skip
    base = None
    for label, model, forward in rows:
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4, foreach=True)
        model.train()
        gradients, step = step_fns(forward, model, optimizer, inputs)
        step()
        with OperatorCount() as count:
            gradients()
        with OperatorCount() as optimizer_count:
            optimizer.step()
        step_ms = median_ms(step, device, args.runs)
        model.eval()
        infer = torch.no_grad()(functools.partial(forward, *inputs[:3]))
        infer_ms = median_ms(infer, device, args.runs)
        breaks = torch._dynamo.explain(forward)(*inputs[:3]).graph_break_count
        torch._dynamo.reset()
        reads = sum(count.host_reads.values())
        base = base or (step_ms, infer_ms)
        work, every = count.work + optimizer_count.work, count.all + optimizer_count.all
        print(f"{label:<13}{work:>9,}{every:>9,}{reads:>11}{breaks:>13}"
              f"{step_ms:>9.2f}{base[0] / step_ms:>8.2f}{infer_ms:>10.2f}"
              f"{base[1] / infer_ms:>8.2f}")  # fmt: skip
    print("\nx orig: the original's milliseconds over the row's (higher is faster). Host reads: "
          "in the forward, loss, backward and clipping (Adamax reads its step counters, which "
          "live on the host unless capturable: no wait for the device).")  # fmt: skip


if __name__ == "__main__":
    main()
