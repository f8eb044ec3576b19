"""Auto-tuning: MetaSchedule searches the knobs of our schedule templates, measured on the machine.

Per distinct tunable kernel of the model (records.kernel_key):
  space    a ScheduleFn that samples each knob of the kernel's template (sample_categorical) and
           applies the template: every candidate is the hand schedule with other knob values
  search   evolutionary search (never measures a candidate twice); the spaces are small, so a
           random cost model does as well as a learned one and needs no xgboost
  build    in this process (LocalBuilder starts fresh worker processes for every batch), linked
           with the target's (cross) linker
  measure  on this machine (LocalRunner) or on a device behind a TVM RPC tracker (RPCRunner), the
           CPU cache flushed before every run: decode streams its weights from DRAM, and a warm
           cache would pick knobs for the wrong bottleneck
  choose   the best few are timed again (20 cold runs each) and the lowest mean wins: a single
           median can flatter a knob setting whose time is bimodal on a busy machine
  verify   the chosen knobs' kernel, run where it was measured, against exact integer numpy results
           on random ternary weights; only then is the record written (records.RecordStore)
Each kernel's MetaSchedule database lives in schedules/<target>/.tuning/<digest>/; an interrupted
run keeps it, and a rerun counts the trials measured there and runs only the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..kernels import ternary
from ..kernels.schedule import tunable_template
from ..model.config import load_config
from ..model.head import block_int8_rows, block_q4, check_head, default_head
from ..model.packing import pack_kernel
from .build import build_graph
from .cross import linker_for
from .records import RecordStore, kernel_key, key_digest
from .targets import resolve_target

PREFILL_TOKENS = 128  # prefill kernels are measured at this many tokens (a typical prompt)
# batched decode kernels at this many rows (sequences decoding together): at 8 the 2B kernels stream
# from DRAM and their tiles tie; at 16 the arithmetic tells them apart (the int8 head: 8 x 1 12.3 ms, 4 x 2 14.3)
BATCH_ROWS = 16


@dataclass
class Task:
    func: tirx.PrimFunc  # as the compiler sees it (prefill: symbolic token count)
    template: object  # schedule.Template

    @property
    def op(self) -> str:
        return str(self.func.attrs["bitcompile.op"])

    @property
    def rows(self) -> str | None:
        return str(self.func.attrs["bitcompile.rows"]) if "bitcompile.rows" in self.func.attrs else None

    @property
    def several_rows(self) -> str:
        """What a symbolic row count serves: a batched decode step's sequences ("batch": also the
        heads', whose logits of several rows are those of a batched step), or a prompt's tokens."""
        return "batch" if self.rows == "batch" or self.op in HEADS else "prefill"

    @property
    def name(self) -> str:
        tokens, n, k = self.shape
        return f"{self.op} {'decode' if tokens is not None else self.several_rows} {n}x{k}"

    @property
    def measured_tokens(self) -> int:
        tokens = self.shape[0]
        return tokens if tokens is not None else BATCH_ROWS if self.several_rows == "batch" else PREFILL_TOKENS

    @property
    def shape(self) -> tuple[int | None, int, int]:
        """(tokens or None when symbolic, outputs per row, inputs per row)."""
        xq, tokens = self.func.params[0], self.func.params[0].shape[0]
        n = outputs_per_row(self.op, [p.shape for p in self.func.params])
        return (int(tokens) if isinstance(tokens, tirx.IntImm) else None), n, int(xq.shape[1])

    @property
    def weights_arg(self) -> int:
        return WEIGHTS_ARG[self.op]

    def measured_func(self) -> tirx.PrimFunc:
        """The function MetaSchedule times: a symbolic token count fixed to measured_tokens (same
        stages, so the same template applies)."""
        tokens, n, k = self.shape
        if tokens is not None:
            return self.func
        return kernel_func(self.op, self.measured_tokens, n, k, pad_tokens=True, rows=self.rows,
                           row_tile=ternary.padded_row_tile(self.func))


HEADS = ("lm_head_int8", "lm_head_q4")
WEIGHTS_ARG = {"ternary_matmul": 3, "lm_head_int8": 3, "lm_head_q4": 2}  # which argument streams from memory


def outputs_per_row(op: str, shapes) -> int:
    """A tunable kernel's outputs per row from its argument shapes: the ternary matmul's 16-row
    weight blocks, the int8 head's row scales, the 4-bit head's logits."""
    if op == "lm_head_int8":
        return int(shapes[4][0])
    if op == "lm_head_q4":
        return int(shapes[4][1])
    return int(shapes[3][0]) * 16


def kernel_func(op: str, tokens: int | None, n: int, k: int, pad_tokens: bool | None = None,
                rows: str | None = None, row_tile: int = ternary.M_TILE) -> tirx.PrimFunc:
    """A tunable kernel alone as a PrimFunc, as the compiler makes it (tokens None: symbolic;
    pad_tokens: see ternary.ternary_matmul)."""
    if op in HEADS:
        make = ternary.lm_head_int8_func if op == "lm_head_int8" else ternary.lm_head_q4_func
        return make(tokens, n, k, pad_tokens=pad_tokens)
    return ternary.ternary_matmul_func(tokens, n, k, pad_tokens=pad_tokens, rows=rows, row_tile=row_tile)


def extract_tasks(model_dir, spec, head: str) -> list[Task]:
    """The model's distinct tunable kernels (the graph legalized exactly as compile does it)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target, mod, _ = build_graph(load_config(model_dir), spec, head)
    with target:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)
    tasks, seen = [], set()
    for _, func in sorted(mod.functions_items(), key=lambda item: item[0].name_hint):
        template = tunable_template(func, target) if isinstance(func, tirx.PrimFunc) else None
        digest = key_digest(kernel_key(func, target)) if template else None
        if template is None or digest in seen:
            continue
        seen.add(digest)
        tasks.append(Task(func, template))
    return tasks


