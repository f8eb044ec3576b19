"""The compiler pipeline: checkpoint -> Relax graph -> schedules -> tvm.compile -> artifact (atomic)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import tvm
from tqdm import tqdm

from ..atomic import atomic_directory
from ..kernels.schedule import cpu_schedule_pass
from ..model.bitnet import BitNetForCausalLM
from ..model.checkpoint import load_checkpoint
from ..model.head import LARGE_VOCABULARY, check_head, default_head
from ..model.packing import KERNEL_LAYOUT
from ..model.repack import graph_params
from ..runtime.artifact import LIBRARY, PARAMS, TOKENIZER, seal, write_params
from ..version import __version__
from .cross import linker_for
from .records import RecordStore
from .targets import TargetSpec, resolve_target


@tvm.transform.module_pass(opt_level=0, name="bitcompile.MarkAllNoAlias")
def mark_all_noalias(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
    """Give every PrimFunc `tirx.noalias` (true of all of ours and of the KV-cache kernels).

    TVM's LLVM codegen drops the noalias/restrict treatment of *every* function in a module as soon
    as one function lacks the attribute (TVM's KV-cache kernels do); LLVM then cannot keep the ternary
    kernels' accumulators in registers, and decode ran ~2x slower."""
    updates = {gv: f.with_attr("tirx.noalias", True) for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs and "tirx.noalias" in f.attrs)}
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _backend(target: tvm.target.Target, records):
    """TVM's pipeline module for the target's kind and our schedule pass for it."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline

        from ..kernels.cuda import cuda_schedule_pass

        return pipeline, cuda_schedule_pass()
    from tvm.relax.backend.cpu_generic import pipeline

    return pipeline, cpu_schedule_pass(records)


def _legalize_passes(backend, target):
    """The backend's legalization without its default schedules (the CUDA pipeline ends in dlight's;
    ours, which include them, must see the functions first)."""
    return [p for p in backend.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]


def relax_pipeline(target: tvm.target.Target, records=None) -> tvm.transform.Pass:
    """The default pipeline of the target's kind with our schedule rules (and tuning `records`)
    between legalization and lowering."""
    backend, schedule_pass = _backend(target, records)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        with target:
            passes = (backend.library_dispatch_passes(target) + _legalize_passes(backend, target)
                      + [schedule_pass, mark_all_noalias]
                      + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build_env(spec: TargetSpec, target: tvm.target.Target):
    """What tvm.compile needs around it for this target (CUDA: nvcc, the driver stand-in; cuda.py)."""
    if spec.device != "cuda":
        return contextlib.nullcontext()
    from .cuda import compile_env

    return compile_env(target, spec.name)


# KV cache storage: f32 is exact; f16 halves the cache (79 MB less at 1024 tokens for the 2B-4T shape)
# at ~1e-3 relative error in q, k and v. Default f16 for large models (vocabulary >= 32000), like the head.
KV_CACHE_DTYPES = {"f32": "float32", "f16": "float16"}


def default_kv_cache(vocab_size: int) -> str:
    return "f16" if vocab_size >= LARGE_VOCABULARY else "f32"


def check_kv_cache(kind: str) -> str:
    if kind not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache type {kind!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return kind


def build_graph(config, spec: TargetSpec, head: str = "bf16", kv_cache: str = "f32"):
    target = tvm.target.Target(spec.tvm)
    model = BitNetForCausalLM(config, target, head, KV_CACHE_DTYPES[kv_cache])
    mod, named_params = model.export_tvm(spec=model.spec())
    return target, mod, [name for name, _ in named_params]


def compile_model(model_dir: str | Path, target: str = "host", output: str | Path | None = None,
                  overwrite: bool = False, progress: bool = True, head: str | None = None,
                  schedules: str | Path | None = None, kv_cache: str | None = None,
                  sign: str | Path | None = None) -> Path:
    """Compile a Hugging Face BitNet checkpoint directory into an artifact directory; return its path.

    `head`: lm_head storage ("bf16", "int8", "q4", "f32"; see model/head.py); default int8 for large vocabularies.
    `kv_cache`: "f32" or "f16" storage of the KV cache (default f16 for large vocabularies).
    `schedules`: folder of tuning records (default: the committed schedules/); kernels without a
    matching record get the default schedule. `sign`: an Ed25519 private key (PEM) to sign the artifact with."""
    spec = resolve_target(target)
    fcompile = linker_for(spec)  # checks the target's toolchain before any work
    if head is not None:
        check_head(head)
    if kv_cache is not None:
        check_kv_cache(kv_cache)
    model_dir = Path(model_dir)
    output = Path(output) if output else Path(f"{model_dir.name}-{spec.name}.bitc")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another --output or pass --force to replace it")
    started = time.time()
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda *_: None)

    with atomic_directory(output, overwrite=overwrite) as tmp:
        from ..model.config import load_config

        layers = load_config(model_dir).num_hidden_layers
        with tqdm(total=layers, desc="load checkpoint", unit="layer", disable=not progress) as bar:
            ckpt = load_checkpoint(model_dir, progress=bar.update)
        head = head or default_head(ckpt.config.vocab_size)
        if head == "q4" and ckpt.config.hidden_size % 32:
            raise ValueError(f"--head q4 needs hidden_size divisible by 32 (got {ckpt.config.hidden_size}); use int8")
        kv_cache = kv_cache or default_kv_cache(ckpt.config.vocab_size)
        target_obj, mod, param_order = build_graph(ckpt.config, spec, head, kv_cache)
        with tqdm(total=1, desc=f"compile for {spec.name}", bar_format="{desc}: {elapsed}", disable=not progress) as bar:
            records = RecordStore(schedules, target_obj)
            with build_env(spec, target_obj):
                executable = tvm.compile(mod, target_obj, relax_pipeline=relax_pipeline(target_obj, records))
                executable.export_library(str(tmp / LIBRARY), fcompile=fcompile)
            bar.update()
        say(records.summary())
        with tqdm(total=len(param_order), desc="write parameters", unit="tensor", disable=not progress) as bar:
            def counted(items):
                for item in items:
                    bar.update()
                    yield item

            index = write_params(tmp / PARAMS, counted(graph_params(ckpt, head)))
        missing = set(param_order) - set(index)
        if missing:
            raise RuntimeError(f"internal error: parameters {sorted(missing)} were not written")
        shutil.copyfile(ckpt.tokenizer_path, tmp / TOKENIZER)
        for extra in ("tokenizer_config.json", "generation_config.json"):  # chat template, generation defaults
            if (model_dir / extra).is_file():
                shutil.copyfile(model_dir / extra, tmp / extra)
        seal(tmp, {
            "target": {"name": spec.name, "tvm": spec.tvm, "requires": spec.requires()},
            "model": ckpt.config.to_dict(),
            "weights": {"ternary_layout": KERNEL_LAYOUT, "head": head, "kv_cache": kv_cache},
            "schedules": records.report(),
            "versions": {"bitcompile": __version__, "tvm": tvm.__version__},
            "source": str(model_dir.resolve()),
            "params": index,
            "param_order": param_order,
        })
        if sign is not None:
            from ..runtime.trust import sign as sign_artifact

            sign_artifact(tmp, sign)
    say(f"compiled {model_dir} for {spec.name} in {time.time() - started:.1f} s -> {output}")
    return output
