"""The runtime: reads and verifies an artifact and runs it with the TVM runtime alone (no compiler).

Nothing here imports the TVM compiler, onnx, torch or the compiler side of bitcompile
(tests/test_layout.py holds it to that): this is what a Raspberry Pi or a GPU machine installs.
"""

from .engine import Engine

__all__ = ["Engine"]
