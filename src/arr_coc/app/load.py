"""Load test for the web app on loopback: concurrent and sequential requests, malformed uploads mixed in.

    python -m arr_coc.app.load --model arr-coc-tiny --concurrent 50 --sequential 500 --out docs/results/app_load.json

Starts ``arr-coc app`` in a subprocess, warms it up, reads its resident memory, fires the requests through
gradio_client, and reports failures, p50/p99 latency, the server's peak number of requests in flight
(its queue's concurrency limit), and resident memory after the run against after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def start_server(model: str, port: int, concurrency: int, log_path: str) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "arr-coc")
    cmd = [exe, "app", "--model", model, "--port", str(port), "--concurrency", str(concurrency), "--queue-size", "256"]
    # a few malloc arenas: threads of a long-running server otherwise each grow their own
    env = dict(os.environ, MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"))
    # the server's log goes to a file: an undrained pipe fills up and blocks the server's event loop
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    import urllib.request

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}: {open(log_path).read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("the app did not start within 300 s")


def run_load(model: str, concurrent: int, sequential: int, malformed_every: int = 10, port: int = 7899,
             concurrency: int = 2, workdir: str = "/tmp/arr-coc-load", warmup: int = 50) -> dict:  # fmt: skip
    from gradio_client import Client, handle_file

    from ..data.synthetic import eval_seeds, generate

    os.makedirs(workdir, exist_ok=True)
    samples = []
    for i, seed in enumerate(eval_seeds(8)):
        s = generate("box-codes" if i % 2 else "doc-fields", seed)
        path = os.path.join(workdir, f"sample-{i}.png")
        s["image"].save(path)
        samples.append((path, s["question"]))
    bad = os.path.join(workdir, "not-an-image.png")
    with open(bad, "w") as f:
        f.write("this is text, not an image")

    server = start_server(model, port, concurrency, os.path.join(workdir, "server.log"))
    try:
        client_url = f"http://127.0.0.1:{port}/"

        def request(i: int) -> tuple[bool, bool, float, str]:
            """(expected_to_fail, failed, seconds, error)."""
            malformed = malformed_every and i % malformed_every == malformed_every - 1
            path, question = (bad, "What is this?") if malformed else samples[i % len(samples)]
            client = Client(client_url, verbose=False)
            start = time.perf_counter()
            try:
                client.predict(handle_file(path), question, "ratio", 64, 8, api_name="/ask")
                return malformed, False, time.perf_counter() - start, ""
            except Exception as error:  # a refused upload comes back as an error, by design
                return malformed, True, time.perf_counter() - start, str(error)[:200]

        # warm-up: the run's own traffic at a smaller scale (a concurrent burst, then sequential requests,
        # malformed uploads mixed in), so memory is compared in the steady state every kind of request reaches
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            list(pool.map(request, range(concurrent)))
        for i in range(warmup):
            request(i)
        warm_rss = rss_mb(server.pid)
        started = time.time()
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            burst = list(pool.map(request, range(concurrent)))
        burst_rss = rss_mb(server.pid)
        sequence, trace = [], []
        for i in range(sequential):
            sequence.append(request(i))
            if i % max(1, sequential // 10) == 0:
                trace.append(round(rss_mb(server.pid), 1))
        wall = time.time() - started
        end_rss = rss_mb(server.pid)
        stats = Client(client_url, verbose=False).predict(api_name="/stats")
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = burst + sequence
    good = [r for r in results if not r[0]]
    latencies = sorted(r[2] for r in good)
    unexpected = [r[3] for r in results if r[0] != r[1]]
    return {
        "model": model, "concurrent": concurrent, "sequential": sequential, "warmup": concurrent + warmup,
        "malformed": sum(r[0] for r in results),
        "unexpected_outcomes": len(unexpected), "examples_of_unexpected": unexpected[:5],
        "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "wall_s": round(wall, 1), "concurrency_limit": concurrency, "server_peak_in_flight": stats["peak_active"],
        "server_served": stats["served"], "server_refused": stats["refused"],
        "rss_after_warmup_mb": round(warm_rss, 1), "rss_after_run_mb": round(end_rss, 1),
        "rss_growth": round(end_rss / warm_rss - 1, 4), "rss_after_burst_mb": round(burst_rss, 1), "rss_trace_mb": trace,
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="arr-coc-tiny")
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--malformed-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=50, help="sequential warm-up requests after a warm-up burst")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--port", type=int, default=7899)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = run_load(
        args.model,
        args.concurrent,
        args.sequential,
        args.malformed_every,
        args.port,
        args.concurrency,
        warmup=args.warmup,
    )
    text = json.dumps(result, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0 if result["unexpected_outcomes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
