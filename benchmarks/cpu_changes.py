"""Each CPU-side speed change against its previous form, interleaved in one process.

    python benchmarks/cpu_changes.py [--rounds 4] [--steps 3] [--batch 32] [--preset ban-8-vqa]
    python benchmarks/cpu_changes.py --preset ban-small --batch 128 --steps 10   # the CPU default
    python benchmarks/cpu_changes.py --only "attention logits"

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
  batched matmul (`ban.layers._folded_logits`, the form still used on GPUs).
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
from ban import layers  # noqa: E402
from ban.model import BAN  # noqa: E402


def _states_as_view(self, q, check_values=True):
    states, _ = self.question_encoder(self.embedding(q))
    return states


CHANGES = {  # name: (the object, the attribute, its previous form)
    "dropout": (layers.Dropout, "forward", nn.Dropout.forward),
    "weight norm": (layers, "weight_norm", lambda v, g: v * (g / v.norm())),
    "token states": (BAN, "encode_question", _states_as_view),
    "attention logits": (layers, "_FoldedLogits", SimpleNamespace(apply=layers._folded_logits)),
}


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
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    vocabulary = {"vocab_size": 20000} if args.preset == "ban-8-vqa" else {}
    config = ban.preset(args.preset, **vocabulary)
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
