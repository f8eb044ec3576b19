import os

import pytest

from bitcompile.tools.synth import write_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Random tiny checkpoints in the three on-disk formats: {format: path}."""
    root = tmp_path_factory.mktemp("ckpt")
    return {fmt: write_checkpoint(root / fmt, "tiny", fmt, seed=i)
            for i, fmt in enumerate(("autobitlinear", "bitlinear", "online"))}


@pytest.fixture(scope="session")
def artifacts(checkpoints, tmp_path_factory):
    """Each tiny checkpoint compiled for the host: {format: artifact path}."""
    import bitcompile

    root = tmp_path_factory.mktemp("art")
    return {fmt: bitcompile.compile(path, output=root / f"{fmt}.bitc", progress=False)
            for fmt, path in checkpoints.items()}


@pytest.fixture(scope="session")
def engine(artifacts):
    import bitcompile

    return bitcompile.load(artifacts["autobitlinear"])


def require(ok: bool, reason: str):
    """Skip a test whose tools are missing here; in CI (CI=1 or BITCOMPILE_REQUIRE_QEMU=1) fail instead,
    so the cross-compile and qemu tests can never be skipped silently there."""
    if ok:
        return
    if os.environ.get("CI") or os.environ.get("BITCOMPILE_REQUIRE_QEMU"):
        pytest.fail(f"{reason} (CI must run this test: .ci/run sets it up)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cross_build(checkpoints, tmp_path_factory):
    """The tiny checkpoint compiled for a target preset, once per session: cross_build("rpi5") -> path."""
    import bitcompile
    from bitcompile.compiler.cross import linker_for
    from bitcompile.compiler.targets import TargetError, resolve_target

    root = tmp_path_factory.mktemp("cross")
    built = {}

    def build(target: str):
        if target not in built:
            try:
                linker_for(resolve_target(target))
            except TargetError as e:
                require(False, str(e))
            built[target] = bitcompile.compile(checkpoints["autobitlinear"], target=target,
                                               output=root / f"{target}.bitc", progress=False)
        return built[target]

    return build
