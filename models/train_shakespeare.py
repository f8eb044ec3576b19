"""Train a tiny BitNet b1.58 (ternary) model on tinyshakespeare and export it
in the packed Hugging Face BitNetForCausalLM layout.

Training-time tool only: bitcompile never imports torch.

    python models/train_shakespeare.py --data ../shared/data/tinyshakespeare.txt \
        --out models/shakespeare-tiny --steps 2400 --batch 16 --threads 1
    python models/train_shakespeare.py --out models/shakespeare-tiny --verify

The training forward uses quantization-aware training (straight-through
estimators) with exactly the inference arithmetic:
  activations: s = 127 / max|x| per token, xq = clamp(round(x*s), -128, 127)
  weights:     scale = mean|W|, T = clamp(round(W/scale), -1, 1)
  y = (xq @ T^T) / s * scale
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|bos|>", "<|eos|>"
PROJS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(text, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == vocab_size
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


# ----------------------------------------------------------------------------- model
def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def bf16(x):
    """Round to bf16 (the export dtype) in the forward pass, straight-through in the backward."""
    return x + (x.to(torch.bfloat16).float() - x).detach()


def act_quant(x):
    """Per-token absmax int8 quantization; returns (xq, s) with x ~= xq / s."""
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127), s


def weight_quant(w):
    """Per-tensor absmean ternary quantization; returns (T, scale) with W ~= T * scale."""
    scale = w.abs().mean().clamp(min=1e-5)
    return (w / scale).round().clamp(-1, 1), scale


class BitLinear(nn.Linear):
    def __init__(self, fan_in, fan_out):
        super().__init__(fan_in, fan_out, bias=False)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        xq, s = act_quant(x)
        x = x + (xq / s - x).detach()                 # STE
        t, scale = weight_quant(self.weight)
        w = self.weight + (t * bf16(scale) - self.weight).detach()  # STE; scale exported as bf16
        return F.linear(x, w)


def rope_tables(cfg, n, device=None):
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q, k, v, n_rep):
    # q: [B, H, T, D], k/v: [B, KV, T, D]; KV head j serves query heads j*n_rep .. j*n_rep+n_rep-1
    k = k.repeat_interleave(n_rep, 1)
    v = v.repeat_interleave(n_rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale = head_dim^-0.5


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.nh, self.nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd, self.eps = h // self.nh, cfg["rms_norm_eps"]
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.attn_sub_norm = nn.Parameter(torch.ones(h))
        self.ffn_sub_norm = nn.Parameter(torch.ones(i))
        self.q_proj = BitLinear(h, self.nh * self.hd)
        self.k_proj = BitLinear(h, self.nkv * self.hd)
        self.v_proj = BitLinear(h, self.nkv * self.hd)
        self.o_proj = BitLinear(h, h)
        self.gate_proj = BitLinear(h, i)
        self.up_proj = BitLinear(h, i)
        self.down_proj = BitLinear(i, h)

    def forward(self, h, cos, sin):
        B, T, _ = h.shape
        x = rms_norm(h, bf16(self.input_layernorm), self.eps)
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        a = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.nh // self.nkv)
        a = a.transpose(1, 2).reshape(B, T, -1)
        h = h + self.o_proj(rms_norm(a, bf16(self.attn_sub_norm), self.eps))
        x = rms_norm(h, bf16(self.post_attention_layernorm), self.eps)
        m = F.relu(self.gate_proj(x)).square() * self.up_proj(x)
        return h + self.down_proj(rms_norm(m, bf16(self.ffn_sub_norm), self.eps))


class BitNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = nn.Parameter(torch.ones(cfg["hidden_size"]))

    def forward(self, ids):
        cos, sin = rope_tables(self.cfg, ids.shape[1], ids.device)
        emb = bf16(self.embed.weight)  # tied input embedding / output head, not quantized
        h = F.embedding(ids, emb)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return rms_norm(h, bf16(self.norm), self.cfg["rms_norm_eps"]) @ emb.T


# ----------------------------------------------------------------------------- export
def pack_ternary(t):
    """t: int tensor [out, in] in {-1,0,1} -> uint8 [out/4, in]; bits 2i..2i+1 of packed
    row r hold original row i*(out/4) + r, stored as t + 1."""
    out = t.shape[0]
    assert out % 4 == 0
    u = (t.to(torch.int32) + 1).view(4, out // 4, -1)
    return sum(u[i] << (2 * i) for i in range(4)).to(torch.uint8)


def unpack_ternary(p):
    p = p.to(torch.int32)
    return torch.cat([((p >> (2 * i)) & 3) - 1 for i in range(4)], 0)


def export(model, out_dir):
    bf = lambda x: x.detach().to(torch.bfloat16).contiguous()
    sd = {"model.embed_tokens.weight": bf(model.embed.weight), "model.norm.weight": bf(model.norm)}
    for li, layer in enumerate(model.layers):
        p = f"model.layers.{li}."
        sd[p + "input_layernorm.weight"] = bf(layer.input_layernorm)
        sd[p + "post_attention_layernorm.weight"] = bf(layer.post_attention_layernorm)
        sd[p + "self_attn.attn_sub_norm.weight"] = bf(layer.attn_sub_norm)
        sd[p + "mlp.ffn_sub_norm.weight"] = bf(layer.ffn_sub_norm)
        for name in PROJS:
            t, scale = weight_quant(getattr(layer, name.split(".")[1]).weight.detach())
            packed = pack_ternary(t)
            assert torch.equal(unpack_ternary(packed), t.to(torch.int32))
            sd[p + name + ".weight"] = packed
            sd[p + name + ".weight_scale"] = bf(scale.reshape(1))
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(architectures=["BitNetForCausalLM"], model_type="bitnet", hidden_act="relu2",
               **{k: model.cfg[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads"]},
               rms_norm_eps=1e-05, rope_theta=10000.0, max_position_embeddings=512,
               vocab_size=model.cfg["vocab_size"], bos_token_id=0, eos_token_id=1,
               tie_word_embeddings=True, torch_dtype="bfloat16",
               quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                                    "quantization_mode": "offline"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# ----------------------------------------------------------------------------- verify
class PackedBitNet:
    """Independent inference forward straight from the exported safetensors."""

    def __init__(self, out_dir):
        with open(os.path.join(out_dir, "config.json")) as f:
            self.cfg = json.load(f)
        sd = {k: (v if v.dtype == torch.uint8 else v.float()) for k, v in
              load_file(os.path.join(out_dir, "model.safetensors")).items()}
        self.sd = {k: unpack_ternary(v).float() if v.dtype == torch.uint8 else v for k, v in sd.items()}

    def linear(self, name, x):
        xq, s = act_quant(x)
        return (xq @ self.sd[name + ".weight"].T) / s * self.sd[name + ".weight_scale"]

    @torch.no_grad()
    def __call__(self, ids):  # ids: [T] -> logits [T, vocab]
        c, sd, T = self.cfg, self.sd, len(ids)
        nh, nkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
        hd = c["hidden_size"] // nh
        cos, sin = rope_tables(c, T)
        h = sd["model.embed_tokens.weight"][ids]
        mask = torch.full((T, T), float("-inf")).triu(1)
        for li in range(c["num_hidden_layers"]):
            p = f"model.layers.{li}."
            x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
            q = self.linear(p + "self_attn.q_proj", x).view(T, nh, hd).transpose(0, 1)
            k = self.linear(p + "self_attn.k_proj", x).view(T, nkv, hd).transpose(0, 1)
            v = self.linear(p + "self_attn.v_proj", x).view(T, nkv, hd).transpose(0, 1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            outs = []
            for j in range(nh):
                kv = j // (nh // nkv)
                att = (q[j] @ k[kv].T) * hd ** -0.5 + mask
                outs.append(att.softmax(-1) @ v[kv])
            a = torch.cat(outs, -1)
            h = h + self.linear(p + "self_attn.o_proj", rms_norm(a, sd[p + "self_attn.attn_sub_norm.weight"], eps))
            x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
            m = F.relu(self.linear(p + "mlp.gate_proj", x)) ** 2 * self.linear(p + "mlp.up_proj", x)
            h = h + self.linear(p + "mlp.down_proj", rms_norm(m, sd[p + "mlp.ffn_sub_norm.weight"], eps))
        return rms_norm(h, sd["model.norm.weight"], eps) @ sd["model.embed_tokens.weight"].T


def generate(model, tok, prompt, n, temperature, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [0] + tok.encode(prompt).ids
    for _ in range(n):
        logits = model(torch.tensor(ids[-model.cfg["max_position_embeddings"]:]))[-1]
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=g))
        ids.append(nxt)
    return tok.decode(ids[1:])


def verify(args):
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    model = PackedBitNet(args.out)
    if args.data:  # val loss of the exported weights over the whole held-out 5%
        data = torch.tensor(tok.encode(open(args.data).read()).ids)
        val = data[int(len(data) * 0.95):]
        losses = []
        for st in range(0, len(val) - args.seq + 1, args.seq):
            w = val[st:st + args.seq]
            ids = torch.cat([torch.zeros(1, dtype=torch.long), w[:-1]])  # <|bos|> + window
            losses.append(F.cross_entropy(model(ids), w).item())
        print(f"exported-model val loss ({len(losses)} x {args.seq}-token windows): {np.mean(losses):.4f}")
    for temp in (0.0, 0.8):
        print(f"----- sample, temperature {temp} -----")
        print(generate(model, tok, "ROMEO:", args.sample_tokens, temp))


# ----------------------------------------------------------------------------- train
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    ap.add_argument("--out", default="models/shakespeare-tiny")
    ap.add_argument("--ckpt", default=None, help="checkpoint path (default: <out>.ckpt.pt)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--verify", action="store_true", help="only verify an exported model")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min_lr_frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model (~20%% faster on CPU)")
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--ckpt_every", type=int, default=100)
    ap.add_argument("--sample_tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.verify:
        return verify(args)

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = args.ckpt or args.out.rstrip("/") + ".ckpt.pt"
    text = open(args.data).read()
    tok = train_tokenizer(text, 2048)
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text, "tokenizer round-trip failed"
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "add_bos_token": True, "model_max_length": 512}, f, indent=2)
    data = torch.tensor(ids, dtype=torch.long)
    n_train = int(len(data) * 0.95)
    train, val = data[:n_train], data[n_train:]
    print(f"{len(text)} chars -> {len(data)} tokens ({len(text) / len(data):.2f} chars/token); "
          f"train {len(train)}, val {len(val)}")

    cfg = dict(hidden_size=args.hidden, intermediate_size=args.intermediate,
               num_hidden_layers=args.layers, num_attention_heads=args.heads,
               num_key_value_heads=args.kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=512, vocab_size=2048)
    model = BitNet(cfg)
    fwd = torch.compile(model) if args.compile else model
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    decay = [p for p in model.parameters() if p.dim() == 2 and p is not model.embed.weight]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is model.embed.weight]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    step = 0
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"resumed from {ckpt_path} at step {step}")

    def batch(src, gen=None):
        # random windows; half of them start with <|bos|> so prompts work with or without it
        ix = torch.randint(len(src) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([src[i:i + args.seq] for i in ix])
        y = torch.stack([src[i + 1:i + args.seq + 1] for i in ix])
        bos = torch.rand(args.batch, generator=gen) < 0.5
        x[bos] = torch.cat([torch.zeros(int(bos.sum()), 1, dtype=torch.long), y[bos, :-1]], 1)
        return x, y

    @torch.no_grad()
    def val_loss(n=8):
        g = torch.Generator().manual_seed(0)  # same val windows every time
        return np.mean([F.cross_entropy(fwd(x).flatten(0, 1), y.flatten()).item()
                        for x, y in (batch(val, g) for _ in range(n))])

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        p = (s - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    t0, ema = time.time(), None
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch(train)
        loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0:
            el = time.time() - t0
            print(f"step {step} loss {loss.item():.4f} (ema {ema:.4f}) lr {lr_at(step):.2e} "
                  f"{el:.0f}s elapsed", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step} val loss {val_loss():.4f}", flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "cfg": cfg},
                       ckpt_path)
    print(f"training done in {time.time() - t0:.0f}s; final train loss (ema) {ema:.4f}")
    export(model, args.out)
    print(f"exported to {args.out}")
    with torch.no_grad():  # exported weights must reproduce the training forward
        x = val[:args.seq].unsqueeze(0)
        diff = (model(x)[0] - PackedBitNet(args.out)(x[0])).abs().max().item()
    print(f"max |logit diff| training forward vs exported weights: {diff:.4f}")
    verify(args)


if __name__ == "__main__":
    main()
