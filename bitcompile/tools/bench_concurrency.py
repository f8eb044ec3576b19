"""`bitcompile bench --concurrency 1,4,8,16`: N requests at once through the continuous-batching
scheduler, each with its own prompt, beside concurrency 1 of the same artifact in the same run.

Each (N, arrival mode) runs in its own process (its own peak RSS). "burst": all N arrive together;
the aggregate decode rate is counted while all N are generating (from the last first token to the
first finish). "staggered": arrivals spread over one concurrency-1 request's lifetime; the rate is
every token after each first one over the whole span. Latencies: time to first token from submit,
and every gap between a request's consecutive tokens (p50, p99).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from .timing import fixed, in_subprocess, own_prompt, peak_rss_mb

MODES = ("burst", "staggered")


def concurrency_worker(path: str, threads: int, n: int, mode: str, prompt: int, gen: int, gap_s: float,
                       prefill_chunk: int = 128) -> dict:
    """Runs inside the subprocess: N requests through one engine; their latencies and rates."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # as deployed: the runtime without the compiler
    from ..runtime.engine import Engine

    engine = Engine(path, context_length=prompt + gen + 16, max_batch=n, prefill_chunk=prefill_chunk)
    vocab = engine.config.vocab_size
    prompts = [own_prompt(vocab, prompt, i) for i in range(n)]
    engine.submit(prompts[0][:8], max_new_tokens=2, temperature=0).result()  # warm up: first calls allocate
    engine.drop_prefixes()
    # the yardstick every row is given (run_concurrency): concurrency 1's; the other processes skip it
    prefill_tok_s = prefill_rate(engine, prompts[0]) if n == 1 else None
    start = time.perf_counter()
    handles = []
    if mode == "burst":
        with engine._lock:  # no step starts before all N are in
            handles = [engine.submit(p, max_new_tokens=gen, temperature=0) for p in prompts]
    for i, p in enumerate(prompts[len(handles):]):
        time.sleep(max(0.0, start + i * gap_s - time.perf_counter()))
        handles.append(engine.submit(p, max_new_tokens=gen, temperature=0))
    for h in handles:
        h.result()
    status = engine._scheduler.status()
    engine.close()
    last = max(h.token_times[-1] for h in handles)
    return {"n": n, "mode": mode, **_rates(handles, mode), "prefill_tok_s": prefill_tok_s,
            "throughput_tok_s": sum(h.completion_tokens for h in handles) / (last - start),
            "peak_rss_mb": peak_rss_mb(), "prefix_hits": status["prefix_hits"], "steps": status["steps"],
            "duration_s": max(h.finished_at for h in handles) - start}


def prefill_rate(engine, prompt: list[int], runs: int = 3) -> float:
    """The single-sequence prefill rate (tok/s): the median of `runs` timed prefills of `prompt`
    after an untimed one. The first call of the prefill function at a prompt's length allocates
    (2B-4T shape, 128 tokens: 174 tok/s first, 187-189 after), and one sample of a ~0.7 s call
    swings with the machine; this rate is the yardstick of the batched decode rates."""
    rates = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        engine.prefill(prompt)
        rates.append(len(prompt) / (time.perf_counter() - start))
        engine.release()
    return float(np.median(rates[1:]))


def _rates(handles, mode: str) -> dict:
    firsts = [h.token_times[0] for h in handles]
    begin, end = max(firsts), min(h.token_times[-1] for h in handles)
    if mode != "burst" or end <= begin:  # not all N generating at one time: the whole span
        begin, end = min(firsts), max(h.token_times[-1] for h in handles)
    tokens = sum(1 for h in handles for t in h.token_times[1:] if begin < t <= end)
    gaps = [g for h in handles for g in h.inter_token_s]
    ttft = [h.ttft_s for h in handles]
    return {"aggregate_decode_tok_s": tokens / (end - begin) if end > begin else None,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "itl_p50_s": float(np.percentile(gaps, 50)) if gaps else None,
            "itl_p99_s": float(np.percentile(gaps, 99)) if gaps else None}


