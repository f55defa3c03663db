"""bf16 autocast against fp32: accuracy of the default model on the built-in benchmark.

    python benchmarks/bf16_accuracy.py                        # seeds 1204 1-5, both precisions
    python benchmarks/bf16_accuracy.py --precisions bf16 --threads 1     # one half, to run two
    python benchmarks/bf16_accuracy.py --report-only                     # tabulate finished runs

Trains the `ban-small` preset (what `ban train` trains by default) once per seed in fp32 and once
with `--amp bf16`, scores the last model on val2014 with the official VQA metric and prints the
per-seed difference and its mean. Runs go to `--out/<precision>/seed-<seed>`; finished runs are
read back, interrupted ones resumed.

On a CPU without bf16 arithmetic (no AVX-512-BF16 or AMX: torch emulates a bf16 matrix product
there ~300x slower than fp32) `--emulate` (the default on CPU) keeps autocast and its casting
policy as they are and computes only the bf16 matrix products differently: as fp32 products of
the same bf16 operands, rounded to bf16. bf16 hardware (GPU tensor cores, AMX) multiplies bf16
operands exactly and accumulates in fp32, so this gives the same values up to the order of the
additions. What differs from a GPU run is the casting policy itself: under CPU autocast the GRU's
matrix products are bf16 but its gates and state stay fp32; CUDA autocast runs cuDNN's whole GRU
in bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from scene_ablation import ANSWER_TYPES, scores, train_to_end  # noqa: E402

from ban import configs, engine  # noqa: E402
from ban.counting import Counter  # noqa: E402
from ban.files import atomic_write_text  # noqa: E402
from ban.tasks import vqa  # noqa: E402

aten = torch.ops.aten
MATRIX_PRODUCTS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.mv, aten.dot}
COLUMNS = ("overall", *ANSWER_TYPES)
PRECISIONS = ("fp32", "bf16")


class EmulatedBF16Products(TorchDispatchMode):
    """Inside the block, a matrix product with bf16 operands is computed in fp32 on the same
    (bf16-exact) values and its result rounded to bf16, as bf16 hardware does. `products` counts
    the products so emulated."""

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func.overloadpacket not in MATRIX_PRODUCTS or not any(
            t.dtype == torch.bfloat16 for t in tensors
        ):
            return func(*args, **kwargs)
        if "out" in kwargs:
            raise NotImplementedError(f"{func} with out=: not emulated")
        self.products += 1

        def widen(a):
            return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a

        result = func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()})
        return result.to(torch.bfloat16)


def emulation_check(batch: int = 32) -> str:
    """One training step of ban-small (random inputs) three ways: torch's own (slow) bf16
    products under CPU autocast, the emulated ones, and fp32. The emulation should sit far closer
    to torch's bf16 than bf16 sits to fp32."""
    from step_overhead import make_inputs

    import ban

    torch.manual_seed(0)
    config = ban.preset("ban-small")
    model = ban.BAN(config).train()
    v, b, q, target = make_inputs(config, batch, torch.device("cpu"))

    def step(bf16: bool, emulate: bool = False):
        model.zero_grad()
        with EmulatedBF16Products() if emulate else contextlib.nullcontext():
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(v, b, q, check_values=False).logits.float()
            loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
            loss.backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch_bf16, emulated, fp32 = step(True), step(True, emulate=True), step(False)

    def gradients(a, b):
        errors = [((x - y).norm() / y.norm()).item() for x, y in zip(a[1], b[1], strict=True)]
        return f"median {statistics.median(errors):.4f}, max {max(errors):.4f}"

    return (
        f"emulation check (ban-small, one training step, batch {batch}): logits mean |difference| "
        f"emulated vs torch's bf16 {(emulated[0] - torch_bf16[0]).abs().mean():.5f}, "
        f"torch's bf16 vs fp32 {(torch_bf16[0] - fp32[0]).abs().mean():.5f}; gradients' relative "
        f"difference emulated vs torch's bf16 {gradients(emulated, torch_bf16)}, "
        f"torch's bf16 vs fp32 {gradients(torch_bf16, fp32)}"
    )


