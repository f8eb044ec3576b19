"""`bitcompile bench`: bitcompile against ONNX Runtime on the same model, same machine, one run.

Each engine runs in its own subprocess (its own peak RSS, its own thread setting). Decode speed is
related to this machine's measured read bandwidth: bytes each decoded token must read (weights +
KV cache) x tokens/s = achieved GB/s, and its fraction of the floor.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .timing import (
    fixed,
    in_subprocess,
    measure_bandwidth,
    peak_rss_mb,
    read_pass,
    time_engine,
)


def worker(engine: str, path: str, threads: int, prompt: int, gen: int) -> dict:
    """Runs inside the subprocess: load one engine, time it, report peak RSS."""
    context = prompt + gen + 16
    if engine == "bitcompile":
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # as deployed: the runtime without the compiler
        from ..runtime.engine import Engine

        e = Engine(path, context_length=context)
        result = time_engine(e.prefill, e.step, e.config.vocab_size, prompt, gen)
    else:
        from .baseline_ort import OrtEngine

        e = OrtEngine(path, threads=threads, context_length=context)
        result = time_engine(e.prefill, e.decode, e.vocab_size, prompt, gen)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def gemv_worker(config_json: str, threads: int, rounds: int = 21) -> list[dict]:
    """Runs inside a subprocess (TVM_NUM_THREADS set before TVM starts): each decode GEMV alone,
    in rounds that alternate a pass of the kernel with a read-bandwidth pass, so each kernel pass is
    compared with the bandwidth of the same moment (a neighbour's burst on a shared machine moves
    both). Per kernel: median seconds per call, and the median of the per-round fractions."""
    from ..compiler.tune import STREAM_BYTES, decode_gemv_kernels
    from ..model.config import ModelConfig

    data = np.ones(STREAM_BYTES // 2, dtype=np.float32)  # 256 MiB: far beyond L3, read in about as long as a pass
    rows = []
    with ThreadPoolExecutor(threads) as pool:
        read_pass(pool, data, threads)  # warm up: the pool's threads, the array's pages
        for info, one_pass in decode_gemv_kernels(ModelConfig.from_dict(json.loads(config_json))):
            seconds, fractions = [], []
            for _ in range(rounds):
                bandwidth = read_pass(pool, data, threads)
                seconds.append(one_pass())
                fractions.append(info["weight_bytes"] / seconds[-1] / 1e9 / bandwidth)
            rows.append({**info, "us": float(np.median(seconds)) * 1e6, "floor_fraction": float(np.median(fractions))})
    return rows


def measure_gemvs(cfg, threads: int) -> list[dict]:
    """The model's decode GEMV kernels alone (gemv_worker), with GB/s; the last row is all of them
    together (one layer's GEMV time), its fraction the byte-weighted one."""
    rows = in_subprocess(__name__, "GEMV kernel", ["gemv", json.dumps(cfg.to_dict()), str(threads)],
                          env={**os.environ, "TVM_NUM_THREADS": str(threads)})
    total_us = sum(r["us"] for r in rows)
    rows.append({"kernel": "all decode GEMVs of a layer", "weight_bytes": sum(r["weight_bytes"] for r in rows),
                 "us": total_us, "tuned": all(r["tuned"] for r in rows),
                 "floor_fraction": sum(r["floor_fraction"] * r["us"] for r in rows) / total_us})
    for r in rows:
        r["threads"] = threads
        r["gbps"] = r["weight_bytes"] / r["us"] / 1e3
    return rows


def _run_worker(engine: str, path: Path, threads: int, prompt: int, gen: int) -> dict:
    return in_subprocess(__name__, engine, [engine, str(path), str(threads), str(prompt), str(gen)])


def kv_bytes_per_token(cfg, context: float, bytes_per_value: int = 4) -> float:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value * context


def bitcompile_weight_bytes(manifest: dict) -> int:
    """Bytes of parameters a decoded token reads: all, except the embedding table when a separate
    head exists (then only one embedding row is read)."""
    params = manifest["params"]
    separate_head = "lm_head.weight" in params
    return sum(p["nbytes"] for name, p in params.items() if not (separate_head and name == "embed_tokens.weight"))


def onnx_weight_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered:
            continue
        location = {e.key: e.value for e in init.external_data}
        total += int(location["length"]) if "length" in location else len(init.raw_data)
    return total


def _median_run(engine: str, path: Path, threads: int, prompt: int, gen: int, repeat: int) -> dict:
    """Run the worker `repeat` times; each figure is the median (a shared 2-core machine is noisy)."""
    runs = [_run_worker(engine, path, threads, prompt, gen) for _ in range(repeat)]
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def run_bench(model: Path, threads: list[int], prompt: int, gen: int, baseline: str | None, head: str | None,
              json_out: Path | None, repeat: int = 3, say=print, concurrency: list[int] | None = None,
              http: bool = False, prefill_chunk: int = 128) -> dict:
    """The engines' table (and the GEMV kernels alone); with `concurrency`, also N concurrent requests
    through the batching scheduler (bench_concurrency.py) with the largest thread count, and with
    `http` the same through the HTTP server (bench_http.py)."""
    from ..compiler.cache import artifact_for
    from ..model.config import ModelConfig
    from ..paths import cache_dir
    from ..runtime.artifact import read_manifest

    artifact = artifact_for(model, "host", head=head)
    manifest = read_manifest(artifact)
    cfg = ModelConfig.from_dict(manifest["model"])
    mean_context = prompt + gen / 2
    kv_cache = manifest["weights"].get("kv_cache", "f32")
    kv = kv_bytes_per_token(cfg, mean_context, 2 if kv_cache == "f16" else 4)
    options = {"head": manifest["weights"]["head"], "ternary_layout": manifest["weights"]["ternary_layout"],
               "kv_cache": kv_cache}
    if manifest["target"]["requires"].get("device") == "cuda":
        return _run_gpu_bench(artifact, manifest, bitcompile_weight_bytes(manifest) + kv, options, prompt, gen,
                              repeat, json_out, say)
    engines = [("bitcompile", artifact, bitcompile_weight_bytes(manifest) + kv, options)]
    if baseline == "onnxruntime":
        onnx_path = _onnx_for(model, artifact, cache_dir(), say)
        engines.append(("onnxruntime", onnx_path, onnx_weight_bytes(onnx_path) + kv_bytes_per_token(cfg, mean_context),
                        {"head": "int8 (MatMulNBits bits=8)", "ternary": "MatMulNBits bits=2 accuracy_level=4"}))
    bandwidth = {n: measure_bandwidth(n) for n in threads}
    runs = []
    for n in threads:
        for name, path, bytes_per_token, options in engines:
            say(f"running {name} with {n} thread(s)...")
            r = _median_run(name, path, n, prompt, gen, repeat)
            gbps = bytes_per_token * r["decode_tok_s"] / 1e9
            runs.append({"engine": name, "threads": n, **r, "bytes_per_token": bytes_per_token, "gbps": gbps,
                         "floor_fraction": gbps / bandwidth[n], "options": options})
    # measured again after the runs: a neighbour's burst during one measurement would otherwise pass
    # for this machine's bandwidth and inflate every floor fraction
    bandwidth = {n: max(b, measure_bandwidth(n)) for n, b in bandwidth.items()}
    for r in runs:
        r["floor_fraction"] = r["gbps"] / bandwidth[r["threads"]]
    say("timing the decode GEMV kernels alone...")
    kernels = [row for n in threads for row in measure_gemvs(cfg, n)]
    report = {"bandwidth_gbps": max(bandwidth.values()), "bandwidth_by_threads": bandwidth,
              "model": str(model), "prompt": prompt, "gen": gen, "repeat": repeat, "runs": runs, "kernels": kernels}
    if concurrency:
        from .bench_concurrency import run_concurrency

        report["concurrency"] = run_concurrency(artifact, max(threads), concurrency, prompt, gen, say, prefill_chunk,
                                                  repeat=repeat)
        if http:
            from .bench_http import run_http

            report["http"] = run_http(artifact, max(threads), concurrency, prompt, gen, say)
    say(format_table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report


def _run_gpu_bench(artifact: Path, manifest: dict, bytes_per_token: float, options: dict, prompt: int, gen: int,
                   repeat: int, json_out: Path | None, say) -> dict:
    """An artifact for an NVIDIA GPU: one subprocess on GPU 0 (bench_gpu.py); its yardsticks are the
    GPU's copy bandwidth and torch bf16 (ONNX Runtime's CPU engine is no baseline for a GPU)."""
    from ..runtime.machine import check_runnable
    from .bench_gpu import gpu_report, import_torch

    import_torch()  # before TVM's CUDA runtime: torch's CUDA 13 wheels bring the libcudart it needs
    check_runnable(manifest["target"]["requires"], manifest["target"]["name"])  # else refuse, naming the fix
    say(f"running bitcompile on the GPU ({artifact})...")
    result = in_subprocess(__name__, "GPU", ["gpu", str(artifact), str(repeat), str(prompt), str(gen)])
    report = {**gpu_report(result, manifest, bytes_per_token, options), "model": str(artifact), "prompt": prompt,
              "gen": gen, "repeat": repeat}
    say(format_table(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report


def _onnx_for(model: Path, artifact: Path, cache: Path, say) -> Path:
    from .onnx_export import export_onnx

    source = Path(read_source(artifact) if not (model / "config.json").is_file() else model)
    out = cache / f"{artifact.name}.onnx" / "model.onnx"
    if not out.is_file():
        say(f"exporting {source} to ONNX (cached in {out.parent})")
        out.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(source, out, head="int8")
    return out


def read_source(artifact: Path) -> str:
    from ..runtime.artifact import read_manifest

    source = read_manifest(artifact).get("source")
    if not source or not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"{artifact}: the checkpoint it was compiled from ({source}) is not available; "
                                "pass the checkpoint directory to `bitcompile bench` to compare with ONNX Runtime")
    return source


def format_table(report: dict) -> str:
    gpu = "device" in report
    width = 18 if gpu else 12  # the GPU report's reference rows are named torch-bf16-graph/-eager
    head = (f"{'engine':{width}s} {'thr':>3s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'TTFT s':>7s} "
            f"{'peak RSS MB':>11s} {'MB/token':>9s} {'GB/s':>6s} {'% floor':>7s}")
    bandwidth = (f"{report['device']}: device-to-device copy {report['bandwidth_gbps']:.0f} GB/s (read + written); "
                 "'% floor' is of that" if gpu else
                 "read bandwidth: " + ", ".join(f"{n} thread(s) {b:.1f} GB/s"
                                                for n, b in report["bandwidth_by_threads"].items()))
    lines = [bandwidth, f"prompt {report['prompt']} tokens, {report['gen']} generated, median of {report['repeat']} "
                        "runs per row", head, "-" * len(head)]
    for r in report["runs"]:
        lines.append(f"{r['engine']:{width}s} {'gpu' if gpu else r['threads']:>3} {fixed(r['prefill_tok_s'], 13, 1)} "
                     f"{fixed(r['decode_tok_s'], 12, 2)} {fixed(r['ttft_s'], 7, 3)} {fixed(r['peak_rss_mb'], 11, 0)} "
                     f"{r['bytes_per_token'] / 1e6:9.1f} {r['gbps']:6.1f} {100 * r['floor_fraction']:6.1f}%")
    if gpu:
        from .bench_gpu import format_gpu_lines

        return "\n".join(lines + format_gpu_lines(report))
    by = {(r["engine"], r["threads"]): r for r in report["runs"]}
    for n in sorted({r["threads"] for r in report["runs"]}):
        if ("bitcompile", n) in by and ("onnxruntime", n) in by:
            lines.append(f"{n} thread(s): decode {by['bitcompile', n]['decode_tok_s'] / by['onnxruntime', n]['decode_tok_s']:.2f}x, "
                         f"prefill {by['bitcompile', n]['prefill_tok_s'] / by['onnxruntime', n]['prefill_tok_s']:.2f}x ONNX Runtime")
    if report.get("concurrency"):
        from .bench_concurrency import format_concurrency

        lines += format_concurrency(report["concurrency"], report["prompt"], report["gen"])
    if report.get("http"):
        from .bench_http import format_http

        lines += format_http(report["http"], report["concurrency"])
    if report.get("kernels"):
        lines.append("decode GEMV kernels alone (weights streamed from memory, as scheduled by compile; "
                     "% of the read bandwidth measured between passes):")
        for k in report["kernels"]:
            lines.append(f"  {k['kernel']:34s} {k['threads']} thr {k['us']:8.1f} us {k['gbps']:6.1f} GB/s "
                         f"{100 * k['floor_fraction']:6.1f}% of read bandwidth" + ("" if k["tuned"] else " (untuned)"))
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "gemv":
        print(json.dumps(gemv_worker(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1] == "gpu":
        from .bench_gpu import gpu_worker

        print(json.dumps(gpu_worker(sys.argv[2], *map(int, sys.argv[3:6]))))
    else:
        engine, path, threads, prompt, gen = sys.argv[1:6]
        print(json.dumps(worker(engine, path, int(threads), int(prompt), int(gen))))
