#!/usr/bin/env python3
"""Check and time a CUDA artifact on the GPU machine against results saved from the CPU build.

  # build machine: the CPU build's logits and greedy tokens for fixed inputs
  python scripts/cuda_device_check.py reference tiny-host.bitc -o cpu.npz
  # GPU machine (runtime-only TVM is enough: see README, "Running on an NVIDIA GPU")
  python scripts/cuda_device_check.py check tiny-sm90.bitc --reference cpu.npz --json result.json

`check` loads the artifact on GPU 0, compares its logits (max error relative to max |logit|, the
tests' 1e-3) and its greedy tokens with the CPU build's, times prefill and decode (median of runs),
and, when torch is installed, a bf16 GEMV of every linear shape of one decode step for comparison.
Prints a table and the same numbers as JSON; exits 1 when the results differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's bitcompile
TOLERANCE = 1e-3  # of max |logit|, as tests/test_compiled_model.py
PROMPT_TOKENS = 64
GREEDY_TOKENS = 32


def _torch():
    """torch first when present: it makes libcudart.so.13 loadable for TVM's CUDA runtime."""
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def _load(artifact: str):
    import bitcompile

    return bitcompile.load(artifact)


def _inputs(engine) -> list[int]:
    return np.random.default_rng(7).integers(0, engine.config.vocab_size, PROMPT_TOKENS).tolist()


def _greedy(engine, prompt: list[int]) -> list[int]:
    tokens, logits = [], engine.prefill(prompt)
    for _ in range(GREEDY_TOKENS):
        tokens.append(int(np.argmax(logits)))
        logits = engine.step(tokens[-1])
    return tokens


def cmd_reference(args):
    engine = _load(args.artifact)
    ids = _inputs(engine)
    np.savez(args.output, ids=np.asarray(ids), logits=engine.logits(ids), greedy=np.asarray(_greedy(engine, ids)))
    print(f"wrote {args.output}")


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm up (first call captures the CUDA graphs)
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def time_engine(engine, prompt_tokens: int, decode_tokens: int, repeat: int) -> dict:
    rng = np.random.default_rng(1)
    prompt, steps = (rng.integers(0, engine.config.vocab_size, n).tolist() for n in (prompt_tokens, decode_tokens))
    prefill = _median_seconds(lambda: engine.prefill(prompt), repeat)

    def decode():
        engine.prefill(prompt[:8])
        start = time.perf_counter()
        for token in steps:
            engine.step(token)
        return time.perf_counter() - start

    decode()
    step = statistics.median(decode() for _ in range(repeat)) / decode_tokens
    return {"prefill_tokens": prompt_tokens, "prefill_ms": prefill * 1e3, "prefill_tok_s": prompt_tokens / prefill,
            "decode_ms_per_token": step * 1e3, "decode_tok_s": 1 / step}


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of the matrices one decode step multiplies (q/k/v and gate/up fused, as compiled)."""
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size), "o": (cfg.hidden_size, cfg.q_size),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
            "lm_head": (cfg.vocab_size, cfg.hidden_size)}


def time_torch_gemv(torch, cfg, repeat: int = 200) -> dict:
    """bf16 matrix x vector on the GPU for each shape (CUDA events), and one decode step's sum."""
    out = {}
    for name, (n, k) in linear_shapes(cfg).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(k, 1, device="cuda", dtype=torch.bfloat16)
        for _ in range(10):
            w @ x
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            w @ x
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / repeat
        out[name] = {"shape": [n, k], "us": us, "GB_s": n * k * 2 / us / 1e3}
    per_layer = sum(out[n]["us"] for n in ("qkv", "o", "gate_up", "down"))
    out["decode_step_linears_us"] = per_layer * cfg.num_hidden_layers + out["lm_head"]["us"]
    return out


def compare(engine, reference: dict) -> dict:
    ids = reference["ids"].tolist()
    got, want = engine.logits(ids), reference["logits"]
    greedy = _greedy(engine, ids)
    same = next((i for i, (a, b) in enumerate(zip(greedy, reference["greedy"].tolist())) if a != b), len(greedy))
    err = float(np.abs(got - want).max() / np.abs(want).max())
    return {"logits_rel_err": err, "logits_ok": err <= TOLERANCE, "greedy_equal_prefix": same,
            "greedy_ok": same == len(greedy)}


def cmd_check(args):
    torch = _torch()
    engine = _load(args.artifact)
    import tvm

    result = {"artifact": args.artifact, "device": tvm.cuda(0).device_name, "target": engine.manifest["target"]["name"]}
    if args.reference:
        result |= compare(engine, dict(np.load(args.reference)))
    result |= time_engine(engine, args.prompt, args.decode, args.repeat)
    if torch is not None:
        result["torch_bf16_gemv"] = time_torch_gemv(torch, engine.config)
    print_table(result)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result.get("logits_ok", True) and result.get("greedy_ok", True) else 1


def print_table(r: dict):
    rows = [("device", r["device"]), ("target", r["target"])]
    if "logits_ok" in r:
        rows += [("logits vs CPU (max err / max|logit|)", f"{r['logits_rel_err']:.2e} "
                                                          f"({'ok' if r['logits_ok'] else 'FAIL'})"),
                 ("greedy tokens equal to CPU", f"{r['greedy_equal_prefix']}/{GREEDY_TOKENS} "
                                                f"({'ok' if r['greedy_ok'] else 'FAIL'})")]
    rows += [(f"prefill {r['prefill_tokens']} tokens", f"{r['prefill_ms']:.2f} ms ({r['prefill_tok_s']:.0f} tok/s)"),
             ("decode", f"{r['decode_ms_per_token']:.3f} ms/token ({r['decode_tok_s']:.0f} tok/s)")]
    for name, t in r.get("torch_bf16_gemv", {}).items():
        rows.append((f"torch bf16 GEMV {name} {t['shape'] if isinstance(t, dict) else ''}",
                     f"{t['us']:.1f} us ({t['GB_s']:.0f} GB/s)" if isinstance(t, dict) else f"{t:.0f} us"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:{width}s}  {value}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reference", help="save the CPU build's logits and greedy tokens")
    r.add_argument("artifact")
    r.add_argument("-o", "--output", required=True, help=".npz to write")
    r.set_defaults(func=cmd_reference)
    c = sub.add_parser("check", help="compare and time a CUDA artifact on GPU 0")
    c.add_argument("artifact")
    c.add_argument("--reference", help=".npz from `reference` (omit to time only)")
    c.add_argument("--prompt", type=int, default=128, help="prefill tokens timed (default 128)")
    c.add_argument("--decode", type=int, default=64, help="decode steps timed per run (default 64)")
    c.add_argument("--repeat", type=int, default=5, help="runs; the median is reported (default 5)")
    c.add_argument("--json", help="also write the results here")
    c.set_defaults(func=cmd_check)
    args = p.parse_args(argv)
    if args.command == "check":
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone, as on a deployment machine
    try:
        sys.exit(args.func(args) or 0)
    except ValueError as e:  # bitcompile's refusals (no GPU, wrong arch, bad artifact) name the fix
        sys.exit(f"cuda_device_check: error: {e}")


if __name__ == "__main__":
    main()
