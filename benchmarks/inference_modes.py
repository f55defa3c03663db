"""Inference precisions (`ban.inference`): speed at the paper's size, accuracy of a trained model.

    python benchmarks/inference_modes.py --checkpoint RUN_DIR      # a `ban train` run (default)
    python benchmarks/inference_modes.py --quick                   # few calls, no accuracy: a try

One run measures, for the model as trained (fp32 with its weight-normalised layers: the baseline)
and for each precision of `ban.inference.inference_model` (fp32 folded, bf16, int8):

- at the paper's size (BAN-8, H 1280, 'c' embedding, 36 boxes x 2048-d, 14 tokens, counter on;
  random weights): batch-1 latency, median and p90 over `--calls` calls after warm-up, wall-clock
  and the process's CPU time per call, with 2 threads and with 1; throughput at batch 64 (2
  threads); the largest |logit - fp32 logit| on those inputs; the latency at batch 1 and 16
  when the images' visual projections are kept (`ban.inference.ImageCache`), against computing
  them, and the largest |logit difference| between the two;
- with `--torchao` (`pip install torchao`): torchao's int8 configurations at batch 1 against ours;
- at the default size (`ban-small`, random weights): batch-1 latency (what `auto` decides by);
- with `--checkpoint` (a trained default model): the official VQA accuracy on the built-in
  benchmark's val2014 in each precision, its change from fp32, the share of questions answered as
  fp32 answers them, and the largest |logit - fp32 logit| over the split.

The model is called as `ban.Predictor` calls it (no autograd, values checked). Appends the
table to `--out` (default benchmarks/results/inference_modes_cpu.txt), with the CPU's name and
flags and the load average before and after each part: on a shared machine the CPU time per call
is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import ban
from ban import engine
from ban.checkpoint import load_any
from ban.files import atomic_write_text
from ban.inference import choose_precision, cpu_flags, inference_model
from ban.tasks import vqa

MODES = ("model", "fp32", "bf16", "int8")  # 'model': the trained module itself, the baseline


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def inputs(config, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(batch, 36, config.visual_dim, generator=gen)
    corners = torch.rand(batch, 36, 2, generator=gen) * 0.6
    sizes = torch.rand(batch, 36, 2, generator=gen) * 0.4 + 0.01
    b = torch.cat([corners, corners + sizes, sizes], dim=2)
    q = torch.randint(0, config.vocab_size, (batch, 14), generator=gen)
    q[:, 10:] = config.vocab_size  # a 10-word question, padded to 14 as the data pads it
    return v, b, q


def models(model) -> dict:
    converted = {"model": model.eval()}
    for mode in MODES[1:]:
        converted[mode] = inference_model(model, mode)
    return converted


@torch.no_grad()
def timings(fn, calls: int, seconds: float, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of `fn()` per call: `calls` calls, or fewer (at least 5)
    when they take more than `seconds`."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    deadline = time.perf_counter() + seconds
    while len(wall) < calls and (len(wall) < 5 or time.perf_counter() < deadline):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(1e3 * (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() - start_cpu))
    return wall, cpu


def p90(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]


@torch.no_grad()
def logit_difference(fast, reference, v, b, q) -> float:
    return (fast(v, b, q).logits - reference(v, b, q).logits).abs().max().item()


def speed_table(name: str, model, args, lines: list[str], batch64: bool) -> None:
    converted = models(model)
    lines.append(f"\n## {name}: batch-1 latency ({load()})\n")
    lines.append(
        "| mode | threads | calls | median ms | p90 ms | CPU ms/call (median) | x model "
        "| max abs logit diff |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    one = inputs(model.config, 1)
    scale = converted["model"](*one).logits.abs().max().item()
    for threads in args.threads:
        torch.set_num_threads(threads)
        base = None
        for mode, m in converted.items():
            wall, cpu = timings(lambda m=m: m(*one), args.calls, args.seconds)
            median = statistics.median(wall)
            base = base or median
            diff = logit_difference(m, converted["model"], *one)
            lines.append(
                f"| {mode} | {threads} | {len(wall)} | {median:.1f} | {p90(wall):.1f} | "
                f"{statistics.median(cpu):.1f} | {base / median:.2f} | {diff:.4f} |"
            )
            print(lines[-1], flush=True)
    lines.append(f"\n(largest |fp32 logit| on this input: {scale:.2f}; {load()})")
    if not batch64:
        return
    torch.set_num_threads(args.threads[0])
    lines.append(f"\n## {name}: throughput at batch 64, {args.threads[0]} threads ({load()})\n")
    lines.append("| mode | calls | examples/s | CPU ms/example | x model | max abs logit diff |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    big = inputs(model.config, 64, seed=1)
    base = None
    for mode, m in converted.items():
        wall, cpu = timings(lambda m=m: m(*big), args.batch_calls, args.seconds, warmup=1)
        rate = 64e3 / statistics.median(wall)
        base = base or rate
        diff = logit_difference(m, converted["model"], *big)
        lines.append(
            f"| {mode} | {len(wall)} | {rate:.1f} | {statistics.median(cpu) / 64:.1f} | "
            f"{rate / base:.2f} | {diff:.4f} |"
        )
        print(lines[-1], flush=True)


def kept_image_table(name: str, model, args, lines: list[str]) -> None:
    """Each precision with its image's visual projections kept (`ImageCache`), against computing
    them: what a further question about an image costs."""
    threads = args.threads[0]
    torch.set_num_threads(threads)
    lines.append(f"\n## {name}: an image asked about again (its projections kept), {threads} "
                 f"threads ({load()})\n")  # fmt: skip
    lines.append(
        "| mode | batch | calls | median ms | ms/question | x computed | max abs logit diff |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in (1, 16):
        x = inputs(model.config, batch, seed=2)
        keys = list(range(batch))
        for mode in MODES[1:]:
            fast = inference_model(model, mode, image_cache_bytes=2**30)
            computed, _ = timings(lambda f=fast, x=x: f(*x), args.batch_calls, args.seconds)
            with torch.no_grad():
                fast(*x, image_keys=keys)  # computed once, then kept
                diff = (fast(*x, image_keys=keys).logits - fast(*x).logits).abs().max()
            kept, _ = timings(
                lambda f=fast, x=x, k=keys: f(*x, image_keys=k), args.calls, args.seconds
            )
            median = statistics.median(kept)
            lines.append(
                f"| {mode} | {batch} | {len(kept)} | {median:.1f} | {median / batch:.2f} | "
                f"{statistics.median(computed) / median:.2f} | {diff.item():.4f} |"
            )
            print(lines[-1], flush=True)


def torchao_table(model, args, lines: list[str]) -> None:
    """torchao's int8 configurations (the successor torch.ao.quantization names), eager, against
    ours: batch-1 latency with one thread."""
    import warnings

    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    from ban.inference import fold_weight_norm

    torch.set_num_threads(1)
    lines.append(f"\n## Paper size: torchao's int8 against ours, batch 1, 1 thread ({load()})\n")
    lines.append("| int8 method | calls | median ms | CPU ms/call (median) | max abs logit diff |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    one = inputs(model.config, 1)
    methods = {"ours (torch.ao quantize_dynamic)": inference_model(model, "int8")}
    for name, config in (
        ("torchao Int8DynamicActivationInt8WeightConfig", Int8DynamicActivationInt8WeightConfig()),
        ("torchao Int8WeightOnlyConfig", Int8WeightOnlyConfig()),
    ):
        folded = fold_weight_norm(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(folded, config)
        methods[name] = folded
    for name, m in methods.items():
        wall, cpu = timings(lambda m=m: m(*one), min(args.calls, 20), args.seconds)
        diff = logit_difference(m, model, *one)
        lines.append(
            f"| {name} | {len(wall)} | {statistics.median(wall):.1f} | "
            f"{statistics.median(cpu):.1f} | {diff:.4f} |"
        )
        print(lines[-1], flush=True)


def accuracy_table(checkpoint: str, lines: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    path, run_config = engine.resolve_checkpoint(checkpoint)
    model = load_any(path, "cpu")
    data = vqa.resolve_data(run_config.data if run_config else None)
    lines.append(f"\n## Accuracy: {path} on {data.name} val2014, {threads} threads ({load()})\n")
    lines.append(
        f"checkpoint written {time.strftime('%H:%M:%S', time.gmtime(path.stat().st_mtime))}"
    )
    metrics = path.parent / "metrics.jsonl"
    if metrics.is_file() and run_config is not None:
        epochs = [row for row in map(json.loads, metrics.read_text().splitlines())
                  if row.get("kind") == "epoch"]  # fmt: skip
        if epochs:
            last = epochs[-1]
            lines.append(
                f"its run: {len(epochs)} of {run_config.epochs} epochs done, the last with "
                f"eval score {last.get('eval_score', float('nan')):.2f} (training's approximation)"
            )
    lines.append("")
    lines.append(
        "| mode | official accuracy % | change (points) | same answer as fp32 % "
        "| max abs logit diff | seconds |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    reference = None
    for mode, m in models(model).items():
        logits: list[torch.Tensor] = []
        hook = m.register_forward_hook(lambda _m, _i, out, kept=logits: kept.append(out.logits))
        start = time.perf_counter()
        report, rows = vqa.evaluate(m, data, "val2014")
        seconds = time.perf_counter() - start
        hook.remove()
        answers = {row["question_id"]: row["answer"] for row in rows}
        logits = torch.cat(logits)
        accuracy = report["official"]["overall"]
        if reference is None:
            reference = (accuracy, answers, logits)
        same = sum(answers[q] == a for q, a in reference[1].items()) / len(answers)
        diff = (logits - reference[2]).abs().max().item()
        lines.append(
            f"| {mode} | {accuracy:.2f} | {accuracy - reference[0]:+.2f} | {100 * same:.2f} | "
            f"{diff:.4f} | {seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    lines.append(
        f"\n({len(rows)} questions; largest |fp32 logit| {reference[2].abs().max().item():.2f}; "
        f"{load()})"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a trained default model (run directory or file)")
    parser.add_argument("--calls", type=int, default=100, help="batch-1 calls per mode")
    parser.add_argument("--batch-calls", type=int, default=10, help="batch-64 calls per mode")
    parser.add_argument("--seconds", type=float, default=30, help="time budget per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--torchao", action="store_true", help="also torchao's int8 (installed)")
    parser.add_argument("--quick", action="store_true", help="5 calls, default size only")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results/inference_modes_cpu.txt")
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.batch_calls, args.seconds = 5, 2, 1

    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    missing = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    big = ban.BAN(ban.preset("ban-8-vqa")).eval()
    small_size = ban.count_parameters(ban.BAN(ban.preset("ban-small")))
    auto = [choose_precision("cpu", parameters=n) for n in (ban.count_parameters(big), small_size)]
    lines = [
        "# Inference precisions (benchmarks/inference_modes.py)",
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; flags: {' '.join(shown) or 'none'}"
        f" (no {', '.join(missing) or '-'})",
        f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}; "
        f"auto picks {auto[0]} at the paper's size, {auto[1]} at the default size",
        f"start: {time.strftime('%Y-%m-%d %H:%M:%S')} UTC, {load()}",
        "'model': the fp32 model as trained (weight-normalised layers, weights cached), the "
        "baseline of 'x model'; CPU ms: the process's CPU time (all threads) per call",
    ]
    print("\n".join(lines), flush=True)
    torch.manual_seed(0)
    if not args.quick:
        speed_table("Paper size (BAN-8, H 1280, 36 x 2048, 14 tokens)", big, args, lines, True)
        kept_image_table("Paper size", big, args, lines)
    if args.torchao:
        torchao_table(big, args, lines)
    del big
    torch.manual_seed(0)
    small = ban.BAN(ban.preset("ban-small")).eval()
    speed_table("Default size (ban-small, H 128)", small, args, lines, False)
    if args.quick:  # a try of the kept-image table too
        kept_image_table("Default size", small, args, lines)
    if args.checkpoint:
        accuracy_table(args.checkpoint, lines, args.threads[0])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    lines.append(
        f"\nend: {time.strftime('%Y-%m-%d %H:%M:%S')} UTC, {load()}; "
        f"process CPU time user {usage.ru_utime:.0f} s + sys {usage.ru_stime:.0f} s"
    )
    print(lines[-1])
    # appended: the file keeps every earlier run (docs cite them)
    out = Path(args.out)
    before = out.read_text() + "\n" if out.is_file() else ""
    atomic_write_text(out, before + "\n".join(lines) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
