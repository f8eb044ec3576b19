"""The compiled artifact on disk: one directory, described and sealed by manifest.json.

  manifest.json    format + version, target, model config, versions, params index, sha256 of every file,
                   and last its seal: the sha256 of everything before it (any change to the file is seen)
  manifest.sig     optional: an Ed25519 signature of manifest.json (trust.py)
  model.so         the compiled library (code: never loaded before every hash checks out)
  params.bin       all parameters, raw little-endian, each aligned to 64 bytes (mmap-able, zero copy)
  tokenizer.json   Hugging Face tokenizer (+ tokenizer_config.json: chat template, and
                   generation_config.json: eos ids, sampling defaults, when the checkpoint has them)

Imports only the standard library and numpy: the runtime uses it on devices without the compiler.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FORMAT = "bitcompile-artifact"
FORMAT_VERSION = 4  # 2: prefill/decode take the embedding rows the runtime reads, not token ids; 3: batch_decode,
# batch_prefill; 4: the manifest is sealed
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.bin"
TOKENIZER = "tokenizer.json"
SIGNATURE = "manifest.sig"
ALIGN = 64


class ArtifactError(ValueError):
    """A directory that is not a usable bitcompile artifact (missing, corrupt, foreign, too new)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_params(path: Path, params: Iterable[tuple[str, np.ndarray]]) -> dict[str, dict]:
    """Stream parameters into one aligned blob; return {name: {dtype, shape, offset, nbytes}}."""
    index = {}
    with open(path, "wb") as f:
        for name, array in params:
            array = np.ascontiguousarray(array)
            f.write(b"\0" * (-f.tell() % ALIGN))
            index[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "offset": f.tell(),
                           "nbytes": array.nbytes}
            f.write(memoryview(array).cast("B"))
    return index


def read_params(path: Path, index: dict[str, dict], order: list[str]) -> list[np.ndarray]:
    """Map the blob and return the parameters in `order` as zero-copy arrays (copy-on-write)."""
    blob = np.memmap(path, dtype=np.uint8, mode="c")
    arrays = []
    for name in order:
        e = index[name]
        arrays.append(blob[e["offset"] : e["offset"] + e["nbytes"]].view(e["dtype"]).reshape(e["shape"]))
    return arrays


def _sealed_text(manifest: dict) -> str:
    """manifest.json's exact text: the manifest without its seal, then the seal of that text."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "seal"}, indent=2)
    return body[:-1] + f',\n  "seal": "{hashlib.sha256(body.encode()).hexdigest()}"\n}}'


def seal(directory: Path, manifest: dict) -> dict:
    """Hash every file in the directory into the manifest and write manifest.json last, sealed."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {name: sha256_file(directory / name) for name in files}}
    (directory / MANIFEST).write_text(_sealed_text(manifest))
    return json.loads((directory / MANIFEST).read_text())


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory (expected a bitcompile artifact made by `bitcompile compile`)")
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; this is not a bitcompile artifact (make one with `bitcompile compile`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e}); recompile the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a bitcompile manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version}, this bitcompile reads version {FORMAT_VERSION}; "
            "recompile the model with this bitcompile"
        )
    if path.read_text() != _sealed_text(manifest):
        raise ArtifactError(f"{path}: the manifest was modified after it was sealed, or is corrupt (its seal does "
                            "not match its contents); copy the artifact again, or recompile the model")
    for key in ("files", "params", "param_order", "model", "target"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest has no '{key}'; recompile the model")
    return manifest


def verify_files(directory: Path, manifest: dict):
    """Every file the manifest names exists and hashes to its recorded sha256."""
    files = manifest["files"]
    for required in (LIBRARY, PARAMS, TOKENIZER):
        if required not in files:
            raise ArtifactError(f"{directory}: manifest does not list {required}; recompile the model")
    for name, digest in files.items():
        if Path(name).name != name:
            raise ArtifactError(f"{directory}: manifest names a file outside the artifact: {name!r}")
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: {name} is missing; the artifact is incomplete, recompile the model")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{directory}: {name} does not match its sha256 in {MANIFEST}; the artifact is "
                                "corrupt or was modified, recompile the model")


def expected_shapes(model: dict, head: str) -> dict[str, list[int]]:
    """The parameter shapes the manifest's model config implies (the graph's parameters)."""
    h, i, v = model["hidden_size"], model["intermediate_size"], model["vocab_size"]
    q = model["num_attention_heads"] * model["head_dim"]
    kv = model["num_key_value_heads"] * model["head_dim"]
    vp = -(-v // 16) * 16

    def ternary(n, k):
        return {"weight": [n // 16, k // 16, 64], "multiplier": [n]}

    shapes = {"embed_tokens.weight": [v, h], "norm.weight": [h]}
    for layer in range(model["num_hidden_layers"]):
        p = f"layers.{layer}."
        shapes |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                   p + "self_attn.attn_sub_norm.weight": [q], p + "mlp.ffn_sub_norm.weight": [i]}
        for name, (n, k) in {"self_attn.qkv_proj": (q + 2 * kv, h), "self_attn.o_proj": (h, q),
                             "mlp.gate_up_proj": (2 * i, h), "mlp.down_proj": (h, i)}.items():
            shapes |= {f"{p}{name}.{part}": shape for part, shape in ternary(n, k).items()}
    heads = {"int8": {"lm_head.weight": [vp // 16, h // 4, 64], "lm_head.scale": [v]},
             "q4": {"lm_head.weight": [vp // 16, h // 8, 64], "lm_head.scale": [vp // 16, h // 32, 16]},
             "f32": {"lm_head.weight": [v, h]}, "bf16": {"lm_head.weight": [v, h]}}
    if not (head == "bf16" and model.get("tie_word_embeddings", True)):
        shapes |= heads.get(head, {})
    return shapes


def check_shapes(directory: Path, manifest: dict):
    """The parameter index must be what the model config implies, name for name and shape for shape."""
    try:
        want = expected_shapes(manifest["model"], manifest.get("weights", {}).get("head", "bf16"))
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ArtifactError(f"{directory / MANIFEST}: the model config is incomplete ({e}); recompile the model") from None
    have = {name: entry.get("shape") for name, entry in manifest["params"].items()}
    wrong = [f"{name} is {have.get(name)}, the config implies {shape}" for name, shape in want.items()
             if have.get(name) != shape]
    extra = sorted(set(have) - set(want))
    if wrong or extra or set(manifest["param_order"]) - set(have):
        detail = "; ".join(wrong[:3] + [f"{name} is not a parameter of this model" for name in extra[:3]])
        raise ArtifactError(f"{directory / MANIFEST}: the model config does not match the parameters ({detail}); "
                            "the manifest was edited or is corrupt, recompile the model")
