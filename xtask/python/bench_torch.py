"""PyTorch side of `cargo xtask bench --compare torch`.

Reads a JSON list of rows (from the file named by the first argument, or stdin), each

    {"name": "clip_fc1/bf16/2t", "kind": "gemm", "m": 577, "k": 1024, "n": 4096,
     "dtype": "bf16", "threads": 2}

with kind one of gemm (m, k, n), gemv (m, k, n), attention (t, heads, d, causal),
layer_norm / rms_norm (rows, cols, eps), the fused rows' chains layer_norm_gemm, gemm_swiglu and
merge_gemm (m, k, n: the same passes, one after the other, as a torch user writes them), clip_crop (transformers' CLIPVisionModel on one crop),
phi3 (transformers' Phi3ForCausalLM from a `config` path: prefill of `t` tokens and the median
`new_tokens` decode step, returned as {"prefill": s, "decode_per_token": s}), times the equivalent torch op under
`torch.inference_mode()` with `torch.set_num_threads(threads)`, and prints {name: seconds} as
JSON on stdout (progress on stderr).

Timing mirrors xtask/src/bench.rs: one warm-up call, then the median of 3..15 repeats in about
`budget` seconds (1 s for GEMM/attention, 0.5 s for the norms). bf16 GEMM rows run `a @ w.T` with
both a and w in bf16 (what a torch user would run; ours keeps activations in f32). The decode GEMV
rotates through enough bf16 weight copies to exceed 1 GiB so the weights come from DRAM.
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

GEMV_POOL_BYTES = 5 << 28  # 1.25 GiB, like ours


def time_median(budget, f):
    t0 = time.perf_counter()
    f()
    warm = time.perf_counter() - t0
    reps = 1 if warm > 2.0 else max(3, min(15, int(budget / max(warm, 1e-9))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rand(*shape, dtype=torch.float32):
    return (torch.rand(*shape) * 2 - 1).to(dtype)


def dtype_of(row):
    return {"f32": torch.float32, "bf16": torch.bfloat16}[row.get("dtype", "f32")]


def bench_gemm(row):
    dt = dtype_of(row)
    a = rand(row["m"], row["k"], dtype=dt)
    w = rand(row["n"], row["k"], dtype=dt)
    return time_median(1.0, lambda: a @ w.T)


def bench_gemv(row):
    dt = dtype_of(row)
    k, n = row["k"], row["n"]
    per = n * k * torch.tensor([], dtype=dt).element_size()
    copies = max(2, -(-GEMV_POOL_BYTES // per))
    base = rand(n, k, dtype=dt)
    pool = [base.clone() for _ in range(copies)]
    del base
    a = rand(row.get("m", 1), k, dtype=dt)
    # Warm-up: one pass over every copy.
    t0 = time.perf_counter()
    for w in pool:
        a @ w.T
    one = (time.perf_counter() - t0) / copies
    reps = max(copies, min(4 * copies, int(0.8 / max(one, 1e-9))))
    ts = []
    for r in range(reps):
        w = pool[r % copies]
        t0 = time.perf_counter()
        a @ w.T
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_attention(row):
    dt = dtype_of(row)
    t, h, d = row["t"], row["heads"], row["d"]
    q, k, v = (rand(1, h, t, d, dtype=dt) for _ in range(3))
    causal = bool(row.get("causal", False))
    return time_median(
        1.0, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    )


def bench_layer_norm(row):
    dt = dtype_of(row)
    rows, cols, eps = row["rows"], row["cols"], row.get("eps", 1e-5)
    x = rand(rows, cols, dtype=dt)
    w, b = rand(cols, dtype=dt), rand(cols, dtype=dt)
    return time_median(0.5, lambda: F.layer_norm(x, (cols,), w, b, eps))


def bench_rms_norm(row):
    dt = dtype_of(row)
    rows, cols, eps = row["rows"], row["cols"], row.get("eps", 1e-5)
    x = rand(rows, cols, dtype=dt)
    w = rand(cols, dtype=dt)
    return time_median(
        0.5, lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    )


def bench_layer_norm_gemm(row):
    """LayerNorm then Linear with bias (CLIP's LN1 and q_proj)."""
    dt = dtype_of(row)
    m, k, n = row["m"], row["k"], row["n"]
    x = rand(m, k, dtype=dt)
    g, b = rand(k, dtype=dt), rand(k, dtype=dt)
    w, bias = rand(n, k, dtype=dt), rand(n, dtype=dt)
    return time_median(1.0, lambda: F.linear(F.layer_norm(x, (k,), g, b, 1e-5), w, bias))


def bench_gemm_swiglu(row):
    """Phi-3's gate_up then silu(gate) * up."""
    dt = dtype_of(row)
    x = rand(row["m"], row["k"], dtype=dt)
    w = rand(row["n"], row["k"], dtype=dt)

    def f():
        gate, up = (x @ w.T).chunk(2, dim=-1)
        return F.silu(gate) * up

    return time_median(1.0, f)


def hd_sources(h, w):
    """Phi-3-vision's token order for one image of h x w sub-crops (global view is crop 0):
    merged token indices, -1 for sub_GN, -2 for glb_GN."""
    out = []
    for a in range(h):
        for i in range(12):
            for b in range(w):
                out += [(1 + a * w + b) * 144 + i * 12 + j for j in range(12)]
            out.append(-1)
    out.append(-2)
    for i in range(12):
        out += [i * 12 + j for j in range(12)]
        out.append(-1)
    return out


def bench_merge_gemm(row):
    """One 16-crop image: CLS dropped, 2x2 merge (the reference's reshape/permute), tokens and
    separators in sequence order, then Linear with bias and GELU (the projector's first layer)."""
    dt = dtype_of(row)
    m, k, n = row["m"], row["k"], row["n"]
    c, crops = k // 4, 17
    src = hd_sources(4, 4)
    assert len(src) == m, (len(src), m)
    idx = torch.tensor([s if s >= 0 else crops * 144 + (-1 - s) for s in src])
    feat = rand(crops, 577, c, dtype=dt)
    lits = rand(2, k, dtype=dt)
    w, bias = rand(n, k, dtype=dt), rand(n, dtype=dt)

    def f():
        p = feat[:, 1:].reshape(crops, 12, 2, 12, 2, c).permute(0, 1, 3, 2, 4, 5)
        table = torch.cat([p.reshape(crops * 144, k), lits])
        return F.gelu(F.linear(table.index_select(0, idx), w, bias))

    return time_median(1.0, f)


def clip_config():
    """CLIP ViT-L/14-336, the vision tower of Phi-3-vision (transformers runs all 24 layers)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    )


def random_model(cls, config, dt):
    """`cls(config)` in dtype `dt` with uniform(-0.02, 0.02) weights. The constructor runs with
    the weight initialisers switched off (as transformers' own fast init does), so parameters are
    allocated straight in `dt` and the 3.8B-parameter decoder is never materialised in f32 or
    initialised twice; buffers (position ids, RoPE frequencies) are computed as usual."""
    from transformers.modeling_utils import no_init_weights

    inits = ["kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_"]
    saved = {n: getattr(torch.nn.init, n) for n in inits}
    torch.set_default_dtype(dt)
    try:
        for n in inits:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        with no_init_weights(_enable=True):
            model = cls(config)
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)
        torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02, generator=gen)
    return model.eval()


def bench_clip_crop(row):
    """transformers' CLIPVisionModel on one 336x336 crop, hidden states on (as Phi-3-vision
    reads hidden_states[-2])."""
    from transformers import CLIPVisionModel

    dt = dtype_of(row)
    model = random_model(CLIPVisionModel, clip_config(), dt)
    model.config._attn_implementation = row.get("attn", "sdpa")
    x = rand(1, 3, 336, 336, dtype=dt)
    return time_median(2.0, lambda: model(x, output_hidden_states=True))


def phi3_config(path):
    """The decoder config of a Phi-3-vision `config.json` (e.g. one `cargo xtask synth` wrote)."""
    from transformers import Phi3Config

    with open(path) as f:
        cfg = json.load(f)
    keep = Phi3Config().to_dict().keys()
    cfg = {k: v for k, v in cfg.items() if k in keep and k not in ("architectures", "model_type")}
    return Phi3Config(**cfg)


def bench_phi3(row):
    """transformers' Phi3ForCausalLM: prefill of `t` tokens, then `new_tokens` greedy decode steps
    with the KV cache; returns {"prefill": s, "decode_per_token": s}."""
    from transformers import Phi3ForCausalLM

    dt = dtype_of(row)
    cfg = phi3_config(row["config"])
    # transformers 4.41 (the first with Phi-3) has only eager attention for Phi3.
    cfg._attn_implementation = row.get("attn", "eager")
    model = random_model(Phi3ForCausalLM, cfg, dt)
    t, new = row["t"], row["new_tokens"]
    ids = torch.randint(100, 30000, (1, t))
    model(input_ids=ids[:, :8], use_cache=True)  # warm-up (allocator, oneDNN primitives)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - t0
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - t0)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    return {"prefill": prefill, "decode_per_token": statistics.median(steps)}


KINDS = {
    "clip_crop": bench_clip_crop,
    "phi3": bench_phi3,
    "gemm": bench_gemm,
    "gemv": bench_gemv,
    "attention": bench_attention,
    "layer_norm": bench_layer_norm,
    "rms_norm": bench_rms_norm,
    "layer_norm_gemm": bench_layer_norm_gemm,
    "gemm_swiglu": bench_gemm_swiglu,
    "merge_gemm": bench_merge_gemm,
}


def main():
    if len(sys.argv) > 1 and sys.argv[1] != "-":
        with open(sys.argv[1]) as f:
            rows = json.load(f)
    else:
        rows = json.load(sys.stdin)
    out = {}
    with torch.inference_mode():
        for row in rows:
            torch.set_num_threads(int(row["threads"]))
            s = KINDS[row["kind"]](row)
            out[row["name"]] = s
            shown = s if isinstance(s, dict) else {"": s}
            for part, v in shown.items():
                print(
                    f"  torch {row['name'] + (' ' + part if part else ''):<34} {v * 1e3:10.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
