"""The README's main command on the shipped model."""

from bitcompile.cli import main
from bitcompile.paths import shipped_model


def test_shipped_model_generates_shakespeare_like_text(tmp_path, monkeypatch, capsys):
    """`bitcompile run -p "ROMEO:"` with no model: the shipped model, compiled on first use."""
    assert (shipped_model() / "model.safetensors").is_file()
    monkeypatch.setenv("BITCOMPILE_CACHE", str(tmp_path / "cache"))
    main(["run", "-p", "ROMEO:", "-n", "64", "--seed", "0"])
    text = capsys.readouterr().out
    words = text.lower().split()
    assert text.startswith("ROMEO:") and len(words) > 20
    common = {"the", "and", "i", "to", "of", "my", "you", "a", "that", "is", "in", "thou", "me", "not", "with", "your"}
    assert sum(w.strip(",.;:!?'") in common for w in words) >= 5  # English, not noise


def test_shipped_model_matches_the_reference(tmp_path):
    """The trained checkpoint (real, not random, weights) through the compiler vs the numpy reference."""
    import numpy as np

    import bitcompile
    from bitcompile.model.checkpoint import load_checkpoint
    from bitcompile.reference import ReferenceModel

    engine = bitcompile.load(bitcompile.compile(shipped_model(), output=tmp_path / "s.bitc", progress=False))
    ids = engine.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    want = ReferenceModel(load_checkpoint(shipped_model())).logits(ids)
    assert np.abs(engine.logits(ids) - want).max() <= 1e-3 * np.abs(want).max()
