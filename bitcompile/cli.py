"""The `bitcompile` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .model.head import HEAD_KINDS
from .paths import shipped_model

EXAMPLES = """\
examples:
  bitcompile run -p "ROMEO:" -n 64                     # the shipped Shakespeare model, compiled on first use
  bitcompile synth --preset tiny -o tiny-model         # a random checkpoint in the Hugging Face layout
  bitcompile compile tiny-model --target host -o tiny.bitc
  bitcompile run tiny.bitc -p "Hello" -n 32 --temperature 0
  bitcompile info tiny.bitc
  bitcompile serve tiny.bitc --port 8000               # OpenAI-compatible API on 127.0.0.1
  bitcompile chat tiny.bitc --system "Be brief."
"""


def cmd_compile(args):
    from .compiler.build import compile_model
    from .compiler.targets import resolve_target

    target = resolve_target(args.target, cpu=args.cpu, features=args.features)
    compile_model(args.model, target=target, output=args.output, overwrite=args.force, head=args.head,
                  schedules=args.schedules, kv_cache=args.kv_cache, sign=args.sign)


def cmd_tune(args):
    from .compiler.tune import tune

    if args.trials < 1:
        raise ValueError("--trials must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be a positive integer")
    for row in tune(args.model, target=args.target, trials=args.trials, head=args.head, schedules=args.schedules,
                    only=args.kernel, threads=args.threads, rpc=args.rpc, key=args.key):
        knobs = " ".join(f"{k}={v}" for k, v in row["knobs"].items())
        print(f"{row['kernel']:36s} {row['us']:9.1f} us  {knobs:26s} ({row['trials']} trials) -> {row['record']}")


def cmd_run(args):
    _, engine = _load_engine(args, context_length=args.context)
    prompt = args.prompt
    if not args.quiet:
        sys.stdout.write(prompt)
    for piece in engine.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=args.seed, stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _load_engine(args, **options):
    """An artifact (compiled for the host on first use when MODEL is a checkpoint), loaded with the
    TVM runtime alone when nothing had to be compiled."""
    from .compiler.cache import artifact_for

    source = Path(args.model) if args.model else shipped_model()
    artifact = artifact_for(source, args.target)
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # nothing was compiled: load only the TVM runtime
    from .runtime.engine import Engine

    return artifact, Engine(artifact, trusted_keys=args.trust, **options)


def cmd_keygen(args):
    from .runtime.trust import fingerprint, keygen, load_public

    private, public = keygen(args.output)
    print(f"wrote {private} (keep it secret; mode 0600) and {public} (give it to those who load your artifacts)")
    print(f"key fingerprint {fingerprint(load_public(public))}")


def cmd_sign(args):
    from .runtime.artifact import read_manifest, verify_files
    from .runtime.trust import sign

    artifact = Path(args.artifact)
    verify_files(artifact, read_manifest(artifact))  # sign only what is intact
    print(f"wrote {sign(artifact, args.key)}")


def cmd_serve(args):
    from .serve.limits import RateLimiter, parse_rate, read_api_keys

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be in 1..65535")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout {args.request_timeout}: must be a positive number of seconds")
    keys = read_api_keys(args.api_key_file) if args.api_key_file else None
    limiter = RateLimiter(parse_rate(args.rate_limit, "--rate-limit"), parse_rate(args.token_limit, "--token-limit"))
    if args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk {args.prefill_chunk}: must be a positive integer")
    artifact, engine = _load_engine(args, max_batch=args.max_batch, context_length=args.context,
                                    max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    from .serve.app import serve

    name = args.model_name or Path(artifact).name.removesuffix(".bitc")
    print(f"serving {name} ({artifact}) on http://{args.host}:{args.port}/v1 "
          f"(max batch {engine.max_batch}, context {engine.context_length})", file=sys.stderr)
    serve(engine, name, args.host, args.port, api_keys=keys, limiter=limiter, max_prompt_tokens=args.max_prompt_tokens,
          max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
          request_timeout_s=args.request_timeout, log_prompts=args.log_prompts)


def cmd_chat(args):
    artifact, engine = _load_engine(args, context_length=args.context)
    if engine.chat_template is None:
        raise ValueError(f"{artifact}: the model has no chat template (tokenizer_config.json has no chat_template); "
                         "use `bitcompile run` for plain completion")
    sampling = {**engine.generation_defaults, "max_new_tokens": args.max_new_tokens,
                **({"temperature": args.temperature} if args.temperature is not None else {}),
                **({"seed": args.seed} if args.seed is not None else {})}
    from .runtime.sampling import SamplingParams

    SamplingParams(**{k: v for k, v in sampling.items() if k in ("temperature", "top_p", "seed")})
    if args.max_new_tokens < 0:
        raise ValueError(f"invalid max_new_tokens={args.max_new_tokens}: must be an integer >= 0")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("chat: /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        turn = engine.submit(engine.chat_prompt(history), **sampling)  # earlier turns: a reused prefix
        for piece in turn:
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(f"[{turn.prompt_tokens} prompt tokens, {turn.prefix_reused} of them from the cache; "
              f"{turn.completion_tokens} generated]", file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(reply)})
    engine.close()


def cmd_bench(args):
    from .tools.bench import run_bench

    threads = _positive_ints("--threads", args.threads)
    concurrency = _positive_ints("--concurrency", args.concurrency) if args.concurrency else None
    if args.prompt < 1 or args.gen < 1 or args.repeat < 1 or args.prefill_chunk < 1:
        raise ValueError("--prompt, --gen, --repeat and --prefill-chunk must be positive")
    source = Path(args.model) if args.model else shipped_model()
    baseline = None if args.baseline == "none" else args.baseline
    if args.http and not concurrency:
        raise ValueError("--http compares the HTTP server with --concurrency N,...: give both")
    run_bench(source, threads, args.prompt, args.gen, baseline, args.head, args.json, repeat=args.repeat,
              concurrency=concurrency, http=args.http, prefill_chunk=args.prefill_chunk)


def _positive_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag} {text!r}: give comma-separated positive integers, e.g. 1,4,8")
    return values


def cmd_synth(args):
    from tqdm import tqdm

    from .tools.synth import PRESETS, write_checkpoint

    layers = PRESETS[args.preset]["num_hidden_layers"]
    with tqdm(total=layers, desc=f"synth {args.preset}", unit="layer") as bar:
        out = write_checkpoint(args.output, args.preset, args.format, args.seed, overwrite=args.force,
                               progress=bar.update)
    print(f"wrote {out}")


def cmd_info(args):
    from .runtime.artifact import read_manifest, verify_files

    path = Path(args.artifact)
    m = read_manifest(path)
    cfg, tgt = m["model"], m["target"]
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    if args.json:
        print(json.dumps(m, indent=2))
        return
    print(f"artifact      {path}  ({size / 1e6:.1f} MB, format v{m['format_version']})")
    print(f"target        {tgt['name']}  {json.dumps(tgt['tvm'])}")
    req = tgt["requires"]
    gpu = f" + an NVIDIA GPU of {req['cuda_arch']} (CUDA 13 runtime)" if req.get("device") == "cuda" else ""
    print(f"requires      {' '.join([req['arch'], *req['cpu_features']])}{gpu}")
    print(f"model         {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, ffn {cfg['intermediate_size']}, "
          f"heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']}, vocab {cfg['vocab_size']}, "
          f"context {cfg['max_position_embeddings']}")
    print(f"weights       {m.get('weights')}")
    print(f"built with    {m.get('versions')}")
    try:
        verify_files(path, m)
        print("integrity     ok (the manifest's seal, and every file matches its sha256)")
        from .runtime.trust import signer_of, verify

        if args.trust:
            print(f"signature     ok (signed by trusted key {verify(path, args.trust)})")
        elif signer_of(path):
            print(f"signature     signed by key {signer_of(path)} (check it with --trust PUBLIC.pem)")
        else:
            print("signature     none (unsigned)")
    except ValueError as e:
        print(f"integrity     FAILED: {e}")
        sys.exit(1)


def cmd_export_onnx(args):
    from .tools.onnx_export import export_onnx

    out = Path(args.output)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; choose another --output or pass --force to replace it")
    print(f"wrote {export_onnx(args.model, out, head=args.head)}")


def cmd_targets(args):
    from .compiler.cross import build_status
    from .compiler.targets import preset_names, resolve_target

    for name in preset_names():
        spec = resolve_target(name)
        print(f"{name:14s} {spec.arch:7s} {spec.description}\n{'':14s} {'':7s} build: {build_status(spec)}")
    print("\nor a triple with a CPU and features: bitcompile compile MODEL --target aarch64-linux-gnu "
          "--cpu cortex-a76 --features +dotprod")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitcompile", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Compile BitNet b1.58 ternary language models with Apache TVM and run them.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a Hugging Face BitNet checkpoint into an artifact",
                       description="Compile a checkpoint directory (config.json, model.safetensors, tokenizer.json) "
                                   "into one self-contained artifact directory for a target.")
    c.add_argument("model", help="checkpoint directory")
    c.add_argument("--target", "-t", default="host",
                   help="target preset or triple (see `bitcompile targets`; default: host)")
    c.add_argument("--cpu", help="LLVM CPU name replacing the target's (e.g. cortex-a76)")
    c.add_argument("--features", help="LLVM features added to the target's, comma-separated (e.g. +dotprod,+i8mm)")
    c.add_argument("--output", "-o", help="artifact directory to write (default: MODEL-TARGET.bitc)")
    c.add_argument("--head", choices=HEAD_KINDS,
                   help="lm_head storage: bf16 (exact), int8 (per-row scale, half the bytes per token), "
                        "q4 (4-bit, a scale per 32 inputs, a quarter), f32; default int8 for vocabularies "
                        ">= 32000, else bf16")
    c.add_argument("--kv-cache", choices=["f32", "f16"],
                   help="KV cache storage: f32 (exact) or f16 (half the memory per token); default f16 for "
                        "vocabularies >= 32000, else f32")
    c.add_argument("--force", action="store_true", help="replace an existing artifact")
    c.add_argument("--sign", metavar="PRIVATE.pem", help="sign the artifact with this Ed25519 key "
                                                         "(`bitcompile keygen`); loaders check it with --trust")
    c.add_argument("--schedules", metavar="DIR", help="tuning records to apply (default: the committed schedules/); "
                                                      "kernels without a matching record get the default schedule")
    c.set_defaults(func=cmd_compile)

    u = sub.add_parser("tune", help="autotune the ternary kernels and the int8/q4 heads on this machine; records go "
                                    "to schedules/",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Search the knobs of the ternary kernels' and the int8/q4 heads' schedule "
                                   "templates (row blocks, unrolling, rows per register tile, prefetch) with "
                                   "MetaSchedule, timing each "
                                   "candidate on this machine. Each kernel's best knobs are checked against exact "
                                   "integer results, then saved as a record in schedules/<target>/ that every later "
                                   "`bitcompile compile` for that target applies. Ctrl-C keeps what was measured; "
                                   "run it again to resume.",
                       epilog="example:\n  bitcompile tune 2b4t --trials 32\n  bitcompile compile 2b4t -o 2b4t.bitc"
                              "   # says: schedules: 14 tuned kernels from schedules/x86_64-znver4")
    u.add_argument("model", help="checkpoint directory (only config.json is read: kernels depend on shapes)")
    u.add_argument("--target", "-t", default="host", help="target preset (default: host)")
    u.add_argument("--trials", type=int, default=32, help="measured candidates per kernel (default 32; "
                                                          "small spaces finish early)")
    u.add_argument("--head", choices=HEAD_KINDS, help="lm_head option (as for compile)")
    u.add_argument("--kernel", metavar="TEXT", help="tune only kernels whose name contains TEXT, "
                                                   "e.g. decode or 2560x6912")
    u.add_argument("--schedules", metavar="DIR", help="records folder (default: the committed schedules/)")
    u.add_argument("--threads", type=int, help="threads that time each candidate here (default: all cores)")
    u.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker of the device to tune on (see README: "
                                                      "tuning on a Raspberry Pi); candidates are cross-linked here")
    u.add_argument("--key", help="the device's key at the tracker (with --rpc)")
    u.set_defaults(func=cmd_tune)

    r = sub.add_parser("run", help="generate text from an artifact or a checkpoint",
                       description="Generate text. MODEL is an artifact, or a checkpoint directory that is compiled "
                                   "for the host on first use (cached in $BITCOMPILE_CACHE or ~/.cache/bitcompile). "
                                   "Without MODEL, the shipped Shakespeare model is used.")
    r.add_argument("model", nargs="?", help="artifact or checkpoint directory (default: the shipped model)")
    r.add_argument("--prompt", "-p", required=True, help="text to continue")
    r.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate (default 128)")
    r.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    r.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    r.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    r.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    r.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    r.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    r.add_argument("--context", type=int, help="context length in tokens (default: the model's maximum)")
    r.add_argument("--target", default="host", help="target used when compiling a checkpoint (default host)")
    r.add_argument("--quiet", "-q", action="store_true", help="print only the generated text, not the prompt")
    r.add_argument("--trust", action="append", metavar="PUBLIC.pem", help="load only an artifact signed by this "
                   "key (repeatable: any of them)")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="bitcompile vs ONNX Runtime: prefill/decode speed, memory, bandwidth",
                       description="Benchmark the compiled model against ONNX Runtime on the same model in one run. "
                                   "Each engine runs in its own process; decode speed is related to this machine's "
                                   "measured read bandwidth (bytes read per token x tokens/s). Try: "
                                   "bitcompile synth --preset 2b4t -o 2b4t && bitcompile bench 2b4t --threads 1,2. "
                                   "An artifact compiled for an NVIDIA GPU (--target cuda-sm90) is benchmarked on GPU 0 "
                                   "against its device-to-device copy bandwidth and, with PyTorch installed, torch "
                                   "bf16 running the same linears, plus the GPU time of each kernel of a decode step.")
    b.add_argument("model", nargs="?", help="checkpoint directory or artifact (default: the shipped model)")
    b.add_argument("--threads", default="2", help="comma-separated thread counts (default 2)")
    b.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    b.add_argument("--gen", type=int, default=128, help="generated tokens (default 128)")
    b.add_argument("--baseline", choices=["onnxruntime", "none"], default="onnxruntime")
    b.add_argument("--head", choices=HEAD_KINDS, help="lm_head option for the compiled model")
    b.add_argument("--repeat", type=int, default=3, help="runs per engine and thread count, and rounds of the "
                                                         "--concurrency rows; the median is reported (default 3)")
    b.add_argument("--concurrency", metavar="N,N,...", help="also run N concurrent requests through the batching "
                   "scheduler (e.g. 1,4,8,16; all at once and staggered): aggregate decode tok/s, TTFT and "
                   "inter-token latency p50/p99, peak RSS, beside concurrency 1")
    b.add_argument("--prefill-chunk", type=int, default=128, help="with --concurrency: prompt tokens per step "
                   "(default 128); smaller chunks delay running streams less, first tokens more")
    b.add_argument("--http", action="store_true", help="with --concurrency: also the same requests as streaming "
                                                           "clients of `bitcompile serve` on loopback (the HTTP cost)")
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("synth", help="write a random ternary checkpoint in the Hugging Face layout",
                       description="Write a random BitNet checkpoint (packed weights, tokenizer of the right size). "
                                   "tiny and small are for tests; 2b4t has the exact shape of "
                                   "microsoft/bitnet-b1.58-2B-4T.")
    s.add_argument("--preset", choices=["tiny", "small", "2b4t"], default="tiny")
    s.add_argument("--format", choices=["autobitlinear", "bitlinear", "online"], default="autobitlinear",
                   help="packed weights with weight_scale multiplied (autobitlinear) or divided (bitlinear), "
                        "or bf16 master weights (online)")
    s.add_argument("--output", "-o", required=True, help="directory to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace an existing directory")
    s.set_defaults(func=cmd_synth)

    i = sub.add_parser("info", help="describe an artifact and check its integrity")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.add_argument("--trust", action="append", metavar="PUBLIC.pem", help="load only an artifact signed by this "
                   "key (repeatable: any of them)")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("export-onnx", help="write the same model as an ONNX Runtime graph (the baseline)",
                       description="Write the checkpoint as an ONNX graph for ONNX Runtime: MatMulNBits 2-bit "
                                   "(accuracy_level 4) ternary layers, GroupQueryAttention with KV cache, the tied "
                                   "head as MatMulNBits 8- or 4-bit. Needs the `baseline` extra (onnx, onnxruntime).")
    x.add_argument("model", help="checkpoint directory")
    x.add_argument("--output", "-o", required=True, help="model.onnx to write (weights over 256 MB go beside it)")
    x.add_argument("--head", choices=["int8", "int4", "f32"], default="int8", help="lm_head precision (default int8)")
    x.add_argument("--force", action="store_true", help="replace an existing file")
    x.set_defaults(func=cmd_export_onnx)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, metrics)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve an artifact (or a checkpoint, compiled for the host on first use) over HTTP "
                                   "with the OpenAI API: POST /v1/completions, POST /v1/chat/completions, GET "
                                   "/v1/models, GET /health, GET /metrics (Prometheus). Requests share the batching "
                                   "engine. Binds 127.0.0.1 unless --host says otherwise.",
                       epilog="example:\n  bitcompile serve tiny.bitc --port 8000 --max-batch 8\n"
                              "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
                              "       -d '{\"prompt\": \"ROMEO:\", \"max_tokens\": 32}'")
    v.add_argument("model", nargs="?", help="artifact or checkpoint directory (default: the shipped model)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    v.add_argument("--context", type=int, help="tokens per sequence (default: the model's maximum); the KV "
                                               "cache holds max-batch x context tokens")
    v.add_argument("--max-queue", type=int, default=64, help="requests that may wait for room before the server "
                                                             "answers 503 (default 64)")
    v.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens per step (default 128): smaller chunks delay the running streams less "
                        "while a prompt comes in (2B-4T, 8 streams: p99 inter-token 0.86 s at 128, 0.2 s at 16), "
                        "first tokens come later")
    v.add_argument("--api-key-file", metavar="FILE", help="require 'Authorization: Bearer KEY' with a key from FILE "
                                                          "(one per line)")
    v.add_argument("--rate-limit", metavar="N/min", help="requests per minute per key (or client address)")
    v.add_argument("--token-limit", metavar="N/min", help="prompt + generated tokens per minute per key")
    v.add_argument("--max-prompt-tokens", type=int, help="longest prompt taken (default: the context)")
    v.add_argument("--max-tokens-limit", type=int, help="largest max_tokens taken (default: the context)")
    v.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    v.add_argument("--request-timeout", type=float, help="seconds a request may take before it is cancelled")
    v.add_argument("--model-name", help="the model id clients use (default: the artifact's name)")
    v.add_argument("--log-prompts", action="store_true", help="include prompt text in the request log")
    v.add_argument("--target", default="host", help=argparse.SUPPRESS)
    v.add_argument("--trust", action="append", metavar="PUBLIC.pem", help="load only an artifact signed by this "
                   "key (repeatable: any of them)")
    v.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="talk to a model in the terminal, with its chat template",
                        description="An interactive conversation: streaming replies, the history kept (earlier "
                                    "turns are a reused prefix in the KV cache, not prefilled again). /reset starts "
                                    "over, /exit leaves.")
    ch.add_argument("model", nargs="?", help="artifact or checkpoint directory (default: the shipped model)")
    ch.add_argument("--system", help="a system prompt")
    ch.add_argument("--max-new-tokens", "-n", type=int, default=256, help="most tokens per reply (default 256)")
    ch.add_argument("--temperature", type=float, help="default: the model's generation_config, else 0.8")
    ch.add_argument("--seed", type=int)
    ch.add_argument("--context", type=int, help="tokens of conversation kept (default: the model's maximum)")
    ch.add_argument("--target", default="host", help=argparse.SUPPRESS)
    ch.add_argument("--trust", action="append", metavar="PUBLIC.pem", help="load only an artifact signed by this "
                   "key (repeatable: any of them)")
    ch.set_defaults(func=cmd_chat)

    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts",
                       description="Write DIR/private.pem (mode 0600: sign with it, keep it secret) and DIR/public.pem "
                                   "(load with it: --trust DIR/public.pem, or bitcompile.load(..., trusted_keys=[...])).")
    k.add_argument("--output", "-o", required=True, metavar="DIR", help="directory for the two key files")
    k.set_defaults(func=cmd_keygen)

    g = sub.add_parser("sign", help="sign an artifact (its sealed manifest) with a private key")
    g.add_argument("artifact")
    g.add_argument("--key", required=True, metavar="PRIVATE.pem", help="Ed25519 private key from `bitcompile keygen`")
    g.set_defaults(func=cmd_sign)

    t = sub.add_parser("targets", help="list the target presets and what building for each needs installed")
    t.set_defaults(func=cmd_targets)
    return p


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"bitcompile {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