def knob_space_fn(template, knobs: dict):
    """MetaSchedule's design spaces for the knobs. A search replays a space's trace with new sampled
    decisions, so a knob that changes which instructions the schedule issues (template.structural:
    e.g. which intrinsic it tensorizes with) gets a space per value, where it is sampled from that
    one value: every knob is still read back from the trace's decisions (knobs_of)."""
    structural = [name for name in knobs if name in template.structural]

    def design_spaces(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
        spaces = []
        for values in itertools.product(*(knobs[name] for name in structural)):
            fixed, space = dict(zip(structural, values)), sch.copy()
            sampled = {}
            for name, candidates in knobs.items():
                candidates = [fixed[name]] if name in fixed else candidates
                sampled[name] = space.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))
            template.apply(space, **sampled)
            for name, value in sampled.items():  # a use of every sample, or the trace drops those apply read in Python
                space.annotate(space.get_sblock("root"), f"bitcompile.knob.{name}", value)
            spaces.append(space)
        return spaces

    return design_spaces


def knobs_of(trace, names: list[str]) -> dict:
    """The knob values a tuning record's trace chose (its SampleCategorical decisions, in order)."""
    values = [int(inst.attrs[0][int(trace.decisions[inst])]) for inst in trace.insts
              if inst.kind.name == "SampleCategorical"]
    return dict(zip(names, values, strict=True))


def export_kernel(lib, fcompile=None) -> Path:
    """Link a compiled kernel into a shared library (fcompile: the target's cross linker), in a folder of
    its own: MetaSchedule removes a measured candidate's folder (remove_build_dir); kernels we load
    ourselves go through `exported`, which removes it too."""
    path = Path(tempfile.mkdtemp(prefix="bitcompile-tune-")) / "kernel.so"
    lib.export_library(str(path), fcompile=fcompile) if fcompile else lib.export_library(str(path))
    return path


