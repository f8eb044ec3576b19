"""Artifact trust: the sealed manifest (any change refused before the library loads), the config
checked against the parameters, and Ed25519-signed artifacts."""

import json
import os
import random
import shutil
import stat

import pytest

import bitcompile
from bitcompile.cli import main
from bitcompile.runtime.artifact import LIBRARY, MANIFEST, ArtifactError, _sealed_text
from bitcompile.runtime.trust import TrustError, fingerprint, keygen, load_public, sign


@pytest.fixture
def art(artifacts, tmp_path):
    copy = tmp_path / "a.bitc"
    shutil.copytree(artifacts["autobitlinear"], copy)
    return copy


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {"mine": keygen(root / "mine"), "other": keygen(root / "other")}


def library_mapped(artifact) -> bool:
    with open("/proc/self/maps") as f:
        return str((artifact / LIBRARY).resolve()) in f.read()


def test_any_one_byte_change_to_the_manifest_is_refused_before_the_library_loads(art):
    original = (art / MANIFEST).read_bytes()
    rng = random.Random(0)
    positions = sorted(rng.sample(range(len(original)), 40)) + [0, len(original) - 1]
    for at in positions:
        changed = bytearray(original)
        changed[at] = ord("0") if changed[at] != ord("0") else ord("1")
        (art / MANIFEST).write_bytes(bytes(changed))
        with pytest.raises(ArtifactError):
            bitcompile.load(art)
    assert not library_mapped(art)
    (art / MANIFEST).write_bytes(original)
    bitcompile.load(art)  # untouched, it loads
    assert library_mapped(art)


def test_an_edited_model_config_is_refused_as_a_modified_manifest(art):
    m = json.loads((art / MANIFEST).read_text())
    m["model"]["hidden_size"] = 128  # the change tried as a new user would
    (art / MANIFEST).write_text(json.dumps(m, indent=2))
    with pytest.raises(ArtifactError, match="the manifest was modified after it was sealed"):
        bitcompile.load(art)


def test_a_resealed_config_that_does_not_fit_the_parameters_is_refused(art):
    m = json.loads((art / MANIFEST).read_text())
    m["model"]["hidden_size"] = 128
    (art / MANIFEST).write_text(_sealed_text(m))  # sealed again by hand: the seal alone cannot tell
    with pytest.raises(ArtifactError, match=r"the model config does not match the parameters \(embed_tokens.weight "
                                            r"is \[384, 64\], the config implies \[384, 128\]"):
        bitcompile.load(art)
    assert not library_mapped(art)


def test_a_signed_artifact_loads_with_its_key(art, keys):
    sign(art, keys["mine"][0])
    engine = bitcompile.load(art, trusted_keys=[keys["other"][1], keys["mine"][1]])
    assert engine.signer and engine.generate("hi", max_new_tokens=3, temperature=0) is not None


def test_a_changed_file_of_a_signed_artifact_is_refused(art, keys):
    sign(art, keys["mine"][0])
    tok = art / "tokenizer.json"
    tok.write_bytes(tok.read_bytes().replace(b'"', b"'", 1))
    with pytest.raises(ArtifactError, match="tokenizer.json does not match its sha256"):
        bitcompile.load(art, trusted_keys=[keys["mine"][1]])


def test_a_manifest_resealed_without_the_key_is_refused(art, keys):
    sign(art, keys["mine"][0])
    m = json.loads((art / MANIFEST).read_text())
    m["files"]["tokenizer.json"] = "0" * 64
    (art / MANIFEST).write_text(_sealed_text(m))
    with pytest.raises(TrustError, match="the signature does not match the manifest: the artifact was changed"):
        bitcompile.load(art, trusted_keys=[keys["mine"][1]])
    assert not library_mapped(art)


def test_another_key_or_no_signature_is_refused(art, keys):
    with pytest.raises(TrustError, match="the artifact is not signed"):
        bitcompile.load(art, trusted_keys=[keys["mine"][1]])
    sign(art, keys["other"][0])
    with pytest.raises(TrustError, match="signed by key .*, which is not among the trusted keys"):
        bitcompile.load(art, trusted_keys=[keys["mine"][1]])
    assert not library_mapped(art)
    bitcompile.load(art)  # without trusted keys the seal and hashes still hold: it loads


def test_trusted_keys_from_the_environment(art, keys, monkeypatch):
    monkeypatch.setenv("BITCOMPILE_TRUSTED_KEYS", f"{keys['other'][1]}:{keys['mine'][1]}")
    with pytest.raises(TrustError, match="the artifact is not signed .*only artifacts signed by trusted keys load"):
        bitcompile.load(art)
    assert not library_mapped(art)
    sign(art, keys["mine"][0])
    assert bitcompile.load(art).signer == fingerprint(load_public(keys["mine"][1]))


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = keygen(tmp_path / "k")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(FileExistsError, match="keys are never overwritten"):
        keygen(tmp_path / "k")


def test_the_cli_signs_at_compile_time_and_runs_only_trusted(checkpoints, tmp_path, capsys):
    main(["keygen", "-o", str(tmp_path / "k")])
    out = tmp_path / "s.bitc"
    main(["compile", str(checkpoints["autobitlinear"]), "-o", str(out), "--sign", str(tmp_path / "k" / "private.pem")])
    assert (out / "manifest.sig").is_file()
    main(["run", str(out), "-p", "hi", "-n", "3", "--trust", str(tmp_path / "k" / "public.pem")])
    main(["info", str(out), "--trust", str(tmp_path / "k" / "public.pem")])
    fp = fingerprint(load_public(tmp_path / "k" / "public.pem"))
    assert f"signature     ok (signed by trusted key {fp})" in capsys.readouterr().out
    main(["info", str(out)])
    assert f"signature     signed by key {fp} (check it with --trust" in capsys.readouterr().out
    other = keygen(tmp_path / "o")[1]
    with pytest.raises(SystemExit):
        main(["run", str(out), "-p", "hi", "-n", "3", "--trust", str(other)])
    assert "not among the trusted keys" in capsys.readouterr().err
