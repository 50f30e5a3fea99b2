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
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def rss_mb(server: subprocess.Popen, log_path: str) -> float:
    """The running app server's resident memory in MB. Raises `RuntimeError` saying that the server exited, with its
    exit code and the tail of its log, when it has (an exited process that is not yet reaped has no VmRSS)."""
    try:
        with open(f"/proc/{server.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    raise server_exited(server, log_path)


def server_exited(server: subprocess.Popen, log_path: str) -> RuntimeError:
    """The error for an app server that exited: its exit code (a negative code: the signal that ended it) and the
    tail of its log."""
    code = server.wait(timeout=30)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-3000:]
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return RuntimeError(f"the app server (pid {server.pid}) exited ({how}); the end of its log {log_path}:\n{tail}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, port: int, concurrency: int, log_path: str) -> subprocess.Popen:
    """``arr-coc app`` in a subprocess on ``port`` (its output in ``log_path``), once it answers. Raises
    `RuntimeError` when the port is taken already (another server would answer in its place while this one exits),
    when the server exits (`server_exited`) or does not answer within 300 s."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: only a listener blocks
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise RuntimeError(f"port {port} on 127.0.0.1 is in use ({error.strerror}): pass another port, or 0 for "
                               "a free one") from error  # fmt: skip
    exe = os.path.join(os.path.dirname(sys.executable), "arr-coc")
    cmd = [exe, "app", "--model", model, "--port", str(port), "--concurrency", str(concurrency), "--queue-size", "256"]
    # a few malloc arenas: threads of a long-running server otherwise each grow their own; its log unbuffered
    env = dict(os.environ, MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"), PYTHONUNBUFFERED="1")
    # the server's log goes to a file: an undrained pipe fills up and blocks the server's event loop
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    import urllib.request

    while time.time() < deadline:
        if proc.poll() is not None:
            raise server_exited(proc, log_path)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"the app did not start within 300 s; its log: {log_path}")


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

    log_path, port = os.path.join(workdir, "server.log"), port or free_port()
    server = start_server(model, port, concurrency, log_path)
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
        warm_rss = rss_mb(server, log_path)
        started = time.time()
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            burst = list(pool.map(request, range(concurrent)))
        burst_rss = rss_mb(server, log_path)
        sequence, trace = [], []
        for i in range(sequential):
            sequence.append(request(i))
            if i % max(1, sequential // 10) == 0:
                trace.append(round(rss_mb(server, log_path), 1))
        wall = time.time() - started
        end_rss = rss_mb(server, log_path)
        stats = Client(client_url, verbose=False).predict(api_name="/stats")
    except Exception as error:  # a client that lost its server: say that the server exited, and how
        if server.poll() is not None:
            raise server_exited(server, log_path) from error
        raise
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
    parser.add_argument("--port", type=int, default=7899, help="the server's port on 127.0.0.1 (0: a free one)")
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
