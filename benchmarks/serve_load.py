"""A bounded load test of `ban serve` on loopback: requests/s and p50/p99 latency, no errors.

    python benchmarks/serve_load.py RUN_DIR [--data DATA] [--requests 2000] [--concurrency 16]

Starts the server in this process (127.0.0.1, a free port), then sends POST /api/answer from
`--concurrency` threads, each on its own keep-alive connection, cycling over the split's
questions. Exits 1 if any request fails.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ban import serve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint file or run directory")
    parser.add_argument("--data", help="prepared data directory (default: the run's)")
    parser.add_argument("--split", default="val2014", help="questions to send")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    app = serve.load_app(args.checkpoint, args.data)
    httpd = serve.make_server(app, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    lines = (Path(app.predictor.data_dir) / f"{args.split}.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines[:500]]
    bodies = [
        json.dumps({"image_id": e["image_id"], "question": e["question"]}).encode() for e in entries
    ]

    def worker(k: int) -> tuple[list[float], int]:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        latencies, errors = [], 0
        for i in range(k, args.requests, args.concurrency):
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
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(worker, range(args.concurrency)))
    elapsed = time.perf_counter() - start
    httpd.shutdown()
    latencies = sorted(x for lat, _ in results for x in lat)
    errors = sum(e for _, e in results)
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
    print(
        f"{len(latencies)} requests, concurrency {args.concurrency}: "
        f"{len(latencies) / elapsed:.1f} requests/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"{errors} errors"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
