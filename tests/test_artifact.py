"""The artifact: sealed by sha256, refused when corrupt, foreign or built for another machine, and
never left half-written."""

import json
import shutil

import pytest

import bitcompile
from bitcompile.compiler.targets import TargetError
from bitcompile.model.config import CheckpointError
from bitcompile.runtime.artifact import ArtifactError, _sealed_text


@pytest.fixture
def art(artifacts, tmp_path):
    d = tmp_path / "copy.bitc"
    shutil.copytree(artifacts["autobitlinear"], d)
    return d


def edit_manifest(d, fn):
    """Change the manifest and seal it again (as someone who knows the format could): the checks after
    the seal must hold on their own (test_trust.py: an unsealed edit is refused at the seal)."""
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(_sealed_text(m))


def test_manifest_describes_the_artifact(artifacts):
    m = json.loads((artifacts["autobitlinear"] / "manifest.json").read_text())
    assert m["format"] == "bitcompile-artifact" and m["format_version"] == 4
    assert set(m["files"]) >= {"model.so", "params.bin", "tokenizer.json"}
    assert all(len(h) == 64 for h in m["files"].values())
    assert m["target"]["name"] == "host" and m["target"]["tvm"]["kind"] == "llvm"
    assert m["versions"]["bitcompile"] == bitcompile.__version__ and m["versions"]["tvm"].startswith("0.27")
    assert m["model"]["hidden_size"] == 64
    # ternary weights stay 2-bit: the packed qkv matrix is (q+2kv)/16 x hidden/16 x 64 bytes of uint8
    qkv = m["params"]["layers.0.self_attn.qkv_proj.weight"]
    assert qkv["dtype"] == "uint8" and qkv["shape"] == [(64 + 2 * 32) // 16, 64 // 16, 64]


@pytest.mark.parametrize("victim", ["model.so", "params.bin", "tokenizer.json"])
def test_corrupt_file_is_refused_before_loading(art, victim):
    data = bytearray((art / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{victim} does not match its sha256"):
        bitcompile.load(art)


def test_missing_file_is_refused(art):
    (art / "params.bin").unlink()
    with pytest.raises(ArtifactError, match="params.bin is missing"):
        bitcompile.load(art)


def test_foreign_directories_are_refused(tmp_path, checkpoints):
    with pytest.raises(ArtifactError, match="no manifest.json; this is not a bitcompile artifact"):
        bitcompile.load(checkpoints["autobitlinear"])
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a bitcompile manifest"):
        bitcompile.load(tmp_path)
    (tmp_path / "manifest.json").write_text("\x00garbage")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        bitcompile.load(tmp_path)
    with pytest.raises(ArtifactError, match="not a directory"):
        bitcompile.load(tmp_path / "nope")


@pytest.mark.parametrize("version", [99, 1, 3])
def test_other_format_versions_are_refused(art, version):
    edit_manifest(art, lambda m: m.update(format_version=version))
    with pytest.raises(ArtifactError, match=f"artifact format version {version}, this bitcompile reads version 4; "
                                            "recompile the model"):
        bitcompile.load(art)


def test_manifest_cannot_point_outside_the_artifact(art):
    edit_manifest(art, lambda m: m["files"].update({"../evil.so": "0" * 64}))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        bitcompile.load(art)


def test_artifact_for_another_machine_is_refused(art):
    def to_arm(m):
        m["target"].update(name="rpi5", requires={"arch": "aarch64", "device": "cpu", "cpu_features": ["asimddp"]})
    edit_manifest(art, to_arm)
    with pytest.raises(TargetError, match=r"compiled for target 'rpi5' \(aarch64\), but this machine is x86_64"):
        bitcompile.load(art)


def test_artifact_needing_missing_cpu_features_is_refused(art):
    edit_manifest(art, lambda m: m["target"]["requires"]["cpu_features"].append("amx_tile_imaginary"))
    with pytest.raises(TargetError, match="needs CPU features this machine lacks: amx_tile_imaginary"):
        bitcompile.load(art)


def test_failed_compile_leaves_nothing_behind(checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["autobitlinear"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # tensors for layer 2 do not exist
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2.input_layernorm.weight'"):
        bitcompile.compile(bad, output=out / "bad.bitc", progress=False)
    assert list(out.iterdir()) == []


def test_unknown_target_names_the_presets(checkpoints, tmp_path):
    with pytest.raises(TargetError, match="unknown target 'pdp11'; known targets: host, "):
        bitcompile.compile(checkpoints["autobitlinear"], target="pdp11", output=tmp_path / "x.bitc", progress=False)
    assert not (tmp_path / "x.bitc").exists()


def test_existing_output_is_not_overwritten_without_force(artifacts, checkpoints):
    with pytest.raises(FileExistsError, match="already exists"):
        bitcompile.compile(checkpoints["autobitlinear"], output=artifacts["autobitlinear"], progress=False)
