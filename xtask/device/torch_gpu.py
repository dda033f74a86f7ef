"""PyTorch's time on this GPU for the rows of cuda_bench (the same shapes), as JSON
{"op shape": seconds}: torch.nn.functional.linear (cuBLAS) for the GEMMs, and
scaled_dot_product_attention for attention. Run by the device bundle's run.sh."""
import json
import sys

import torch
import torch.nn.functional as F


def timed(fn, iters):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    dev, dt = "cuda", torch.bfloat16
    out = {}
    gemms = [
        ("clip_qkv", 9809, 3072, 1024), ("clip_out", 9809, 1024, 1024),
        ("clip_fc1", 9809, 4096, 1024), ("clip_fc2", 9809, 1024, 4096),
        ("proj_fc0", 2509, 3072, 4096), ("proj_fc2", 2509, 3072, 3072),
        ("qkv_proj", 757, 9216, 3072), ("gate_up_proj", 757, 16384, 3072),
        ("down_proj", 757, 3072, 8192), ("gate_up_proj", 2509, 16384, 3072),
        ("gemv_qkv", 1, 9216, 3072), ("gemv_gate_up", 1, 16384, 3072),
        ("gemv_down", 1, 3072, 8192), ("gemv_lm_head", 1, 32064, 3072),
    ]
    for name, m, n, k in gemms:
        a = torch.randn(m, k, device=dev, dtype=dt)
        b = torch.randn(n, k, device=dev, dtype=dt)
        out[f"{name} {m}x{n}x{k}"] = timed(lambda: F.linear(a, b), 200 if m == 1 else 20)
    for name, batch, heads, length, d, causal in [
        ("attn_clip", 17, 16, 577, 64, False),
        ("attn_prefill", 1, 32, 757, 96, True),
        ("attn_prefill", 1, 32, 2509, 96, True),
    ]:
        q = torch.randn(batch, heads, length, d, device=dev, dtype=dt)
        out[f"{name} {batch}x{heads}x{length}x{d}"] = timed(
            lambda: F.scaled_dot_product_attention(q, q, q, is_causal=causal), 20)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
