"""Auto-tuning: records are keyed to exactly one kernel, every knob setting of the template is exact,
a short tuning run writes records that the next compile applies, and an interrupted run resumes."""

import itertools
import json

import numpy as np
import pytest
import tvm

from bitcompile.compiler import records, tune
from bitcompile.compiler.targets import host_target
from bitcompile.kernels import common, ternary, x86
from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel

TARGET = tvm.target.Target(host_target().tvm)
needs_vnni = pytest.mark.skipif(not x86.has_vnni(TARGET), reason="the tunable template is the VNNI one; "
                                "this CPU has no AVX-512 VNNI")


def _task(tokens, n, k, rows=None):
    tile = ternary.CPU_ROW_TILE if rows == "batch" else ternary.M_TILE
    func = ternary.ternary_matmul_func(tokens, n, k, rows=rows, row_tile=tile)
    return tune.Task(func, x86.TERNARY_VNNI)


@needs_vnni
@pytest.mark.parametrize("tokens, rows", [(1, None), (None, None), (None, "batch")], ids=["decode", "prefill", "batch"])
def test_every_knob_setting_is_exact(tokens, rows):
    """verify() compares against integer numpy (prefill and batch at 1, 13 and 16 rows); it raises on any mismatch."""
    task = _task(tokens, 128, 256, rows)
    space = task.template.space(tvm.s_tir.Schedule(task.func))
    assert len(space["row_blocks"]) >= 3 and len(space["k_unroll"]) >= 2
    if tokens is None:  # several rows: the tile of rows (dividing the padding) and the prefetch are knobs too
        assert space["m_tile"] == ([4] if rows else [4, 8]) and space["prefetch"] == [
            x86.PREFETCH_NONE, x86.PREFETCH_AHEAD, x86.PREFETCH_NEXT_TASK]
    for values in itertools.product(*space.values()):
        tune.verify(task, TARGET, dict(zip(space, values)))


@needs_vnni
@pytest.mark.parametrize("tokens", [1, None], ids=["decode", "batch"])
@pytest.mark.parametrize("head", ["int8", "q4"])
def test_every_head_knob_setting_is_exact(head, tokens):
    """The int8 and 4-bit heads are tunable too: row blocks per task, and for several rows the
    register tile of rows; every setting against integer numpy (several rows at 1, 13 and 16)."""
    make, template = ((ternary.lm_head_int8_func, x86.HEAD_INT8_VNNI) if head == "int8"
                      else (ternary.lm_head_q4_func, x86.HEAD_Q4_VNNI))
    task = tune.Task(make(tokens, 128, 256), template)
    space = task.template.space(tvm.s_tir.Schedule(task.func))
    assert space["row_blocks"] == ([1, 2, 4, 8] if tokens else [1, 2, 4])
    assert space.get("m_tile") == (None if tokens else [4, 8])
    for values in itertools.product(*space.values()):
        tune.verify(task, TARGET, dict(zip(space, values)))
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": task.func}))  # and the search's spaces (sampled knobs) build
    chosen = [tune.knobs_of(s.trace.simplified(remove_postproc=True), list(space))
              for s in tune.knob_space_fn(task.template, space)(sch)]
    assert all(c[name] in values for c in chosen for name, values in space.items())
    structural = [name for name in space if name in template.structural]  # each chooses instructions:
    assert sorted(tuple(c[n] for n in structural) for c in chosen) == sorted(  # a space per combination
        itertools.product(*(space[n] for n in structural)))


