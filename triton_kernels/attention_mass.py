"""attention_mass in Triton (docs/ops.md#attention_mass): each key's attention mass from block_attention's
lse.

One program per (row b, tile of BLOCK_N keys). It loads its K tile once per KV head and walks the R = Sq * G
query rows that read that head (query i, group head g, flattened r = i * G + g as in block_attention, so a
one-query decode step still fills a 16-row tl.dot) in BLOCK_M tiles: S = Q K^T (fp32 accumulation),
p = exp(S * scale - lse) where the query counts and sees the key (a where, so a NaN in a row or column that
does not count never spreads), summed over the tile's rows into a BLOCK_N fp32 vector that lives in
registers for the whole program. One store per key: no atomics, a fixed order, deterministic.

Skipped work. Keys at or past the row's largest visible end (the last query's) are never loaded and get 0;
with a block size, query tiles whose queries all end before the key tile are skipped (lim grows with i).
The interpreter's bf16 arithmetic is wrong, so on CPU tensors bf16 tiles are converted to fp32 at the load.
"""

import math

import torch
import triton
import triton.language as tl

from ..reference.attention_mass import top_of


@triton.jit
def _mass_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    q_start_ptr,
    kv_len_ptr,
    query_mask_ptr,
    key_mask_ptr,
    mass_ptr,
    n_queries,
    s_max,
    n_kv_heads,
    block_size,
    scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_qmb,
    stride_qms,
    stride_kmb,
    stride_kms,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_rows = n_queries * GROUP
    q_start = tl.load(q_start_ptr + b)
    kv = tl.maximum(tl.minimum(tl.load(kv_len_ptr + b), s_max), 0)
    # The row's visible keys end where its last query's do; the first query that sees this tile's first key.
    hi = kv
    first = 0
    if BLOCK_CAUSAL:
        last = q_start + n_queries - 1
        hi = tl.maximum(tl.minimum((last // block_size + 1) * block_size, kv), 0)
        first = tl.maximum(tile * BLOCK_N // block_size * block_size - q_start, 0)
    k_ok = keys < hi
    acc = tl.zeros([BLOCK_N], tl.float32)
    if tile * BLOCK_N < hi:
        for kv_head in range(0, n_kv_heads):
            kt_ptrs = (
                k_ptr
                + (b * stride_kb + kv_head * stride_kh)
                + keys.to(tl.int64)[None, :] * stride_ks
                + offs_d[:, None]
            )
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]: K^T
            if UPCAST:
                kt = kt.to(tl.float32)
            for m0 in range(first * GROUP // BLOCK_M * BLOCK_M, n_rows, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < n_rows
                qi = rows // GROUP
                head = kv_head * GROUP + rows % GROUP
                q_ptrs = (
                    q_ptr + b * stride_qb + qi.to(tl.int64)[:, None] * stride_qs + head[:, None] * stride_qh
                )
                q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                lse = tl.load(
                    lse_ptr + b * stride_lb + head * stride_lh + qi * stride_ls, mask=row_ok, other=0.0
                )
                take = row_ok & (lse != float("-inf"))
                if query_mask_ptr is not None:
                    counted = tl.load(query_mask_ptr + b * stride_qmb + qi * stride_qms, mask=row_ok, other=0)
                    take = take & (counted != 0)
                if BLOCK_CAUSAL:
                    lim = tl.minimum(((q_start + qi) // block_size + 1) * block_size, kv)
                else:
                    lim = tl.full([BLOCK_M], 0, tl.int32) + kv
                s = tl.dot(q, kt, input_precision=PRECISION)
                p = tl.exp(s * scale - lse[:, None])
                p = tl.where(take[:, None] & (keys[None, :] < lim[:, None]), p, 0.0)
                acc += tl.sum(p, 0)
    out_ok = keys < s_max
    if key_mask_ptr is not None:
        excluded = tl.load(key_mask_ptr + b * stride_kmb + keys * stride_kms, mask=out_ok, other=0)
        acc = tl.where(excluded != 0, 0.0, acc)
    tl.store(mass_ptr + b * s_max + keys, acc, mask=out_ok)


def _config(n_rows: int, head_dim: int, dtype: torch.dtype, gpu: bool = True):
    """(BLOCK_M, BLOCK_N, num_warps) from metadata. fp16 / bf16: 64-key tiles (the K tile stays in registers
    for all the query tiles of its head) and up to 64 query rows per dot; fp32 runs the ieee dot on CUDA cores
    with 16 x 16 tiles (correct, not fast). The interpreter takes the 16-bit tiles."""
    if dtype == torch.float32 and gpu:
        return 16, 16, 4
    block_m = min(64, max(16, triton.next_power_of_2(n_rows)))
    return block_m, 64, 4


def attention_mass(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale):
    """Triton provider of ``dllm::attention_mass`` (arguments already checked by the op). No host sync."""
    n_batch, n_queries, n_heads, head_dim = q.shape
    s_max, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    device = q.device
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    mass = torch.empty((n_batch, s_max), dtype=torch.float32, device=device)
    if mass.numel() == 0:
        return mass, top_of(mass)
    block_m, block_n, num_warps = _config(n_queries * group, head_dim, q.dtype, device.type == "cuda")
    upcast = device.type != "cuda" and q.dtype == torch.bfloat16  # interpreter: no bf16 arithmetic
    block_causal = block_size > 0
    qm_strides = query_mask.stride() if query_mask is not None else (0, 0)
    km_strides = key_mask.stride() if key_mask is not None else (0, 0)
    _mass_kernel[(triton.cdiv(s_max, block_n), n_batch)](
        q,
        k_cache,
        lse,
        q_start,
        kv_len,
        query_mask,
        key_mask,
        mass,
        n_queries,
        s_max,
        n_kv_heads,
        # 2^30 exceeds every position (the same visibility) and keeps (p // b + 1) * b in int32
        min(block_size, 2**30) if block_causal else 1,
        scale,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *lse.stride(),
        *qm_strides,
        *km_strides,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot's K is at least 16
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_CAUSAL=block_causal,
        UPCAST=upcast,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        num_warps=num_warps,
    )
    return mass, top_of(mass)
