"""What the benchmarks measure: this machine's read bandwidth, an engine's prefill/decode speed, peak RSS;
and the helpers their workers and tables share."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BANDWIDTH_BYTES = 1 << 30


def measure_bandwidth(threads: int, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: `threads` threads summing disjoint parts of a 1 GiB array (numpy
    releases the GIL in reductions); the median of `repeats` passes (a shared machine has outliers
    both ways)."""
    data = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    with ThreadPoolExecutor(threads) as pool:
        return float(np.median([read_pass(pool, data, threads) for _ in range(repeats)]))


def read_pass(pool, data: np.ndarray, threads: int) -> float:
    """GB/s of one pass of `threads` threads summing disjoint parts of `data`."""
    start = time.perf_counter()
    list(pool.map(np.sum, np.array_split(data, threads)))
    return data.nbytes / (time.perf_counter() - start) / 1e9


def own_prompt(vocab_size: int, n: int, index: int) -> list[int]:
    """Prompt number `index` of a run: n tokens no other index shares (a server would reuse a shared
    start as a cached prefix)."""
    return [(t + 7919 * index) % min(vocab_size, 30000) for t in prompt_ids(vocab_size, n)]


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(0, min(vocab_size, 30000), n).tolist()


def time_engine(prefill, decode, vocab_size: int, prompt: int, gen: int) -> dict:
    prefill(prompt_ids(vocab_size, 8))  # warm up: first calls allocate
    decode(1)
    ids = prompt_ids(vocab_size, prompt)
    start = time.perf_counter()
    logits = prefill(ids)
    prefill_s = time.perf_counter() - start
    token = int(np.argmax(logits))
    ttft_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen):
        token = int(np.argmax(decode(token)))
    decode_s = time.perf_counter() - start
    return {"prefill_tok_s": prompt / prefill_s, "ttft_s": ttft_s, "decode_tok_s": gen / decode_s}


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's high-water mark across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_subprocess(module: str, what: str, args: list[str], env: dict | None = None):
    """Run `python -m module args` in a fresh process (its own peak RSS, its own thread setting);
    return the JSON it prints last."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{what} benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fixed(value, width: int, digits: int) -> str:
    """A table cell: the number with `digits` decimals, or '-' when there is none."""
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"