@contextlib.contextmanager
def exported(lib, fcompile=None):
    """export_kernel for the block's duration (a loaded library stays mapped after its file is gone)."""
    path = export_kernel(lib, fcompile)
    try:
        yield path
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Compile candidates here: a small kernel builds in ~1 s, a fresh builder process costs ~15 s."""

    def __init__(self, export=None):
        super().__init__()
        self.export = export  # cross-linking for a device; None: this machine's compiler

    def build(self, build_inputs):
        results = []
        for item in build_inputs:
            try:
                path = export_kernel(tvm.compile(item.mod, target=item.target), self.export)
                results.append(ms.builder.BuilderResult(str(path), None))
            except Exception as err:  # a candidate that does not build is a failed trial, not a failed run
                results.append(ms.builder.BuilderResult(None, f"build failed: {err}"))
        return results


@derived_object
class Progress(ms.measure_callback.PyMeasureCallback):
    """Advance a progress bar per measured candidate and show the best time so far. Once `stop` is
    set (Ctrl-C, or `stop_after` trials in tests) it ends the search after the batch is saved."""

    def __init__(self, bar, stop: dict, stop_after: int | None = None):
        super().__init__()
        self.bar, self.best, self.stop, self.stop_after, self.done = bar, float("inf"), stop, stop_after, 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        for result in runner_results:
            self.best = min(self.best, _seconds(result))
        self.done += len(runner_results)
        self.bar.update(len(runner_results))
        if self.best < float("inf"):
            self.bar.set_postfix_str(f"best {self.best * 1e6:.1f} us")
        if self.stop_after is not None and self.done >= self.stop_after:
            self.stop["requested"] = True
        if self.stop["requested"]:
            raise KeyboardInterrupt  # crosses the FFI as an error; search() turns it back into this


@contextlib.contextmanager
def stop_on_ctrl_c():
    """First Ctrl-C: let the batch being measured finish and be saved, then stop. Second: abort now."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this batch (what was measured is kept; Ctrl-C again to abort)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C behaves as usual
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _seconds(record) -> float:
    """Median measured time; failed builds and runs are stored as 1e10 s or without times."""
    secs = [float(s) for s in record.run_secs or []]
    return float(np.median(secs)) if secs else float("inf")


def _space_size(knobs: dict) -> int:
    return int(np.prod([len(v) for v in knobs.values()]))


