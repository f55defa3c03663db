"""CPU training step at the paper's size with ban's dropout against torch's, interleaved.

    python benchmarks/dropout_cpu.py [--rounds 5] [--batch 32]

`ban.layers.Dropout` draws its CPU mask as `rand >= p` instead of torch's Bernoulli sampler (the
same distribution). Both run in one process on the same model and batch, alternating rounds, and
the script prints the median seconds per training step of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from model_speed import make_batch, train_step_fn  # noqa: E402

import ban  # noqa: E402
from ban import layers  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = ban.preset("ban-8-vqa", vocab_size=20000)
    model = ban.BAN(config).train()
    inputs = make_batch(config, args.batch, 36, torch.device("cpu"))
    step = train_step_fn(model, torch.optim.Adamax(model.parameters(), lr=1e-4), inputs, None)
    forwards = {"torch's dropout": nn.Dropout.forward, "ban's dropout": layers.Dropout.forward}
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    try:
        for _ in range(args.rounds):
            for name, forward in forwards.items():
                layers.Dropout.forward = forward
                step()  # one untimed step after each switch
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    seconds[name].append(time.perf_counter() - start)
    finally:
        layers.Dropout.forward = forwards["ban's dropout"]
    print(f"paper size, batch {args.batch}, {torch.get_num_threads()} threads, training step:")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, median in medians.items():
        print(f"  {name:<16} {median:.3f} s (median of {len(seconds[name])})")
    ratio = medians["torch's dropout"] / medians["ban's dropout"]
    print(f"  ban's dropout is {ratio:.2f}x as fast")


if __name__ == "__main__":
    main()
