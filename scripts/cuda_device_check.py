#!/usr/bin/env python3
"""Check a CUDA artifact on the GPU machine against the CPU build and the numpy reference.

The GPU machine has no TVM compiler and no internet: compile here, carry the artifact, the
runtime-only TVM bundle and the reference results there (`device` tool: .gpu/ is carried).

  # build machine: all of it in one folder (bundle, tiny-host/tiny-cuda-sm90 artifacts, cpu.npz, and a
  # 2B-4T-shape artifact without its 1.2 GB params.bin), ~2 min
  bitcompile synth --preset 2b4t -o /tmp/2b4t
  python scripts/cuda_device_check.py prepare .gpu --big-model /tmp/2b4t
  # GPU machine (the device tool: carry=[".gpu"])
  pip install --no-index --no-deps --target /tmp/site .gpu/runtime/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.gpu/runtime:$PWD TVM_USE_RUNTIME_LIB=1
  python scripts/cuda_device_check.py check .gpu/tiny-cuda-sm90.bitc --reference .gpu/cpu.npz
  python scripts/cuda_device_check.py params .gpu/big-cuda-sm90.bitc  # params.bin from synth's recipe
  python -m bitcompile.cli bench .gpu/big-cuda-sm90.bitc --prompt 512  # speed: the bench table

The steps one by one: `bundle`, `reference` (with `--checkpoint`), `bitcompile compile`.

`check` compares the logits (max error relative to max |logit|, the tests' 1e-3) with the CPU
build's and the numpy reference's, and 32 greedy tokens with the CPU build's; exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's bitcompile
TOLERANCE = 1e-3  # of max |logit|, as tests/test_compiled_model.py
PROMPT_TOKENS = 64
GREEDY_TOKENS = 32


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
    saved = {"ids": np.asarray(ids), "logits": engine.logits(ids), "greedy": np.asarray(_greedy(engine, ids))}
    if args.checkpoint:  # the numpy reference model's logits too (independent of TVM)
        from bitcompile.model.checkpoint import load_checkpoint
        from bitcompile.reference import ReferenceModel

        saved["numpy_logits"] = ReferenceModel(load_checkpoint(args.checkpoint)).logits(ids)
    np.savez(args.output, **saved)
    print(f"wrote {args.output}")


def compare(engine, reference: dict) -> dict:
    ids = reference["ids"].tolist()
    got, want = engine.logits(ids), reference["logits"]
    greedy = _greedy(engine, ids)
    same = next((i for i, (a, b) in enumerate(zip(greedy, reference["greedy"].tolist())) if a != b), len(greedy))
    err = float(np.abs(got - want).max() / np.abs(want).max())
    out = {"logits_rel_err": err, "logits_ok": err <= TOLERANCE, "greedy_equal_prefix": same,
           "greedy_ok": same == len(greedy)}
    if "numpy_logits" in reference:
        want = reference["numpy_logits"]
        out["numpy_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
        out["logits_ok"] &= out["numpy_rel_err"] <= TOLERANCE
    return out


RUNTIME_SKIP = {"3rdparty", "src", "web", "relax", "topi", "testing", "contrib", "include", "cmake", "lib64"}


def cmd_bundle(args):
    """The TVM runtime without the compiler (about 12 MB) and the apache-tvm-ffi wheel for the GPU
    machine's Python, downloaded with pip: on the GPU machine `pip install --target` the wheel and put
    both on PYTHONPATH."""
    import subprocess

    import tvm
    import tvm_ffi

    out = Path(args.output)
    source = Path(tvm.__file__).parent
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out / "tvm", ignore=lambda d, names: [
        n for n in names if (Path(d) == source and n in RUNTIME_SKIP) or n == "libtvm_compiler.so" or n == "__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(out / "wheels"),
                    f"apache-tvm-ffi=={tvm_ffi.__version__}"], check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB): tvm runtime {tvm.__version__}, apache-tvm-ffi {tvm_ffi.__version__} "
          f"for Python {args.python}")


def cmd_prepare(args):
    """Everything the GPU machine needs, built here into one folder to carry (`run(carry=[FOLDER])`):
    the runtime bundle, the shipped model for the host and for the GPU with the CPU build's
    reference, and with --big-model CKPT that checkpoint (synth's 2b4t, seed 0) for the GPU minus
    its params.bin, which `params` re-creates there."""
    import tempfile

    import bitcompile
    from bitcompile.paths import shipped_model

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cmd_bundle(argparse.Namespace(output=out / "runtime", python=args.python))
    model = shipped_model()
    host = bitcompile.compile(model, output=out / "tiny-host.bitc", overwrite=True, progress=False)
    bitcompile.compile(model, target=args.target, output=out / f"tiny-{args.target}.bitc", overwrite=True,
                       progress=False)
    cmd_reference(argparse.Namespace(artifact=str(host), output=str(out / "cpu.npz"), checkpoint=str(model)))
    if args.big_model:
        with tempfile.TemporaryDirectory() as tmp:
            big = bitcompile.compile(args.big_model, target=args.target, output=Path(tmp) / "big.bitc", progress=False)
            shutil.rmtree(out / f"big-{args.target}.bitc", ignore_errors=True)
            shutil.copytree(big, out / f"big-{args.target}.bitc", ignore=lambda d, names: ["params.bin"])
    runtime = out / "runtime" if out.is_absolute() else f"$PWD/{out}/runtime"
    print(f"on the GPU machine (PYTHONPATH=/tmp/site:{runtime}:$PWD TVM_USE_RUNTIME_LIB=1, after "
          f"pip install --no-index --no-deps --target /tmp/site {out}/runtime/wheels/*.whl):\n"
          f"  python3 scripts/cuda_device_check.py check {out}/tiny-{args.target}.bitc --reference {out}/cpu.npz\n"
          + (f"  python3 scripts/cuda_device_check.py params {out}/big-{args.target}.bitc\n"
             f"  python3 -m bitcompile.cli bench {out}/big-{args.target}.bitc --prompt 512\n" if args.big_model else ""))


def cmd_params(args):
    """Write params.bin of an artifact compiled from a synthetic checkpoint (`bitcompile synth`), from
    the same preset and seed: a 1.2 GB blob cannot travel to the GPU machine, its recipe can. The
    manifest's sha256 says whether the blob is the one compiled with."""
    from bitcompile.model.checkpoint import load_checkpoint
    from bitcompile.model.repack import graph_params
    from bitcompile.runtime.artifact import (
        PARAMS,
        read_manifest,
        sha256_file,
        write_params,
    )
    from bitcompile.tools.synth import write_checkpoint

    art = Path(args.artifact)
    manifest = read_manifest(art)
    ckpt_dir = Path(args.work) / f"{args.preset}-seed{args.seed}"
    if not ckpt_dir.is_dir():  # synth's checkpoint, its tokenizer the artifact's
        write_checkpoint(ckpt_dir, args.preset, seed=args.seed, tokenizer=art / "tokenizer.json")
    index = write_params(art / PARAMS, graph_params(load_checkpoint(ckpt_dir), manifest["weights"]["head"]))
    same = sha256_file(art / PARAMS) == manifest["files"][PARAMS] and index == manifest["params"]
    print(f"wrote {art / PARAMS}: {'identical to' if same else 'DIFFERS from'} the blob compiled with")
    return 0 if same else 1


def cmd_check(args):
    from bitcompile.tools.bench_gpu import import_torch

    import_torch()  # first when present: it makes libcudart.so.13 loadable for TVM's CUDA runtime
    engine = _load(args.artifact)
    result = {"artifact": args.artifact, "device": engine.device.device_name,
              "target": engine.manifest["target"]["name"], **compare(engine, dict(np.load(args.reference)))}
    rows = [("device", result["device"]), ("target", result["target"]),
            ("logits vs CPU build (max err / max|logit|)", f"{result['logits_rel_err']:.2e}"),
            *([("logits vs numpy reference", f"{result['numpy_rel_err']:.2e}")] if "numpy_rel_err" in result else []),
            ("logits within tolerance", f"{'ok' if result['logits_ok'] else 'FAIL'} (<= {TOLERANCE:g})"),
            ("greedy tokens equal to CPU build", f"{result['greedy_equal_prefix']}/{GREEDY_TOKENS} "
                                                 f"({'ok' if result['greedy_ok'] else 'FAIL'})")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:{width}s}  {value}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["logits_ok"] and result["greedy_ok"] else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reference", help="save the CPU build's logits and greedy tokens")
    r.add_argument("artifact")
    r.add_argument("-o", "--output", required=True, help=".npz to write")
    r.add_argument("--checkpoint", help="the checkpoint it was compiled from: also save the numpy reference's logits")
    r.set_defaults(func=cmd_reference)
    b = sub.add_parser("bundle", help="write the runtime-only TVM (+ tvm-ffi wheel) to carry to the GPU machine")
    b.add_argument("output")
    b.add_argument("--python", default="3.12", help="the GPU machine's Python version (default 3.12)")
    b.set_defaults(func=cmd_bundle)
    pr = sub.add_parser("prepare", help="build everything the GPU machine needs into one folder")
    pr.add_argument("output", help="folder to carry (e.g. .gpu, listed in .git/info/exclude)")
    pr.add_argument("--target", default="cuda-sm90")
    pr.add_argument("--big-model", help="a synthetic 2B-4T checkpoint (`bitcompile synth --preset 2b4t`) to add")
    pr.add_argument("--python", default="3.12", help="the GPU machine's Python version (default 3.12)")
    pr.set_defaults(func=cmd_prepare)
    q = sub.add_parser("params", help="re-create params.bin of a synthetic-checkpoint artifact")
    q.add_argument("artifact")
    q.add_argument("--preset", default="2b4t")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--work", default="/tmp/bitcompile-params", help="where the synthetic checkpoint goes")
    q.set_defaults(func=cmd_params)
    c = sub.add_parser("check", help="compare a CUDA artifact on GPU 0 with the CPU build and numpy")
    c.add_argument("artifact")
    c.add_argument("--reference", required=True, help=".npz from `reference`")
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
