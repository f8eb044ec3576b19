"""`bitcompile bench --concurrency N,... --http`: the same N concurrent requests through the HTTP
server (`bitcompile serve` in its own process, streaming clients on loopback), to compare with the
engine called directly (bench_concurrency.py) in the same run: what the HTTP layer costs.

Throughput on both sides is generated tokens over the time from the first request to the last
token; the clients' latencies are measured where they see them (SSE chunks).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .timing import own_prompt, prompt_ids


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, prompt: list[int], gen: int) -> dict:
    import httpx

    body = {"prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"start": start, "times": times, "tokens": tokens}


def run_http(artifact, threads: int, ns: list[int], prompt: int, gen: int, say=print) -> list[dict]:
    """Start the server (max batch: the largest N), then N streaming clients at once for each N."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "TVM_USE_RUNTIME_LIB": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    server = subprocess.Popen([sys.executable, "-m", "bitcompile.cli", "serve", str(artifact), "--port", str(port),
                               "--max-batch", str(max(ns)), "--context", str(prompt + gen + 16)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, server)
        vocab = json.loads((Path(artifact) / "manifest.json").read_text())["model"]["vocab_size"]
        _stream(url, prompt_ids(vocab, 8), 2)  # warm up
        rows = []
        for n in ns:
            say(f"running {n} concurrent HTTP stream(s)...")
            # prompts of their own per run: the server keeps finished prompts as prefixes to reuse
            prompts = [own_prompt(vocab, prompt, i + 1000 * n) for i in range(n)]
            results = [None] * n

            def client(i):
                results[i] = _stream(url, prompts[i], gen)

            clients = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            rows.append({"n": n, "mode": "http", **_http_rates(results), "peak_rss_mb": _peak_rss_mb(server.pid)})
        return rows
    finally:
        server.terminate()
        server.wait(timeout=60)


def _http_rates(results: list[dict]) -> dict:
    start = min(r["start"] for r in results)
    end = max(r["times"][-1] for r in results)
    ttft = [r["times"][0] - r["start"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"throughput_tok_s": sum(r["tokens"] for r in results) / (end - start),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_s": float(np.percentile(gaps, 50)) if gaps else None,
            "itl_p99_s": float(np.percentile(gaps, 99)) if gaps else None}


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300):
    """Until GET url/health answers 200 (a server's readiness); RuntimeError if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            said = server.stderr.read().decode()[-2000:] if server.stderr else ""
            raise RuntimeError(f"the HTTP server exited with {server.returncode}\n{said}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the HTTP server at {url} did not become healthy in {timeout} s")


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def format_http(rows: list[dict], engine_rows: list[dict]) -> list[str]:
    direct = {r["n"]: r for r in engine_rows if r["mode"] == "burst"}
    head = (f"{'n':>3s} {'HTTP tok/s':>10s} {'engine tok/s':>12s} {'HTTP cost':>9s} {'TTFT p50/p99 s':>15s} "
            f"{'ITL p50/p99 ms':>15s}")
    lines = ["the same requests through the HTTP server (streaming clients on loopback):", head, "-" * len(head)]
    for r in rows:
        e = direct.get(r["n"], {}).get("throughput_tok_s")
        cost = f"{100 * (1 - r['throughput_tok_s'] / e):8.1f}%" if e else f"{'-':>9s}"
        itl = f"{1e3 * r['itl_p50_s']:.1f}/{1e3 * r['itl_p99_s']:.1f}" if r["itl_p50_s"] is not None else "-"
        lines.append(f"{r['n']:3d} {r['throughput_tok_s']:10.2f} {e if e else float('nan'):12.2f} {cost} "
                     f"{r['ttft_p50_s']:7.3f}/{r['ttft_p99_s']:<7.3f} {itl:>15s}")
    return lines
