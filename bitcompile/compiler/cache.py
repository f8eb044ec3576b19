"""Checkpoints run by name (`bitcompile run MODEL`, `bench MODEL`) are compiled once into the cache.

Importing this module loads no TVM: a cached artifact then runs with the TVM runtime alone.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..paths import PACKAGE, cache_dir, data_dir
from ..runtime.artifact import MANIFEST, sha256_file
from ..version import __version__


def _checkpoint_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors")):
            h.update(f"{path.name}:{sha256_file(path)}".encode())
    return h.hexdigest()[:16]


def _compiler_digest() -> str:
    """Version plus a hash of the package's sources and tuning records: a cached artifact never
    outlives the code that compiled it (schedules change between commits, not only between releases)."""
    h = hashlib.sha256(__version__.encode())
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(data_dir("schedules").glob("*/*.json")):
        h.update(path.read_bytes())
    return f"{__version__}-{h.hexdigest()[:8]}"


def artifact_for(model_or_artifact: Path, target: str, head: str | None = None) -> Path:
    """An artifact path: given as one, or compiled from a checkpoint into the cache on first use."""
    if (model_or_artifact / MANIFEST).is_file():
        return model_or_artifact
    if not (model_or_artifact / "config.json").is_file():
        raise FileNotFoundError(f"{model_or_artifact}: neither a bitcompile artifact (manifest.json) nor a "
                                "Hugging Face checkpoint (config.json)")
    digest = _checkpoint_digest(model_or_artifact)
    out = cache_dir() / f"{model_or_artifact.name}-{digest}-{target}-{head or 'default'}-{_compiler_digest()}.bitc"
    if not (out / MANIFEST).is_file():
        from .build import compile_model

        print(f"compiling {model_or_artifact} for {target} (first use; cached in {out})", file=sys.stderr)
        compile_model(model_or_artifact, target=target, output=out, overwrite=True, head=head)
    return out
