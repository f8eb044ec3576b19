"""`bitcompile bench ART` for an artifact compiled for an NVIDIA GPU (runs on the GPU machine).

The same rows as on a CPU, related to the GPU's own yardstick: a device-to-device copy measured in
the same run (bytes read + written per second). With PyTorch present it adds what only a profiler
can see and the reference row: GPU time of every kernel of one decode step (CUPTI through torch's
profiler sees all kernels in the process, those inside CUDA graphs too), the ternary linears' share
of it, and torch bf16 running the linears of one decode step (every layer its own weights), eager
and as one CUDA graph.
"""

from __future__ import annotations

import os
import statistics
import time

COPY_BYTES = 1 << 30


def import_torch():
    """torch, when installed and it sees a GPU; imported before TVM's CUDA runtime it also makes
    libcudart.so.13 loadable for it."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def copy_bandwidth(tvm, device, repeat: int = 20) -> float:
    """GB/s of a 1 GiB device-to-device copy through the TVM runtime, counting read + written bytes."""
    a = tvm.runtime.empty((COPY_BYTES,), "uint8", device)
    b = tvm.runtime.empty((COPY_BYTES,), "uint8", device)
    for _ in range(3):
        a.copyto(b)
    device.sync()
    start = time.perf_counter()
    for _ in range(repeat):
        a.copyto(b)
    device.sync()
    return 2 * COPY_BYTES * repeat / (time.perf_counter() - start) / 1e9


def profile_decode(torch, engine, steps: int = 8) -> dict:
    """GPU microseconds per decode step of each kernel (by TVM function name), the host's cost of
    issuing a step, and the CUDA API calls it makes."""
    from torch.profiler import ProfilerActivity, profile

    engine.prefill(list(range(1, 65)))
    for t in range(3):
        engine.step(t + 5)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(steps):
            engine.step(t + 10)
        torch.cuda.synchronize()
    kernels, api = {}, {}
    for e in prof.events():
        table = kernels if e.device_type.name == "CUDA" else api if e.name.startswith("cu") else None
        if table is not None:
            row = table.setdefault(e.name, {"us": 0.0, "calls": 0.0})
            row["us"] += (e.device_time if table is kernels else e.cpu_time_total) / steps
            row["calls"] += 1 / steps
    issue, whole = [], []
    for t in range(16):  # host time to issue a step, and to have its logits back
        start = time.perf_counter()
        out = engine._run("decode", [t + 20])
        issue.append(time.perf_counter() - start)
        out.numpy()
        whole.append(time.perf_counter() - start)
    by_time = lambda table: dict(sorted(table.items(), key=lambda kv: -kv[1]["us"]))  # noqa: E731
    return {"kernels": by_time(kernels), "host_api": by_time(api),
            "host_issue_us": statistics.median(issue) * 1e6, "step_us": statistics.median(whole) * 1e6}


def ternary_weight_bytes(manifest: dict) -> int:
    return sum(p["nbytes"] for name, p in manifest["params"].items() if name.endswith("_proj.weight"))


def time_torch_decode_linears(torch, cfg, repeat: int = 20) -> dict:
    """torch bf16 doing the linears of one decode step (nothing else: a lower bound on its step),
    eager and as one CUDA graph; every layer has its own weights, so nothing is served from L2."""
    shapes = cfg.fused_linear_shapes()
    layers = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for name, (n, k) in shapes.items()}
              for _ in range(cfg.num_hidden_layers)]
    head = torch.randn(cfg.vocab_size, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    inputs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes.values()}

    def step():
        for layer in layers:
            for w in layer.values():
                torch.nn.functional.linear(inputs[w.shape[1]], w)
        torch.nn.functional.linear(inputs[head.shape[1]], head)

    def ms_per_call(fn):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeat

    eager = ms_per_call(step)
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    graphed = ms_per_call(graph.replay)
    nbytes = sum(w.numel() * 2 for layer in layers for w in layer.values()) + head.numel() * 2
    return {"eager_ms": eager, "graph_ms": graphed, "bytes": nbytes}


def gpu_worker(path: str, repeat: int, prompt: int, gen: int) -> dict:
    """Runs inside bench's subprocess: the artifact on GPU 0, timed like the CPU engines (the median of
    `repeat` runs in this one process: a GPU context and the weights take longer to load than a run),
    plus the copy bandwidth and (with torch) the kernel profile and the torch bf16 reference."""
    from .timing import peak_rss_mb, time_engine

    torch = import_torch()
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # as deployed: the runtime without the compiler
    from ..runtime.engine import Engine

    engine = Engine(path, context_length=max(prompt + gen + 16, 80))
    runs = [time_engine(engine.prefill, engine.step, engine.config.vocab_size, prompt, gen) for _ in range(repeat)]
    result = {key: float(statistics.median(r[key] for r in runs)) for key in runs[0]}
    result["peak_rss_mb"] = peak_rss_mb()
    result["device_name"] = engine.device.device_name
    result["copy_gbps"] = copy_bandwidth(engine._tvm, engine.device)
    if torch is not None:
        result["gpu_mem_mb"] = (lambda free, total: (total - free) / 2**20)(*torch.cuda.mem_get_info())
        result["profile"] = profile_decode(torch, engine)
        result["torch_bf16"] = time_torch_decode_linears(torch, engine.config)
    return result


def gpu_report(r: dict, manifest: dict, bytes_per_token: float, options: dict) -> dict:
    """bench's report (same keys as on a CPU) from one gpu_worker result."""
    copy = r["copy_gbps"]
    gbps = bytes_per_token * r["decode_tok_s"] / 1e9
    runs = [{"engine": "bitcompile", "threads": 0, "device": r["device_name"],
             **{k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb")},
             **({"gpu_mem_mb": r["gpu_mem_mb"]} if "gpu_mem_mb" in r else {}),
             "bytes_per_token": bytes_per_token, "gbps": gbps, "floor_fraction": gbps / copy, "options": options}]
    report = {"bandwidth_gbps": copy, "bandwidth_by_threads": {}, "bandwidth_kind": "GPU device-to-device copy",
              "device": r["device_name"], "runs": runs, "kernels": []}
    if "torch_bf16" in r:
        t = r["torch_bf16"]
        for mode in ("graph", "eager"):
            tok_s = 1e3 / t[f"{mode}_ms"]
            runs.append({"engine": f"torch-bf16-{mode}", "threads": 0, "device": r["device_name"],
                         "prefill_tok_s": None, "decode_tok_s": tok_s, "ttft_s": None, "peak_rss_mb": None,
                         "bytes_per_token": t["bytes"], "gbps": t["bytes"] * tok_s / 1e9,
                         "floor_fraction": t["bytes"] * tok_s / 1e9 / copy,
                         "options": {"what": "only the linears of one decode step, bf16, "
                                             + ("one CUDA graph" if mode == "graph" else "eager launches")}})
        profile = r["profile"]
        ternary_us = sum(k["us"] for name, k in profile["kernels"].items() if name.startswith("ternary_matmul"))
        weights = ternary_weight_bytes(manifest)
        report["kernels"].append({"kernel": "ternary linears of a decode step", "threads": 0, "us": ternary_us,
                                  "weight_bytes": weights, "gbps": weights / ternary_us / 1e3,
                                  "floor_fraction": weights / ternary_us / 1e3 / copy, "tuned": True})
        report["profile"] = profile
    return report


def format_gpu_lines(report: dict) -> list[str]:
    lines = []
    by = {r["engine"]: r for r in report["runs"]}
    ours = by["bitcompile"]
    for mode in ("graph", "eager"):
        if f"torch-bf16-{mode}" in by:
            lines.append(f"decode {ours['decode_tok_s'] / by[f'torch-bf16-{mode}']['decode_tok_s']:.2f}x torch bf16 "
                         f"({by[f'torch-bf16-{mode}']['options']['what']})")
    profile = report.get("profile")
    if profile:
        total = sum(k["us"] for k in profile["kernels"].values())
        lines.append(f"one decode step: GPU kernels {total:.0f} us; the host issues it in "
                     f"{profile['host_issue_us']:.0f} us and has its logits after {profile['step_us']:.0f} us")
        for name, k in list(profile["kernels"].items())[:12]:
            lines.append(f"  {name[:56]:56s} {k['us']:8.1f} us {k['calls']:5.1f} calls")
        for k in report["kernels"]:
            lines.append(f"{k['kernel']}: {k['us']:.1f} us, {k['gbps']:.0f} GB/s, "
                         f"{100 * k['floor_fraction']:.1f}% of the copy bandwidth")
    return lines