@torch.no_grad()
def counter_precision(images: int = 4096) -> str:
    """How far the counter's count moves in bf16, on random boxes and attention logits (36 boxes,
    maps away from the identity): from rounding its input logits to bf16, and from computing
    its internals in bf16 too (what autocast did before `Counter.count` computed in fp32)."""
    torch.manual_seed(0)
    counter = Counter()
    for f in counter.f:
        f.weight.add_(torch.rand_like(f.weight) * 0.5)
    corners = torch.rand(images, 36, 2) * 0.7
    size = 0.05 + torch.rand(images, 36, 2) * 0.3
    boxes = torch.cat([corners, corners + size], dim=2).transpose(1, 2)
    logits = torch.randn(images, 36) * 3
    exact, _ = counter.count(boxes, logits)
    rounded, _ = counter.count(boxes, logits.bfloat16().float())
    with EmulatedBF16Products(), torch.autocast("cpu", dtype=torch.bfloat16):
        internals, _ = counter._count(boxes, logits.bfloat16())  # the counter's body in bf16
    counts = f"counts {exact.min():.1f}-{exact.max():.1f}"
    lines = [f"counter in bf16 ({images} random images, {counts}):"]
    for label, a, b in (
        ("bf16 input logits, fp32 counter", rounded, exact),
        ("bf16 counter internals, beyond that", internals.float(), rounded),
    ):
        error = (a - b).abs()
        lines.append(f"{label}: count error mean {error.mean():.4f}, max {error.max():.4f}")
    return "\n".join(lines)


def run(precision: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or resume, or read back) one run; its official accuracies."""
    run_dir = args.out / precision / f"seed-{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    overrides = {"seed": seed, "device": "cpu" if args.emulate else args.device}
    if precision == "bf16":
        overrides["amp"] = "bf16"
    if args.data is not None:
        overrides["data"] = str(args.data)
    config = configs.override(configs.recipe("vqa-small"), overrides, source="bf16_accuracy")
    start = time.perf_counter()
    mode = EmulatedBF16Products() if precision == "bf16" and args.emulate else None
    with mode or contextlib.nullcontext():
        config = train_to_end(config, run_dir, f"{precision} seed {seed}")
    result = {
        "precision": precision,
        "seed": seed,
        "emulated": mode is not None,
        "emulated_products": mode.products if mode else 0,
        "minutes": (time.perf_counter() - start) / 60,
        **scores(run_dir, vqa.resolve_data(config.data)),
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


def table(results: list[dict], seeds: list[int]) -> str:
    by = {(r["precision"], r["seed"]): r for r in results}
    lines = [
        "| seed | " + " | ".join(f"fp32 {c} | bf16 {c} | diff" for c in COLUMNS) + " |",
        "| ---: | " + " | ".join("---: | ---: | ---:" for _ in COLUMNS) + " |",
    ]
    paired = [s for s in seeds if ("fp32", s) in by and ("bf16", s) in by]
    for seed in paired:
        cells = []
        for c in COLUMNS:
            fp32, bf16 = by["fp32", seed][c], by["bf16", seed][c]
            cells.append(f"{fp32:.2f} | {bf16:.2f} | {bf16 - fp32:+.2f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if len(paired) >= 2:
        cells = []
        for c in COLUMNS:
            fp32 = [by["fp32", s][c] for s in paired]
            bf16 = [by["bf16", s][c] for s in paired]
            diffs = [b - a for a, b in zip(fp32, bf16, strict=True)]
            error = statistics.stdev(diffs) / len(paired) ** 0.5
            cells.append(
                f"{statistics.mean(fp32):.2f} | {statistics.mean(bf16):.2f} | "
                f"{statistics.mean(diffs):+.2f} ± {error:.2f}"
            )
        lines.append(f"| mean of {len(paired)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1204, 1, 2, 3, 4, 5])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--emulate", action=argparse.BooleanOptionalAction, default=None,
        help="emulate bf16 products in fp32 (default: on when running on the CPU)",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, help="prepared benchmark (default: the built-in)")
    parser.add_argument("--out", type=Path, default=Path("runs/bf16-accuracy"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs")
    args = parser.parse_args()
    if args.emulate is None:
        args.emulate = engine.resolve_device(args.device).type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        paths = [args.out / p / f"seed-{s}" / "result.json" for p in PRECISIONS for s in args.seeds]
        results = [json.loads(path.read_text()) for path in paths if path.is_file()]
    else:
        results = [run(p, seed, args) for seed in args.seeds for p in args.precisions]
    emulated = any(r["emulated"] for r in results)
    header = (
        "Official VQA accuracy (%) on val2014 of the built-in benchmark, last epoch of the "
        "ban-small preset (`ban train`'s default), fp32 against bf16 autocast"
        + (" (bf16 products emulated in fp32, benchmarks/bf16_accuracy.py)" if emulated else "")
        + "; diff = bf16 - fp32, mean ± its standard error.\n\n"
    )
    text = header + table(results, args.seeds)
    text += "\n\n" + emulation_check() + "\n\n" + counter_precision()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
