"""The runtime path runs where the TVM compiler library does not exist (as on a Raspberry Pi)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tvm

from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel

RUNTIME_SCRIPT = r"""
import json, sys
import numpy as np
import bitcompile
engine = bitcompile.load(sys.argv[1])
logits = engine.logits([1, 2, 3, 4, 5, 6])
text = engine.generate("hello", max_new_tokens=8, temperature=0)
try:
    import tvm.relax.frontend.nn  # the compiler's Python side needs libtvm_compiler
    compiler_usable = True
except Exception:
    compiler_usable = False
maps = open("/proc/self/maps").read()
np.save(sys.argv[2], logits)
print(json.dumps({"text": text, "compiler_mapped": "libtvm_compiler" in maps,
                  "runtime_mapped": "libtvm_runtime" in maps,
                  "build_imported": "bitcompile.compiler.build" in sys.modules, "compiler_usable": compiler_usable}))
"""


def tvm_without_compiler(root: Path) -> Path:
    """A copy of the tvm package (symlinks) whose lib/ holds only the runtime libraries."""
    real = Path(tvm.__file__).parent
    pkg = root / "tvm"
    pkg.mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != "lib":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "lib").mkdir()
    for lib in (real / "lib").iterdir():
        if "compiler" not in lib.name:
            (pkg / "lib" / lib.name).symlink_to(lib)
    return root


def test_artifact_runs_without_the_tvm_compiler(artifacts, checkpoints, tmp_path):
    site = tvm_without_compiler(tmp_path / "site")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo)])}
    env.pop("TVM_LIBRARY_PATH", None)
    out = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT, str(artifacts["autobitlinear"]),
                          str(tmp_path / "logits.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["runtime_mapped"] and not result["compiler_mapped"]
    assert not result["compiler_usable"] and not result["build_imported"]
    want = ReferenceModel(load_checkpoint(checkpoints["autobitlinear"])).logits([1, 2, 3, 4, 5, 6])
    got = np.load(tmp_path / "logits.npy")
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert result["text"]


def test_embedding_rows_are_read_from_the_file_exactly(engine, checkpoints):
    """The runtime reads the prompt's embedding rows itself (no mapped gather); they must be the
    checkpoint's bf16 rows bit for bit, in prompt order, repeats included."""
    table = load_checkpoint(checkpoints["autobitlinear"]).embed.view(np.uint16)
    ids = [5, 0, len(table) - 1, 5, 17]
    np.testing.assert_array_equal(engine._embedding_rows(ids), table[ids])


def test_runtime_keeps_torch_out_of_the_process_but_importable():
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        import pytest

        pytest.skip("torch is not installed here, so there is nothing to keep out")
    script = ("import sys\nfrom bitcompile.runtime.engine import import_tvm_runtime\nimport_tvm_runtime()\n"
              "print('torch' in sys.modules)\nimport torch\nprint(torch.ones(2).sum().item())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "2.0"]


THREADS_SCRIPT = r"""
import json, sys
import bitcompile, tvm
bitcompile.load(sys.argv[1]).generate("hello", max_new_tokens=2, temperature=0)
print(json.dumps(tvm.get_global_func("runtime.NumThreads")()))
"""


def _cores_by_lscpu() -> int:
    """Cores of the CPUs this process may use, as util-linux's lscpu counts them (one per core and socket)."""
    rows = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    allowed = os.sched_getaffinity(0)
    cores = {tuple(row.split(",")[1:]) for row in rows.splitlines()
             if row and not row.startswith("#") and int(row.split(",")[0]) in allowed}
    return len(cores)


def test_the_runtime_uses_a_thread_per_core_unless_told(artifacts):
    """TVM's own default on x86 is half the logical CPUs (it assumes SMT): one thread on a 2-core machine."""
    import shutil

    if shutil.which("lscpu") is None:
        import pytest

        pytest.skip("lscpu (util-linux) is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    run = lambda env: json.loads(subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT, str(artifacts["autobitlinear"])], env=env, capture_output=True,
        text=True, timeout=300, check=True).stdout.strip().splitlines()[-1])
    assert run(env) == _cores_by_lscpu()
    assert run({**env, "TVM_NUM_THREADS": "1"}) == 1  # the user's setting wins
