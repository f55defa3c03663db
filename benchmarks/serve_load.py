"""A bounded load test of `ban serve` on loopback: requests/s and p50/p99 latency, no errors.

    python benchmarks/serve_load.py RUN_DIR [--data DATA] [--requests 2000] [--concurrency 1,4,16]
    python benchmarks/serve_load.py --paper             # BAN-8 at the paper's size, random weights
    python benchmarks/serve_load.py --paper --device cuda --requests 400,2000,4000   # on a GPU
    python benchmarks/serve_load.py --paper --modes batched,batched+cache   # the image cache

Serves the model in this process (127.0.0.1, a free port) twice over, one question per forward
pass (a batch bound of 1, as before batching) and batched (`Batcher`: what queued while the model
was busy goes into its next forward), and sends POST /api/answer from `--concurrency` threads of
a separate client process (so that the client does not share the server's interpreter lock),
each on its own keep-alive connection, cycling over the split's questions; each level of a
comma-separated `--concurrency` runs each server in turn. The servers run without the image
cache (`ban.inference.ImageCache`: every question pays for its image's visual projections, as
with distinct images), and with it, emptied before the run, for the modes named `...+cache`
(the questions cycle over the split's first images: after the first round, every image is
kept). Before each run it sends a burst of bad requests (malformed and too-deep JSON, unknown
image, path traversal, wrong method, oversized body, wrong Content-Type) and checks each gets
its documented status, so the figures also show that the server serves after them. Prints the
machine (CPU model, load average), the server process's CPU time, the mean questions per forward
and the image cache's hits. Exits 1 if any request fails.

`--paper` serves `ban.BAN(ban.preset("ban-8-vqa"))` with random weights over a temporary data
directory of `--images` images of 36 x 2048 random features (speed only: the answers mean
nothing).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ban import serve

JSON = {"Content-Type": "application/json"}
BAD = [  # (method, path, body, headers, expected status)
    ("POST", "/api/answer", b"{not json", JSON, 400),
    ("POST", "/api/answer", b"[" * 3000 + b"]" * 3000, JSON, 400),
    ("POST", "/api/answer", b'{"image_id": 999999999, "question": "x"}', JSON, 404),
    ("POST", "/api/answer", b'{"image_id": "../../etc", "question": "x"}', JSON, 422),
    ("POST", "/api/answer", b"x" * (serve.MAX_BODY + 1), JSON, 413),
    ("POST", "/api/answer", b"{}", {"Content-Type": "text/plain"}, 415),
    ("GET", "/api/answer", None, {}, 405),
    ("PUT", "/api/answer", b"{}", {}, 405),
    ("GET", "/api/images/..%2f..%2fetc%2fpasswd.png", None, {}, 404),
    ("GET", "/nothing", None, {}, 404),
]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        extra = ", avx512_bf16" if "avx512_bf16" in flags else ""
    except OSError:
        extra = ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}{extra}, {os.cpu_count()} CPUs, load average {load}"


def device_name(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return f"device {torch.cuda.get_device_name(torch.device(device))}"
    return f"device {device}"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def send_bad(host: str, port: int, times: int) -> int:
    """Send each bad request `times` times; the number that did not get their status."""
    wrong = 0
    for _ in range(times):
        for method, path, body, headers, expected in BAD:
            connection = http.client.HTTPConnection(host, port, timeout=60)
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            reply = json.loads(response.read())
            connection.close()
            wrong += response.status != expected or "error" not in reply
    return wrong


def load(host: str, port: int, bodies: list[bytes], requests: int, concurrency: int):
    """(latencies in seconds, errors, elapsed seconds): runs in the client process."""

    def worker(k: int) -> tuple[list[float], int]:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        latencies, errors = [], 0
        for i in range(k, requests, concurrency):
            start = time.perf_counter()
            connection.request("POST", "/api/answer", body=bodies[i % len(bodies)],
                               headers={"Content-Type": "application/json"})  # fmt: skip
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - start)
            errors += response.status != 200
        connection.close()
        return latencies, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, range(concurrency)))
    elapsed = time.perf_counter() - start
    return [x for lat, _ in results for x in lat], sum(e for _, e in results), elapsed


def paper_app(root: Path, images: int, device: str, precision: str):
    """A random-weight BAN-8 of the paper's size over `images` images of 36 x 2048 features, made
    on the app's model thread as `serve.load_app` does."""
    import numpy as np

    from ban.data.features import Region, convert_features, write_tsv

    rng = np.random.default_rng(0)
    regions = []
    for image_id in range(1, images + 1):
        xy = rng.uniform(0, 400, (36, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (36, 2))], axis=1)
        features = rng.random((36, 2048), dtype=np.float32)
        regions.append(Region(image_id, 640, 480, boxes.astype(np.float32), features))
    (root / "features").mkdir(parents=True)
    write_tsv(root / "features.tsv", regions)
    convert_features(root / "features.tsv", root / "features" / "val2014.h5", progress=False)
    questions = ["what is the color", "how many are there", "is there", "what color is the"]
    with open(root / "val2014.jsonl", "w") as out:
        for k in range(2 * images):
            out.write(json.dumps({"image_id": 1 + k % images, "question": questions[k % 4]}))
            out.write("\n")
    (root / "manifest.json").write_text("{}")
    batcher = serve.Batcher()
    predictor = batcher.call(paper_predictor, root, device, precision).result()
    return serve.App(predictor, batcher=batcher)