@contextlib.contextmanager
def _unnamed_log_handlers_detached():
    """MetaSchedule re-configures its logger from the names of the handlers it has; a handler without a
    name (pytest's log capture, a user's own) makes that fail. Detach those while tuning."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)


def search(task: Task, target, work_dir: Path, trials: int, device: Device, runner, progress: Progress) -> dict | None:
    """Run MetaSchedule until the kernel's database holds `trials` measurements (or the whole space);
    return the best knobs."""
    mod = tvm.IRModule({"main": task.measured_func()})
    knobs = task.template.space(s_tir.Schedule(mod))
    work_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))  # one kernel per work dir
    done = len(database.get_all_tuning_records())
    progress.bar.total = min(trials, _space_size(knobs))  # small spaces are measured whole
    progress.bar.update(min(done, progress.bar.total))
    remaining = progress.bar.total - done
    if remaining > 0:
        space = ms.space_generator.ScheduleFn(knob_space_fn(task.template, knobs), sch_rules=[], postprocs=[],
                                              mutator_probs={})
        try:
            with _unnamed_log_handlers_detached():
                ms.tune_tir(mod, target, str(work_dir), max_trials_global=remaining,
                            num_trials_per_iter=min(remaining, 16), space=space, strategy="evolutionary",
                            cost_model="random", database=database, builder=InProcessBuilder(device.export),
                            runner=runner,
                            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress])
        except Exception:
            if progress.stop["requested"]:
                raise KeyboardInterrupt from None
            raise
    records = sorted(database.get_all_tuning_records(), key=_seconds)
    if not records or _seconds(records[0]) >= 1e9:
        return None
    finalists = []
    for record in records:
        chosen = knobs_of(record.trace, list(knobs))
        if chosen not in finalists and _seconds(record) < 1e9:
            finalists.append(chosen)
    return {"finalists": finalists[:FINALISTS], "us": _seconds(records[0]) * 1e6, "trials": len(records)}


FINALISTS = 3  # the search's best few are timed again before one is chosen


STREAM_BYTES = 128 << 20  # weight copies to rotate through: 4x this machine's L3


def streaming_pass(lib, args: list[np.ndarray], weights: int = 3):
    """A function timing one pass of back-to-back calls, each reading weights that are in no cache, as
    in the model (each layer's weights are read once per token): the calls rotate over copies of the
    weights that together hold STREAM_BYTES. It returns seconds per call. (A cache flush before each
    timed run, as tuning does to rank candidates, is slower than the model runs the kernels.)"""
    with exported(lib) as path:
        kernel = tvm.runtime.load_module(str(path))["main"]
    copies = max(2, STREAM_BYTES // args[weights].nbytes)
    shared = [tvm.runtime.tensor(a) for a in args]
    sets = [shared[:weights] + [tvm.runtime.tensor(args[weights].copy())] + shared[weights + 1:] for _ in range(copies)]

    def one_pass() -> float:
        start = time.perf_counter()
        for arguments in sets:
            kernel(*arguments)
        return (time.perf_counter() - start) / copies

    one_pass()  # warm up: thread pool, page tables
    return one_pass


def choose(task: Task, target, finalists: list[dict], device: "Device", rounds: int = 8) -> tuple[dict, float | None]:
    """Time each finalist again and keep the lowest *mean* (one median from the search can flatter a
    knob setting whose time is bimodal on a busy machine: seen 2.1 vs 4.1 ms for one prefill kernel).
    Here the finalists stream their weights from memory as the model does (streaming_pass), in
    interleaved rounds, so a neighbour's burst on a shared machine hits all of them alike; on an RPC
    device, 20 cold runs each."""
    if len(finalists) == 1:
        return finalists[0], None
    _, n, k = task.shape
    *args, _ = _kernel_args(task.measured_tokens, n, k, np.random.default_rng(0), task.op)
    libs = [_build(task.measured_func(), task.template, knobs, target) for knobs in finalists]
    if device.tracker is None:
        passes = [streaming_pass(lib, args, task.weights_arg) for lib in libs]
        seconds = [[] for _ in passes]
        for _ in range(rounds):
            for times, one_pass in zip(seconds, passes):
                times.append(one_pass())
        means = [float(np.mean(times)) for times in seconds]
    else:
        means = [_mean_seconds(device, lib, args) for lib in libs]
    best = int(np.argmin(means))
    return finalists[best], means[best] * 1e6


def _mean_seconds(device: "Device", lib, args) -> float:
    """Mean of 20 cold runs. A function of its own so every remote handle (module, tensors, timer)
    is gone when it returns: an RPC server serves one session at a time, and a live handle keeps the
    session open, so the next request for the device would wait forever."""
    with device.load(lib) as (kernel, dev):
        timer = kernel.time_evaluator("main", dev, number=1, repeat=20, min_repeat_ms=0,
                                      f_preproc="cache_flush_cpu_non_first_arg")
        return float(np.mean(timer(*[tvm.runtime.tensor(a, dev) for a in args]).results))


class Device:
    """Where kernels run: this machine, or a device behind a TVM RPC tracker (`--rpc HOST:PORT --key`).
    Libraries are linked for the target (cross-linked for a device) and loaded there."""

    def __init__(self, export=None, tracker: str | None = None, key: str | None = None):
        self.export, self.tracker, self.key = export, tracker, key
        if tracker:
            parse_address(tracker)

    @contextlib.contextmanager
    def load(self, lib):
        """Yield (module, device) for `lib` on the device. A remote session is held only inside the
        block: an RPC server serves one session at a time, and the tuner's runner needs it too."""
        if self.tracker is None:
            with exported(lib, self.export) as path:
                module = tvm.runtime.load_module(str(path))
            yield module, tvm.cpu()
            return
        from tvm import rpc

        host, port = parse_address(self.tracker)
        session = rpc.connect_tracker(host, port).request(self.key, session_timeout=600)
        with exported(lib, self.export) as path:
            session.upload(str(path))
        yield session.load_module(path.name), session.cpu()

    @property
    def name(self) -> str:
        return f"the RPC device {self.key!r} at {self.tracker}" if self.tracker else "this machine"

    def runner(self, threads: int):
        """MetaSchedule's runner for this device: each candidate timed alone with a cold cache (number=1),
        since the model's weights never fit in cache and a warm timing would rank knobs wrongly."""
        config = ms.runner.EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)
        if self.tracker is None:
            # Worker processes inherit TVM_NUM_THREADS (TVM's own default in a fresh process can be 1 thread).
            os.environ["TVM_NUM_THREADS"] = str(threads)
            return ms.runner.LocalRunner(evaluator_config=config)
        host, port = parse_address(self.tracker)
        rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=self.key,
                                         session_timeout_sec=600)
        return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=config, max_workers=1)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rpc expects the tracker as HOST:PORT (e.g. 127.0.0.1:9190), got {address!r}")
    return host, int(port)


