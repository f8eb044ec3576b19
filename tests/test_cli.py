"""The `bitcompile` command line: synth -> compile -> run -> info, the shipped model, and errors."""

import subprocess
import sys

import pytest

from bitcompile.cli import main


def cli(*args):
    return main([str(a) for a in args])


def test_synth_compile_run_info(tmp_path, capsys):
    cli("synth", "--preset", "tiny", "--seed", "3", "-o", tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    cli("compile", tmp_path / "m", "--target", "host", "-o", tmp_path / "m.bitc")
    capsys.readouterr()
    cli("run", tmp_path / "m.bitc", "-p", "Hello", "-n", "12", "--temperature", "0")
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out) > len("Hello\n")
    cli("info", tmp_path / "m.bitc")
    info = capsys.readouterr().out
    assert "integrity     ok" in info and "2 layers, hidden 64" in info


def test_run_compiles_a_checkpoint_once_into_the_cache(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITCOMPILE_CACHE", str(tmp_path / "cache"))
    for _ in range(2):
        cli("run", checkpoints["autobitlinear"], "-p", "hi", "-n", "4", "--temperature", "0", "-q")
    assert len(list((tmp_path / "cache").glob("*.bitc"))) == 1
    assert capsys.readouterr().err.count("compiling") == 1


@pytest.mark.parametrize("args, message", [
    (["compile", "{ckpt}", "--target", "vax", "-o", "{tmp}/x"], "unknown target 'vax'; known targets: host"),
    (["run", "{tmp}", "-p", "x"], "neither a bitcompile artifact"),
    (["run", "{art}", "-p", "x", "--temperature", "-2"], "invalid temperature=-2.0"),
    (["run", "{art}", "-p", "x", "--top-p", "2"], "invalid top_p=2.0"),
    (["compile", "{tmp}/none", "-o", "{tmp}/y"], "no config.json"),
    (["info", "{tmp}"], "no manifest.json"),
    # the numbers a user types: NaN, infinities, huge and negative values, named with the rule
    (["run", "{art}", "-p", "x", "--temperature", "nan"], "invalid temperature=nan"),
    (["run", "{art}", "-p", "x", "--temperature", "inf"], "invalid temperature=inf"),
    (["run", "{art}", "-p", "x", "--top-p", "nan"], "invalid top_p=nan"),
    (["run", "{art}", "-p", "x", "--repetition-penalty=-inf"], "invalid repetition_penalty=-inf"),
    (["run", "{art}", "-p", "x", "--top-k", "-1"], "invalid top_k=-1"),
    (["run", "{art}", "-p", "x", "--seed", "-5"], "invalid seed=-5"),
    (["run", "{art}", "-p", "x", "-n", "-3"], "invalid max_new_tokens=-3"),
    (["run", "{art}", "-p", "x", "--context", "99999999999"], "invalid context_length=99999999999: must be an integer in 1..256"),
    (["run", "{art}", "-p", "x", "--context", "0"], "invalid context_length=0"),
    (["serve", "{art}", "--port", "70000"], "--port 70000: must be in 1..65535"),
    (["serve", "{art}", "--max-batch", "0"], "--max-batch 0: must be a positive integer"),
    (["serve", "{art}", "--max-batch", "100000"], "invalid max_batch=100000"),
    (["serve", "{art}", "--request-timeout", "nan"], "--request-timeout nan: must be a positive number"),
    (["serve", "{art}", "--prefill-chunk", "0"], "--prefill-chunk 0: must be a positive integer"),
    (["serve", "{art}", "--rate-limit", "lots"], "--rate-limit 'lots': give a positive count per minute"),
    (["serve", "{art}", "--api-key-file", "{tmp}/none"], "--api-key-file"),
    (["bench", "{art}", "--threads", "0"], "--threads '0': give comma-separated positive integers"),
    (["bench", "{art}", "--prompt", "0"], "--prompt, --gen, --repeat and --prefill-chunk must be positive"),
    (["tune", "{ckpt}", "--trials", "0"], "--trials must be at least 1"),
    (["tune", "{ckpt}", "--threads", "-2"], "--threads -2: must be a positive integer"),
    (["chat", "{art}", "-n", "-1"], "invalid max_new_tokens=-1"),
    (["chat", "{art}", "--temperature", "nan"], "invalid temperature=nan"),
])
def test_errors_name_the_problem(args, message, checkpoints, artifacts, tmp_path, capsys):
    fill = {"ckpt": checkpoints["autobitlinear"], "tmp": tmp_path, "art": artifacts["autobitlinear"]}
    with pytest.raises(SystemExit) as exit_info:
        cli(*[a.format(**fill) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_teaches():
    out = subprocess.run([sys.executable, "-m", "bitcompile.cli", "--help"], capture_output=True, text=True).stdout
    for word in ("compile", "run", "synth", "info", "targets", "examples:"):
        assert word in out
