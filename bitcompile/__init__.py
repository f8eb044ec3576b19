"""bitcompile: compile BitNet b1.58 ternary language models with Apache TVM, run them with the TVM runtime.

    import bitcompile
    bitcompile.compile("models/shakespeare-tiny", target="host", output="shakespeare.bitc")
    engine = bitcompile.load("shakespeare.bitc")
    print(engine.generate("ROMEO:", max_new_tokens=64))

`load` needs only the TVM runtime, numpy and tokenizers; `compile` needs the TVM compiler.
"""

from .version import __version__

__all__ = ["__version__", "compile", "load"]


def load(path, **kwargs):
    """Load a compiled artifact: returns an Engine (see bitcompile.runtime.Engine); e.g.
    load(path, max_batch=8, context_length=1024, trusted_keys=["public.pem"])."""
    from .runtime.engine import Engine

    return Engine(path, **kwargs)


def compile(model_dir, target="host", output=None, overwrite=False, progress=True, head=None,  # noqa: A001
            schedules=None, kv_cache=None, sign=None):
    """Compile a Hugging Face BitNet checkpoint directory for `target` into an artifact directory.

    head: lm_head storage, "bf16" | "int8" | "q4" | "f32" (default: int8 for vocabularies >= 32000, else bf16).
    schedules: folder of tuning records (default: the committed schedules/).
    kv_cache: "f32" | "f16" KV cache storage (default: f16 for vocabularies >= 32000, else f32).
    sign: an Ed25519 private key (PEM, from `bitcompile keygen`) to sign the artifact with."""
    from .compiler.build import compile_model

    return compile_model(model_dir, target=target, output=output, overwrite=overwrite, progress=progress, head=head,
                         schedules=schedules, kv_cache=kv_cache, sign=sign)
