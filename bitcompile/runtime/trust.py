"""Signed artifacts: an Ed25519 signature of manifest.json (which holds the sha256 of every other file),
made with a private key at compile time and checked with trusted public keys before anything loads.

  manifest.sig   {"algorithm": "ed25519", "key": sha256 of the signer's public key (raw 32 bytes),
                  "signature": base64 of the signature of manifest.json's bytes}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) through `cryptography`, imported
only when signing or verifying.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from .artifact import MANIFEST, SIGNATURE, ArtifactError

ALGORITHM = "ed25519"
TRUST_ENV = "BITCOMPILE_TRUSTED_KEYS"  # deployments: public key files, separated like PATH


def keys_from_env() -> list[str]:
    """The trusted public keys a deployment sets in $BITCOMPILE_TRUSTED_KEYS (empty: none)."""
    return [k for k in os.environ.get(TRUST_ENV, "").split(os.pathsep) if k]


def signer_of(artifact: Path) -> str | None:
    """The fingerprint manifest.sig names (not verified: that takes a trusted key), or None."""
    try:
        return json.loads((Path(artifact) / SIGNATURE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TrustError(ArtifactError):
    """An artifact that is not signed by a trusted key (unsigned, signed by another key, or changed)."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise TrustError("signing and verifying artifacts needs the `cryptography` package: pip install "
                         "cryptography") from None
    return serialization, ed25519, InvalidSignature


def fingerprint(public_key) -> str:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def keygen(directory: str | Path) -> tuple[Path, Path]:
    """A new key pair: DIR/private.pem (mode 0600) and DIR/public.pem. Refuses to overwrite."""
    serialization, ed25519, _ = _crypto()
    directory = Path(directory)
    private_path, public_path = directory / "private.pem", directory / "public.pem"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; choose another directory (keys are never overwritten)")
    directory.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _load_private(path: str | Path):
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise TrustError(f"{path}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TrustError(f"{path}: not an Ed25519 key (make one with `bitcompile keygen`)")
    return key


def load_public(key: str | Path | bytes):
    """A trusted key: a PEM file's path, or its bytes."""
    serialization, ed25519, _ = _crypto()
    try:
        data = key if isinstance(key, bytes) else Path(key).read_bytes()
        public = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as e:
        raise TrustError(f"{key!r}: not a readable PEM public key ({e})") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise TrustError(f"{key!r}: not an Ed25519 public key (make one with `bitcompile keygen`)")
    return public


def sign(artifact: str | Path, private_key: str | Path) -> Path:
    """Write ARTIFACT/manifest.sig: the signature of its sealed manifest."""
    artifact = Path(artifact)
    key = _load_private(private_key)
    manifest = (artifact / MANIFEST).read_bytes()
    signature = {"algorithm": ALGORITHM, "key": fingerprint(key.public_key()),
                 "signature": base64.b64encode(key.sign(manifest)).decode()}
    path = artifact / SIGNATURE
    partial = path.with_name(f".{SIGNATURE}.{os.getpid()}")
    partial.write_text(json.dumps(signature, indent=2))
    partial.replace(path)
    return path


def verify(artifact: Path, trusted_keys) -> str:
    """Check ARTIFACT/manifest.sig against the trusted keys; the fingerprint of the key that signed it.
    The manifest holds every other file's sha256, which verify_files checks next."""
    _, _, invalid = _crypto()
    keys = {fingerprint(k): k for k in (load_public(k) for k in trusted_keys)}
    path = artifact / SIGNATURE
    expected = ", ".join(f[:16] + "…" for f in keys)
    if not path.is_file():
        raise TrustError(f"{artifact}: the artifact is not signed (no {SIGNATURE}), and only artifacts signed by "
                         f"trusted keys load ({expected}); sign it with `bitcompile sign ART --key private.pem`")
    try:
        record = json.loads(path.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
        signer = record["key"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise TrustError(f"{path}: not a bitcompile signature (corrupt)") from None
    if record.get("algorithm") != ALGORITHM:
        raise TrustError(f"{path}: signed with {record.get('algorithm')!r}; this bitcompile verifies {ALGORITHM}")
    if signer not in keys:
        raise TrustError(f"{artifact}: signed by key {signer[:16]}…, which is not among the trusted keys "
                         f"({expected})")
    try:
        keys[signer].verify(signature, (artifact / MANIFEST).read_bytes())
    except invalid:
        raise TrustError(f"{artifact}: the signature does not match the manifest: the artifact was changed after "
                         "it was signed") from None
    return signer