def run_concurrency(artifact, threads: int, ns: list[int], prompt: int, gen: int, say=print,
                    prefill_chunk: int = 128, repeat: int = 1) -> list[dict]:
    """Concurrency 1 first (its request's lifetime spaces the staggered arrivals), then each N in both
    arrival modes; every row carries concurrency 1's prefill rate and its decode speedup over it.
    repeat > 1: that many rounds of all rows, each run a process of its own; each figure of a row is
    its median over the rounds (this machine's speed differs from one process to the next)."""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}

    def run(n: int, mode: str, gap: float) -> dict:
        say(f"running {n} concurrent request(s), {mode}...")
        return in_subprocess(__name__, "concurrency", [str(artifact), str(threads), str(n), mode, str(prompt),
                                                       str(gen), str(gap), str(prefill_chunk)], env=env)

    rounds = []
    for _ in range(repeat):
        single = run(1, "burst", 0.0)
        rounds.append([single] + [run(n, mode, 0.0 if mode == "burst" else single["duration_s"] / n)
                                  for n in ns if n != 1 for mode in MODES])
    rows = [_median_row(runs) for runs in zip(*rounds)]
    single = rows[0]
    for row in rows:
        row["threads"], row["prefill_chunk"], row["repeat"] = threads, prefill_chunk, repeat
        row["prefill_tok_s"] = single["prefill_tok_s"]  # the same run's single-sequence prefill rate
        ok = row["aggregate_decode_tok_s"] and single["aggregate_decode_tok_s"]
        row["vs_concurrency_1"] = row["aggregate_decode_tok_s"] / single["aggregate_decode_tok_s"] if ok else None
    return rows


def _median_row(runs: tuple[dict, ...]) -> dict:
    """One row from its runs: the median of each figure (peak RSS: the largest), and the decode rate
    of every run (aggregate_decode_runs)."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
            row[key] = max(values) if key == "peak_rss_mb" else type(value)(np.median(values))
    row["aggregate_decode_runs"] = [r["aggregate_decode_tok_s"] for r in runs]
    return row


def format_concurrency(rows: list[dict], prompt: int, gen: int) -> list[str]:
    head = (f"{'n':>3s} {'arrivals':9s} {'decode tok/s':>12s} {'x n=1':>6s} {'% prefill':>9s} {'TTFT p50/p99 s':>15s} "
            f"{'ITL p50/p99 ms':>15s} {'peak RSS MB':>11s} {'prefix hits':>11s}")
    repeat = rows[0].get("repeat", 1)
    lines = [f"concurrent requests ({rows[0]['threads']} threads; prompt {prompt} tokens in chunks of "
             f"{rows[0]['prefill_chunk']}, {gen} generated each; "
             f"single-sequence prefill {rows[0]['prefill_tok_s']:.1f} tok/s"
             + (f"; medians of {repeat} rounds, each run its own process" if repeat > 1 else "") + "):",
             head, "-" * len(head)]
    for r in rows:
        rate = r["aggregate_decode_tok_s"]
        itl = f"{1e3 * r['itl_p50_s']:.1f}/{1e3 * r['itl_p99_s']:.1f}" if r["itl_p50_s"] is not None else "-"
        lines.append(f"{r['n']:3d} {r['mode']:9s} {fixed(rate, 12, 2)} {fixed(r['vs_concurrency_1'], 6, 2)} "
                     f"{fixed(rate and 100 * rate / r['prefill_tok_s'], 8, 1)}% "
                     f"{r['ttft_p50_s']:7.3f}/{r['ttft_p99_s']:<7.3f} {itl:>15s} {r['peak_rss_mb']:11.0f} "
                     f"{r['prefix_hits']:11d}")
    return lines


if __name__ == "__main__":
    path, threads, n, mode, prompt, gen, gap, *chunk = sys.argv[1:9]
    print(json.dumps(concurrency_worker(path, int(threads), int(n), mode, int(prompt), int(gen), float(gap),
                                        *map(int, chunk))))