def paper_predictor(root: Path, device: str, precision: str):
    import torch

    import ban
    from ban.predict import Predictor
    from ban.text import UNK, Dictionary

    config = ban.preset("ban-8-vqa")
    torch.manual_seed(0)
    model = ban.BAN(config).eval()
    model.vocabulary = [f"w{i}" for i in range(config.vocab_size)]
    model.vocabulary[:9] = ["what", "is", "the", "color", "how", "many", "there", "are", UNK]
    model.answers = [f"a{i}" for i in range(config.num_answers)]
    Dictionary(model.vocabulary).save(root / "dictionary.json")
    (root / "answers.json").write_text(json.dumps(model.answers))
    return Predictor(model, data=root, device=device, precision=precision)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint file or run directory")
    parser.add_argument("--data", help="prepared data directory (default: the run's)")
    parser.add_argument("--paper", action="store_true", help="BAN-8, paper size, random weights")
    parser.add_argument("--images", type=int, default=32, help="images of --paper's data")
    parser.add_argument("--split", default="val2014", help="questions to send")
    parser.add_argument("--requests", default="2000",
                        help="per run, or one per concurrency level: 400,1000,2000")  # fmt: skip
    parser.add_argument("--concurrency", default="16", help="e.g. 1,4,16")
    parser.add_argument("--bad", type=int, default=20, help="bursts of bad requests per level")
    parser.add_argument("--modes", default="one-at-a-time,batched",
                        help="servers: one-at-a-time, batched, either +cache")  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=serve.MAX_BATCH)
    parser.add_argument("--max-wait-ms", type=float, default=serve.MAX_WAIT * 1000)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or int8")
    args = parser.parse_args()
    if (args.checkpoint is None) == (not args.paper):
        parser.error("give a checkpoint or --paper")

    with tempfile.TemporaryDirectory() as tmp:
        if args.paper:
            app = paper_app(Path(tmp), args.images, args.device, args.precision)
        else:
            app = serve.load_app(
                args.checkpoint, args.data, device=args.device, precision=args.precision
            )
        # One app and one model thread for both (torch's thread pools belong to the thread that
        # calls it: a second model thread measured up to 4x slower or faster on a busy machine).
        bounds = {"one-at-a-time": (1, 0.0), "batched": (args.max_batch, args.max_wait_ms / 1e3)}
        modes = [m for m in args.modes.split(",") if m]
        if unknown := [m for m in modes if m.removesuffix("+cache") not in bounds]:
            parser.error(f"--modes: unknown {', '.join(unknown)}")
        model = app.predictor.model
        cache = model.image_cache
        split = Path(app.predictor.data_dir) / f"{args.split}.jsonl"
        entries = [json.loads(line) for line in split.read_text().splitlines()[:500]]
        bodies = [
            json.dumps({"image_id": e["image_id"], "question": e["question"]}).encode()
            for e in entries
        ]
        torch_threads = __import__("torch").get_num_threads()
        print(f"machine: {machine()}; torch threads {torch_threads}; {device_name(args.device)}")
        name = "BAN-8 paper size, random weights" if args.paper else args.checkpoint
        print(f"model: {name}, precision {app.predictor.precision}; batched: at most "
              f"{args.max_batch} per forward, wait {args.max_wait_ms:g} ms")  # fmt: skip
        failed = 0
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as client:
            levels = [int(c) for c in args.concurrency.split(",")]
            counts = [int(n) for n in args.requests.split(",")]
            if len(counts) not in (1, len(levels)):
                parser.error("--requests: one count, or one per concurrency level")
            counts = counts * len(levels) if len(counts) == 1 else counts
            for concurrency, requests in zip(levels, counts, strict=True):
                for mode in modes:
                    batcher = app.batcher
                    batcher.max_batch, batcher.max_wait = bounds[mode.removesuffix("+cache")]
                    model.image_cache = cache if mode.endswith("+cache") else None
                    httpd = serve.make_server(app, "127.0.0.1", 0, quiet=True)
                    threading.Thread(target=httpd.serve_forever, daemon=True).start()
                    host, port = httpd.server_address[:2]
                    if concurrency == levels[0]:  # warm up: first forwards, caches
                        client.apply(load, (host, port, bodies, 2 * args.max_batch, 4))
                    wrong = client.apply(send_bad, (host, port, args.bad))
                    if cache is not None:  # after the warm-up: the run starts with none kept
                        cache.clear()
                        hits, misses = cache.hits, cache.misses
                    cpu, batches, asked = cpu_seconds(), batcher.batches, batcher.questions
                    latencies, errors, elapsed = client.apply(
                        load, (host, port, bodies, requests, concurrency)
                    )
                    cpu = cpu_seconds() - cpu
                    per_batch = (batcher.questions - asked) / max(1, batcher.batches - batches)
                    kept = ""
                    if model.image_cache is not None:
                        kept = (f"; image cache {cache.hits - hits} hits, {cache.misses - misses} "
                                f"misses (images per forward)")  # fmt: skip
                    httpd.shutdown()
                    httpd.server_close()
                    latencies.sort()
                    p50 = statistics.median(latencies) * 1000
                    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
                    print(
                        f"{mode:>19} concurrency {concurrency:2d}: {len(latencies)} requests, "
                        f"{len(latencies) / elapsed:6.1f} requests/s, p50 {p50:7.1f} ms, "
                        f"p99 {p99:7.1f} ms, {errors} errors, {per_batch:4.1f} questions per "
                        f"forward; after {args.bad * len(BAD)} bad requests ({wrong} not answered "
                        f"as documented); server CPU {cpu:.1f} s; load average "
                        f"{os.getloadavg()[0]:.2f}{kept}",
                        flush=True,
                    )
                    failed += errors + wrong
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