@needs_vnni
def test_verify_catches_a_wrong_kernel(monkeypatch):
    task = _task(1, 64, 64)
    broken = tune.Task(task.func, common.Template(
        lambda sch, **knobs: x86.schedule_ternary_matmul_vnni(sch, **knobs), task.template.space))
    monkeypatch.setattr(tune, "pack_kernel", lambda t: np.zeros((t.shape[0] // 16, t.shape[1] // 16, 64), np.uint8))
    with pytest.raises(RuntimeError, match="wrong results"):
        tune.verify(broken, TARGET, {"row_blocks": 1, "k_unroll": 1})


def test_a_record_only_matches_its_own_kernel(tmp_path):
    store = records.RecordStore(tmp_path, TARGET)
    mine, other_shape = ternary.ternary_matmul_func(1, 64, 128), ternary.ternary_matmul_func(1, 64, 256)
    path = store.save(mine, {"row_blocks": 2, "k_unroll": 1}, {})
    assert store.lookup(mine) == {"row_blocks": 2, "k_unroll": 1}
    assert store.lookup(other_shape) is None
    assert store.lookup(ternary.ternary_matmul_func(None, 64, 128)) is None  # prefill, same n x k
    other_cpu = records.RecordStore(tmp_path, tvm.target.Target({**host_target().tvm, "mcpu": "haswell"}))
    assert other_cpu.lookup(mine) is None
    saved = json.loads(path.read_text())  # a record whose key was written for another template version
    saved["key"]["template"] += 1
    path.write_text(json.dumps(saved))
    assert store.lookup(mine) is None
    assert len(store.hits) == 1 and len(store.misses) == 3


@needs_vnni
@pytest.mark.slow
def test_tuning_writes_records_that_compile_applies_and_an_interrupted_run_resumes(checkpoints, tmp_path):
    import bitcompile

    model, schedules = checkpoints["autobitlinear"], tmp_path / "schedules"
    with pytest.raises(KeyboardInterrupt):
        tune.tune(model, trials=4, schedules=schedules, only="decode 64x64", progress=False, stop_after=2)
    store = records.RecordStore(schedules, TARGET)
    assert not list(store.dir.glob("*.json")), "an interrupted kernel must not leave a record"
    (work_dir,) = (store.dir / ".tuning").iterdir()
    measured_before = len((work_dir / "database_tuning_record.json").read_text().splitlines())
    assert measured_before >= 2

    (row,) = tune.tune(model, trials=4, schedules=schedules, only="decode 64x64", progress=False)
    assert row["trials"] == 4  # resumed: the earlier measurements count
    (record_path,) = store.dir.glob("*.json")
    assert json.loads(record_path.read_text())["knobs"] == row["knobs"]

    art = bitcompile.compile(model, output=tmp_path / "tuned.bitc", progress=False, schedules=schedules)
    used = json.loads((art / "manifest.json").read_text())["schedules"]
    assert len(used["tuned"]) == 1 and "int8[1,64]" in used["tuned"][0]
    ids = np.random.default_rng(3).integers(0, 256, 24).tolist()
    got, want = bitcompile.load(art).logits(ids), ReferenceModel(load_checkpoint(model)).logits(ids)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@needs_vnni
def test_committed_records_verify_exactly():
    store = records.RecordStore(None, TARGET)
    paths = sorted(store.dir.glob("*.json"))
    if not paths:
        pytest.skip(f"no committed tuning records for this machine's target ({store.dir.name})")
    for path in paths:
        tune.verify_record(path, TARGET)


@needs_vnni
def test_structural_knobs_get_a_design_space_per_value_and_are_read_back():
    """The tile of rows, the prefetch and the row blocks (with the tile: accumulators on the stack or
    not) choose the instructions: a replayed trace cannot change them, so each combination is a space
    of its own, and every knob comes back from the (simplified) trace."""
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": ternary.ternary_matmul_func(None, 128, 256)}))
    knobs = x86.TERNARY_VNNI.space(sch)
    spaces = tune.knob_space_fn(x86.TERNARY_VNNI, knobs)(sch)
    chosen = [tune.knobs_of(space.trace.simplified(remove_postproc=True), list(knobs)) for space in spaces]
    assert sorted((c["m_tile"], c["prefetch"], c["row_blocks"]) for c in chosen) == sorted(
        itertools.product(knobs["m_tile"], knobs["prefetch"], knobs["row_blocks"]))
    for c in chosen:
        assert c["k_unroll"] in knobs["k_unroll"]


def test_batched_decode_kernels_are_tuned_apart_from_prefill(checkpoints):
    """batch_decode's linears (a few rows) and prefill's (a prompt chunk) are one function but two
    kernels to tune: each shape has decode, prefill and batch tasks, with records of their own."""
    from bitcompile.compiler.targets import resolve_target

    tasks = tune.extract_tasks(checkpoints["autobitlinear"], resolve_target("host"), "bf16")
    by_kind: dict[str, set] = {}
    for task in tasks:
        kind, shape = task.name.split()[1:]
        by_kind.setdefault(kind, set()).add(shape)
    assert set(by_kind) == {"decode", "prefill", "batch"} and by_kind["batch"] == by_kind["prefill"]
    batch = next(t for t in tasks if " batch " in t.name)
    prefill = next(t for t in tasks if t.name == batch.name.replace("batch", "prefill"))
    assert (batch.measured_tokens, prefill.measured_tokens) == (tune.BATCH_ROWS, tune.PREFILL_TOKENS)
    batch_key, prefill_key = (records.kernel_key(t.func, TARGET) for t in (batch, prefill))
    assert batch_key["rows"] == "batch" and "rows" not in prefill_key
    assert batch_key["row_tile"] == prefill_key["row_tile"] == str(ternary.CPU_ROW_TILE)  # CPUs pad rows to 4s
    assert records.key_digest(batch_key) != records.key_digest(prefill_key)


@needs_vnni
@pytest.mark.parametrize("head", ["int8", "q4"])
def test_the_head_is_a_tuning_task_of_its_own(checkpoints, head):
    """With the int8 or 4-bit head, its one-row kernel (decode, the prompt's last position) and its
    several-row kernel (a batched step's logits) are tasks too, measured at 1 and BATCH_ROWS rows."""
    from bitcompile.compiler.targets import resolve_target

    tasks = tune.extract_tasks(checkpoints["autobitlinear"], resolve_target("host"), head)
    heads = {t.name.split()[1]: t for t in tasks if t.op == f"lm_head_{head}"}
    assert set(heads) == {"decode", "batch"}
    assert (heads["decode"].measured_tokens, heads["batch"].measured_tokens) == (1, tune.BATCH_ROWS)
    assert "x_pad" in heads["batch"].measured_func().script()  # measured as compiled: rows padded to tiles
