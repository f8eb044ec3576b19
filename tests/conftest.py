import pytest

from bitcompile.synth import write_checkpoint


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
