"""attention_mass beside what an Elastic-Cache-style framework runs today: softmax(Q K^T * scale) materialised
for the block's queries over every key, then summed over heads and queries."""

import math

import torch

import dllm_kernels
from dllm_kernels.bench import Case, call_case
from dllm_kernels.ops.attention_mass import dispatcher
from dllm_kernels.reference.attention_mass import attention_mass as reference


def materialised(q, k_cache, scale):
    """The framework's statistic: every head's probabilities [B, Hq, Sq, S] built, then summed."""
    group = q.shape[2] // k_cache.shape[2]
    keys = k_cache.transpose(1, 2).repeat_interleave(group, 1)  # [B, Hq, S, D]
    scores = torch.matmul(q.transpose(1, 2), keys.transpose(-1, -2)) * scale
    return torch.softmax(scores.float(), -1).sum((1, 2))


def make_case(device, dtype, label, rows, n_queries, s_max, heads=(32, 8), head_dim=128):
    """A decode step: the block of n_queries at s_max / 2 over a full dual cache (every key visible, as the
    baseline assumes)."""
    n_heads, n_kv = heads
    q = torch.randn(rows, n_queries, n_heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(rows, s_max, n_kv, head_dim, device=device).to(dtype)
    v_cache = torch.randn(rows, s_max, n_kv, head_dim, device=device).to(dtype)
    q_start = torch.full((rows,), s_max // 2, dtype=torch.int32, device=device)
    kv_len = torch.full((rows,), s_max, dtype=torch.int32, device=device)
    _, lse = dllm_kernels.block_attention(q, k_cache, v_cache, q_start, kv_len, return_lse=True)
    args = (q, k_cache, lse, q_start, kv_len)
    ref_mass, _ = reference(*args)
    scale = 1 / math.sqrt(head_dim)

    def check(out):
        torch.testing.assert_close(out[0], ref_mass, rtol=1e-3, atol=1e-3)

    element = q.element_size()
    # q, K and lse read once, mass and top written once
    nbytes = (rows * n_queries * n_heads * head_dim + rows * s_max * n_kv * head_dim) * element
    nbytes += rows * n_heads * n_queries * 4 + rows * s_max * 4 + rows * 8
    return Case(
        op="attention_mass",
        label=f"{label}: {rows} x {n_queries} q x {s_max} kv, {n_heads}/{n_kv} heads, D={head_dim} "
        f"{str(dtype).removeprefix('torch.')}",
        run=lambda: dllm_kernels.attention_mass(*args),
        check=check,
        bytes=nbytes,
        flops=rows * 2 * n_queries * n_heads * s_max * head_dim,
        backends=[b for b in dispatcher.backends_for(device, *args) if b != "reference"],
        baselines={"materialised softmax": lambda: materialised(q, k_cache, scale)},
    )


def cases(device, quick):
    if device.type == "cuda":
        return [make_case(device, torch.bfloat16, "decode", 8, 32, 2048)]
    out = [make_case(device, torch.float32, "decode", 8 if not quick else 2, 32, 2048)]
    q, k_cache = torch.randn(1, 4, 2, 64), torch.randn(1, 16, 2, 64)
    lse = torch.randn(1, 2, 4).abs() + 3
    q_start, kv_len = torch.tensor([8], dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    out.append(
        call_case(
            "attention_mass",
            "tiny call 4 q x 16 kv, 2 heads, D=64 fp32",
            lambda: dllm_kernels.attention_mass(q, k_cache, lse, q_start, kv_len),
            {"materialised softmax": lambda: materialised(q, k_cache, 0.125)},
            (2 * 4 + 2 * 16) * 64 * 4,
        )
    )
    return out
