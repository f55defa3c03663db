"""Speed of BAN at the paper's size, against a re-statement of the original computation.

    python benchmarks/model_speed.py                      # CPU, batch 32, fp32
    python benchmarks/model_speed.py --device cuda --batch 256 --amp bf16 --compile --graph

Paper size: BAN-8, H 1280, 'c' embedding, 20k vocabulary, 36 boxes x 2048-d, 14 tokens, 3129
answers, counter on. Prints examples/s, achieved GFLOP/s, model FLOP utilisation (MFU: achieved
FLOP/s over the fp32 matrix-multiply peak measured in the same run) and the ratio to the original.

FLOPs are counted analytically (`ban.flops_per_example`, 2 per multiply-add of every matrix
product); a training step counts 3x the forward (the backward computes two products per forward
product: gradients of inputs and of weights).

Ours is called as the training engine calls it, `check_values=False` (the engine checks token ids
and boxes on the host), so that no step waits for the device. `--graph` (CUDA) also captures the
whole training step (forward, loss, backward, clipping, Adamax with capturable=True) and the
inference pass in CUDA graphs, so that the host launches one graph per step instead of thousands
of kernels; it needs static shapes and a step that never reads a value on the host.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from original_ban import OriginalBAN  # noqa: E402

import ban  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps, warmup=2):
    """Median seconds of `fn()` over `steps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device, dtype, size):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, steps=5)
    return 2 * size**3 / seconds


def make_batch(config, batch, boxes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(batch, boxes, config.visual_dim, generator=gen)
    corners = torch.rand(batch, boxes, 2, generator=gen) * 0.6
    sizes = torch.rand(batch, boxes, 2, generator=gen) * 0.4 + 0.01
    b = torch.cat([corners, corners + sizes, sizes], dim=2)
    q = torch.randint(0, config.vocab_size, (batch, 14), generator=gen)
    q[:, 10:] = config.vocab_size
    target = (torch.rand(batch, config.num_answers, generator=gen) > 0.999).float()
    return [t.to(device) for t in (v, b, q, target)]


def logits_of(model, v, b, q):
    """The logits of ours (as the engine calls it) or of the original."""
    if isinstance(model, OriginalBAN) or isinstance(getattr(model, "_orig_mod", None), OriginalBAN):
        return model(v, b, q)[0]
    return model(v, b, q, check_values=False).logits


def train_step_fn(model, optimizer, inputs, amp, graphed=False):
    """One training step as a function; with `graphed`, the replay of a CUDA graph of it."""
    v, b, q, target = inputs
    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradients_and_update():
        # The autocast cache would keep casts made outside a captured graph; graphs need it off.
        with torch.autocast(v.device.type, amp, enabled=amp is not None, cache_enabled=not graphed):
            logits = logits_of(model, v, b, q)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target) * target.shape[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.25)
        optimizer.step()

    def step():
        optimizer.zero_grad(set_to_none=True)
        gradients_and_update()

    if not graphed:
        return step
    # With the gradients set to None before capture, backward allocates them inside the graph
    # and each replay overwrites them: no zeroing between replays.
    return cuda_graph(
        warmup=step,
        captured=gradients_and_update,
        before_capture=lambda: optimizer.zero_grad(set_to_none=True),
    )


def infer_fn(model, inputs, amp, graphed=False):
    v, b, q, _ = inputs

    @torch.no_grad()
    def run():
        with torch.autocast(v.device.type, amp, enabled=amp is not None, cache_enabled=not graphed):
            return logits_of(model, v, b, q)

    return cuda_graph(warmup=run, captured=run) if graphed else run


def cuda_graph(warmup, captured, before_capture=None):
    """Run `warmup` a few times on a side stream (as torch's documentation asks), capture
    `captured` in a CUDA graph on that same stream (the libraries' per-stream handles then exist
    before capture), and return the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            warmup()
    torch.cuda.current_stream().wait_stream(stream)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured()
    return graph.replay


def mode_name(dtype, compiled, graphed):
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
    how = {(False, False): "eager", (True, False): "compiled", (False, True): "graphed",
           (True, True): "compiled+graphed"}[(compiled, graphed)]  # fmt: skip
    return f"{precision} {how}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="also measure autocast")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--graph", action="store_true", help="also measure CUDA graphs (CUDA)")
    parser.add_argument("--memory-batch", type=int, default=256, help="batch for peak memory")
    parser.add_argument("--small", action="store_true", help="a tiny model, to try the script")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if args.graph and device.type != "cuda":
        parser.error("--graph needs --device cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    config = ban.preset("ban-8-vqa", vocab_size=args.vocab)
    if args.small:
        config = ban.preset("ban-small")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {config}\nbatch {args.batch}, {args.boxes} boxes, 14 tokens")

    peak = matmul_peak(device, torch.float32, 4096 if device.type == "cpu" else 8192)
    print(f"fp32 matmul peak: {peak / 1e9:,.0f} GFLOP/s")
    if amp is not None:
        # A CPU without native bf16/fp16 (no AVX-512-BF16/AMX) emulates them very slowly.
        half_peak = matmul_peak(device, amp, 512 if device.type == "cpu" else 8192)
        print(f"{args.amp} matmul peak: {half_peak / 1e9:,.0f} GFLOP/s")
    forward_flops = ban.flops_per_example(config, boxes=args.boxes)
    print(f"forward FLOPs per example: {forward_flops / 1e9:.3f} G (training step: 3x)")

    ours = ban.BAN(config).to(device)
    original = OriginalBAN.from_ban(ours.cpu()).to(device)
    ours.to(device)
    inputs = make_batch(config, args.batch, args.boxes, device)
    with torch.no_grad():
        a = logits_of(ours.eval(), *inputs[:3])
        b = logits_of(original.eval(), *inputs[:3])
    error = ((a - b).abs().max() / b.abs().max()).item()
    print(f"max relative difference of the logits, ban vs original (eval): {error:.2e}")

    single = make_batch(config, 1, args.boxes, device)
    for label, model in (("original", original), ("ban", ours)):
        latency = timed(infer_fn(model.eval(), single, None), device, max(args.steps, 10))
        print(f"batch-1 latency, {label} fp32 eager: {latency * 1000:.1f} ms")

    if device.type == "cuda":
        big = make_batch(config, args.memory_batch, args.boxes, device)
        for label, model in (("original", original), ("ban", ours)):
            torch.cuda.reset_peak_memory_stats(device)
            model.train()
            train_step_fn(model, torch.optim.Adamax(model.parameters()), big, amp)()
            sync(device)
            peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
            batch = args.memory_batch
            print(f"peak memory of a training step at batch {batch}, {label}: {peak_mem:.2f} GiB")

    modes = [(None, False, False)]  # (autocast dtype, compiled, graphed)
    if amp is not None:
        modes.append((amp, False, False))
    if args.graph:
        modes.append((amp, False, True))
    if args.compile:
        modes.append((amp, True, False))
    if args.graph and args.compile:
        modes.append((amp, True, True))

    def measure(model, dtype, compiled, graphed):
        """(train, inference) examples/s of `model` in one mode."""
        runner = torch.compile(model) if compiled else model
        # capturable: Adamax keeps its step counters on the device, as a graph needs.
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4, capturable=graphed)
        model.train()
        train = train_step_fn(runner, optimizer, inputs, dtype, graphed)
        train_s = timed(train, device, args.steps)
        model.eval()
        infer_s = timed(infer_fn(runner, inputs, dtype, graphed), device, args.steps)
        return args.batch / train_s, args.batch / infer_s

    print(f"\n{'model':<10}{'mode':<24}{'train ex/s':>12}{'MFU':>7}{'x orig':>8}"
          f"{'infer ex/s':>12}{'MFU':>7}{'x orig':>8}")  # fmt: skip
    fp32_eager = None  # the original's, the ratio's base where its own mode failed
    for dtype, compiled, graphed in modes:
        mode = mode_name(dtype, compiled, graphed)
        rates = {}
        # Ours first: a failed capture of one model must not cost the other's figures.
        for label, model in (("ban", ours), ("original", original)):
            try:
                rates[label] = measure(model, dtype, compiled, graphed)
            except Exception as error:  # one failing mode must not lose the others' figures
                rates[label] = f"failed: {type(error).__name__}: {error}"[:400]
        if mode == "fp32 eager" and isinstance(rates["original"], tuple):
            fp32_eager = rates["original"]
        base = rates["original"] if isinstance(rates["original"], tuple) else fp32_eager
        for label in ("original", "ban"):
            if isinstance(rates[label], str):
                print(f"{label:<10}{mode:<24}{rates[label]}")
                continue
            train_rate, infer_rate = rates[label]
            train_mfu = 3 * forward_flops * train_rate / peak
            infer_mfu = forward_flops * infer_rate / peak
            ratios = (train_rate / base[0], infer_rate / base[1]) if base else (0.0, 0.0)
            print(f"{label:<10}{mode:<24}{train_rate:>12,.1f}{train_mfu:>7.2f}{ratios[0]:>8.2f}"
                  f"{infer_rate:>12,.1f}{infer_mfu:>7.2f}{ratios[1]:>8.2f}")  # fmt: skip
    print(
        "x orig: against the original in the same mode (in its fp32 eager mode where that "
        "mode failed for the original)."
    )


if __name__ == "__main__":
    main()
