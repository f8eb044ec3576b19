"""Where bitcompile finds its data and keeps its cache.

Data folders (targets/, schedules/, models/) sit beside the package in a checkout and inside it
(bitcompile/targets, …) when installed from a wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The data folder `name`: the checkout's when there is one, else the installed package's; the
    checkout's path when neither exists (so a message can name where it should be)."""
    for candidate in (PACKAGE.parent / name, PACKAGE / name):
        if candidate.is_dir():
            return candidate
    return PACKAGE.parent / name


def cache_dir() -> Path:
    """Compiled artifacts of checkpoints run by name, ONNX exports for bench, the CUDA driver stand-in."""
    return Path(os.environ.get("BITCOMPILE_CACHE", Path.home() / ".cache" / "bitcompile"))


def shipped_model() -> Path:
    """The small Shakespeare model that makes `bitcompile run` work offline."""
    model = data_dir("models") / "shakespeare-tiny"
    if not (model / "config.json").is_file():
        raise FileNotFoundError("the shipped model (models/shakespeare-tiny) is missing from this installation")
    return model
