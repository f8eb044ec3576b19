"""The README's main command on the shipped model."""

from bitcompile.cli import main, shipped_model


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
