"""block_attention beside SDPA with a dense block mask and (on GPU) FlexAttention with the same rule."""

import torch
import torch.nn.functional as F

import dllm_kernels
from dllm_kernels.bench import Case, call_case
from dllm_kernels.ops.block_attention import dispatcher
from dllm_kernels.reference.block_attention import block_attention as reference


def visible_mask(q_len, kv_len, q_start, block_size, device):
    """The dense [Sq, S] boolean mask frameworks build for SDPA today."""
    p = q_start + torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return (
        (j // block_size <= p // block_size)
        if block_size
        else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    )


def flex_baselines(q, k, v, q_start, block_size):
    """FlexAttention with the same rule: the compiled kernel, and the block-mask build timed apart."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def rule(b, h, q_idx, kv_idx):
        return (kv_idx // block_size <= (q_idx + q_start) // block_size) if block_size else kv_idx >= 0

    q_len, kv_len = q.shape[2], k.shape[2]
    build = lambda: create_block_mask(rule, None, None, q_len, kv_len, device=q.device)
    mask = build()
    attend = torch.compile(flex_attention)
    return {
        "flex attention": lambda: attend(q, k, v, block_mask=mask, enable_gqa=True),
        "flex create_block_mask": build,
    }


def make_case(
    device,
    dtype,
    label,
    n_queries,
    kv_len,
    q_start,
    block_size,
    heads=(28, 4),
    head_dim=64,
    rows=1,
    flex=False,
):
    n_heads, n_kv = heads
    q = torch.randn(rows, n_queries, n_heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(rows, kv_len, n_kv, head_dim, device=device).to(dtype)
    v_cache = torch.randn(rows, kv_len, n_kv, head_dim, device=device).to(dtype)
    k_new = k_cache[:, q_start : q_start + n_queries].clone()
    v_new = v_cache[:, q_start : q_start + n_queries].clone()
    starts = torch.full((rows,), q_start, dtype=torch.int32, device=device)
    lengths = torch.full((rows,), kv_len, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, starts, lengths)
    kwargs = dict(k_new=k_new, v_new=v_new, block_size=block_size)
    ref_out, _ = reference(q, k_cache.clone(), v_cache.clone(), starts, lengths, **kwargs)

    def check(out):
        torch.testing.assert_close(out[0], ref_out, rtol=1.6e-2, atol=2e-2)

    mask = visible_mask(n_queries, kv_len, q_start, block_size, device)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    if block_size:
        baselines = {
            "sdpa dense mask": lambda: F.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=mask, enable_gqa=True
            )
        }
    else:  # every key visible (equal kv_len): SDPA needs no mask, which keeps its fastest kernels
        baselines = {"sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)}
    if flex:
        baselines.update(flex_baselines(qt, kt, vt, q_start, block_size))
    visible = int(mask.sum())
    # q read and out written, every cached K/V row read once, the new block's K/V read and written
    elements = (2 * n_queries * n_heads + 2 * kv_len * n_kv + 4 * n_queries * n_kv) * head_dim
    return Case(
        op="block_attention",
        label=f"{label}: {n_queries} q x {kv_len} kv, block {block_size or '-'}, {n_heads}/{n_kv} heads, "
        f"D={head_dim} {str(dtype).removeprefix('torch.')}",
        run=lambda: dllm_kernels.block_attention(*args, **kwargs),
        check=check,
        bytes=rows * elements * q.element_size(),
        flops=rows * 4 * visible * n_heads * head_dim,
        backends=[b for b in dispatcher.backends_for(device, *args) if b != "reference"],
        baselines=baselines,
        baseline_flops={"flex create_block_mask": None},
    )


def cases(device, quick):
    if device.type == "cuda":
        # The goals: block-causal prefill at L = 4096 (beside FlexAttention and SDPA with a dense
        # mask) and dual-cache decode of a 32-token block over 4k-32k caches (split KV on the CUDA kernel).
        bf16 = torch.bfloat16
        out = [make_case(device, bf16, "prefill", 4096, 4096, 0, 32, heads=(28, 4), head_dim=128, flex=True)]
        decode = [(4096, 8), (32768, 1)] if quick else [(4096, 8), (16384, 2), (32768, 1)]
        for kv_len, rows in decode:
            out.append(
                make_case(
                    device,
                    bf16,
                    "dual-cache decode",
                    32,
                    kv_len,
                    kv_len // 2,
                    0,
                    head_dim=128,
                    rows=rows,
                    flex=True,
                )
            )
        return out
    out = [make_case(device, torch.float32, "prefill", 1024, 1024, 0, 32)]
    if not quick:
        out.append(make_case(device, torch.bfloat16, "prefill", 1024, 1024, 0, 32))
        out.append(make_case(device, torch.float32, "dual-cache decode", 32, 2048, 1024, 0, rows=4))
    q, k_cache, v_cache = torch.randn(1, 4, 2, 64), torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64)
    q_start, kv_len = torch.tensor([8], dtype=torch.int32), torch.tensor([12], dtype=torch.int32)
    qt, kt, vt = q.transpose(1, 2), k_cache[:, :12].transpose(1, 2), v_cache[:, :12].transpose(1, 2)
    out.append(
        call_case(
            "block_attention",
            "tiny call 4 q x 12 kv, 2 heads, D=64 fp32",
            lambda: dllm_kernels.block_attention(q, k_cache, v_cache, q_start, kv_len)[0],
            {"F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(qt, kt, vt)},
            (2 * 4 * 2 + 2 * 12 * 2) * 64 * 4,
        )
    )
    return out