def _build(func: tirx.PrimFunc, template, knobs: dict, target):
    sch = s_tir.Schedule(func)
    template.apply(sch, **knobs)
    return _compile_scheduled(sch, target)


def _compile_scheduled(sch: s_tir.Schedule, target):
    # (with_attr before scheduling would let the schedule rewrite func in place: TVM 0.27 moves it)
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target)


def _kernel_args(tokens: int, n: int, k: int, rng, op: str = "ternary_matmul") -> list[np.ndarray]:
    """Random int8 activations and weights (ternary, the int8 head's rows, or the 4-bit head's) in the
    kernel's argument order (scales of 1, so the output is the exact integer dot product), plus the
    unpacked weights last, for checking."""
    xq = rng.integers(-128, 128, (tokens, k)).astype(np.int8)
    if op == "lm_head_q4":  # group scales of 1: the float sums of integer group sums stay exact
        weights = rng.integers(-7, 8, (n, k), dtype=np.int8)
        codes, scales = block_q4(weights, np.ones((n, k // ternary.Q4_GROUP), np.float16))
        return [xq, np.ones(tokens, np.float32), codes, scales, np.zeros((tokens, n), np.float32), weights]
    if op == "lm_head_int8":
        weights = rng.integers(-127, 128, (n, k), dtype=np.int8)
        packed = block_int8_rows(weights)
    else:
        weights = rng.integers(-1, 2, (n, k)).astype(np.int8)
        packed = pack_kernel(weights)
    return [xq, np.ones(tokens, np.float32), xq.sum(1, dtype=np.int32), packed,
            np.ones(n, np.float32), np.zeros((tokens, n), np.float32), weights]


def exact_products(xq: np.ndarray, weights: np.ndarray, rows: int = 8192) -> np.ndarray:
    """xq . weights^T exactly, as the float32 a kernel's int32 result becomes: float64 products and
    sums are exact below 2^53 (BLAS speed; int64 matmul has none), in slices of weight rows (the
    head's 128k rows as float64 would take 2.6 GB)."""
    x = xq.astype(np.float64)
    return np.concatenate([(x @ weights[i : i + rows].astype(np.float64).T).astype(np.int64).astype(np.float32)
                           for i in range(0, len(weights), rows)], axis=1)


def decode_gemv_kernels(config, schedules=None) -> list[tuple[dict, object]]:
    """Each decode ternary GEMV of the model built alone for this machine, scheduled as `compile`
    schedules it (its tuning record, else the default): [({kernel, weight_bytes, tuned}, pass)], where
    pass() times the kernel streaming its weights (streaming_pass). Threads: TVM_NUM_THREADS."""
    from ..kernels.schedule import TernaryRules

    target = tvm.target.Target(resolve_target("host").tvm)
    store = RecordStore(schedules, target)
    rules = TernaryRules(store)  # the rule compile applies: the tuning record's knobs, else the default
    rng = np.random.default_rng(0)
    kernels = []
    for n, k in config.fused_linear_shapes().values():
        hits = len(store.hits)
        lib = _compile_scheduled(rules.apply(ternary.ternary_matmul_func(1, n, k), target, False), target)
        info = {"kernel": f"ternary_matmul decode {n}x{k}", "weight_bytes": n * k // 4, "tuned": len(store.hits) > hits}
        kernels.append((info, streaming_pass(lib, _kernel_args(1, n, k, rng)[:-1])))
    return kernels


def verify(task: Task, target, knobs: dict, device: Device | None = None):
    """Build the kernel with `knobs`, run it on the device, and check it against exact integer numpy
    results; raise if wrong."""
    device = device or Device()
    fixed, n, k = task.shape
    rng = np.random.default_rng(n + k)
    with device.load(_build(task.func, task.template, knobs, target)) as (kernel, dev):
        for tokens in [fixed] if fixed is not None else [1, 13, 16]:
            *args, weights = _kernel_args(tokens, n, k, rng, task.op)
            tensors = [tvm.runtime.tensor(a, dev) for a in args]
            kernel["main"](*tensors)
            if not np.array_equal(tensors[-1].numpy(), exact_products(args[0], weights)):
                raise RuntimeError(f"{task.name} with knobs {knobs} computed wrong results at {tokens} tokens on "
                                   f"{device.name}; the record was not kept")


def verify_record(path, target) -> str:
    """Check a saved record: rebuild its kernel from the key, confirm the key matches what compile
    would compute for it, and verify the recorded knobs exactly. Returns the kernel's name."""
    import json

    record = json.loads(Path(path).read_text())
    key = record["key"]
    shapes = [arg.split("[")[1].rstrip("]").split(",") for arg in key["args"]]
    tokens = None if shapes[0][0] == "?" else int(shapes[0][0])
    func = kernel_func(key["op"], tokens, outputs_per_row(key["op"], shapes), int(shapes[0][1]), rows=key.get("rows"),
                       row_tile=int(key.get("row_tile", ternary.M_TILE)))
    if kernel_key(func, target) != key:
        raise RuntimeError(f"{path}: its key does not describe a kernel this compiler makes for {target}")
    task = Task(func, tunable_template(func, target))
    verify(task, target, record["knobs"])
    return task.name


def tune(model_dir, target: str = "host", trials: int = 32, head: str | None = None, schedules=None,
         only: str | None = None, progress: bool = True, stop_after: int | None = None,
         threads: int | None = None, rpc: str | None = None, key: str | None = None) -> list[dict]:
    """Tune every tunable kernel of the model for `target`; write one record per kernel; return a summary.
    `threads`: how many threads time each candidate here (default: all cores, as the runtime uses).
    `rpc`/`key`: a TVM RPC tracker HOST:PORT and the device key: candidates are cross-linked here and
    timed and verified on the device."""
    spec = resolve_target(target)
    head = head or default_head(load_config(model_dir).vocab_size)
    check_head(head)
    tasks = [t for t in extract_tasks(model_dir, spec, head) if not only or only in t.name]
    if not tasks:
        raise ValueError(f"no tunable kernels for target {spec.name}" + (f" match {only!r}" if only else "")
                         + " (tunable: the ternary matmuls on targets with a tuning template, the int8 and q4 heads on VNNI)")
    if rpc and not key:
        raise ValueError("--rpc needs --key: the key the device's RPC server registered with the tracker")
    if not rpc and spec.arch != platform.machine():
        raise ValueError(f"target {spec.name} runs on {spec.arch}, not on this {platform.machine()} machine: tune it "
                         "on the device with --rpc TRACKER:PORT --key KEY (see the README)")
    target_obj = tvm.target.Target(spec.tvm)
    store = RecordStore(schedules, target_obj)
    threads = threads or os.cpu_count() or 1
    device = Device(linker_for(spec), rpc, key)
    runner = device.runner(threads)
    with stop_on_ctrl_c() as stop:
        return [_tune_one(task, target_obj, store, trials, device, runner, progress, stop, stop_after, threads)
                for task in tasks]


def _tune_one(task: Task, target, store: RecordStore, trials, device, runner, progress, stop, stop_after,
              threads) -> dict:
    from tqdm import tqdm

    work_dir = store.dir / ".tuning" / key_digest(kernel_key(task.func, target))
    started = time.time()
    with tqdm(total=trials, desc=task.name, unit="trial", disable=not progress) as bar:
        best = search(task, target, work_dir, trials, device, runner, Progress(bar, stop, stop_after))
    if best is None:
        raise RuntimeError(f"{task.name}: no candidate built and ran; see the logs in {work_dir / 'logs'}")
    knobs, mean_us = choose(task, target, best.pop("finalists"), device)
    verify(task, target, knobs, device)
    best.update(knobs=knobs, us=mean_us or best["us"])
    path = store.save(task.func, knobs, {
        "us": round(best["us"], 2), "trials": best["trials"], "measured_tokens": task.measured_tokens,
        "measured_on": device.name if device.tracker else f"this machine, {threads} threads",
        "verified": "exact integer match against numpy", "seconds": round(time.time() - started, 1),
        "tvm": tvm.__version__})
    return {"kernel": task.name, **best, "record": str(path)}
