"""block_attention in Triton (docs/ops.md): FlashAttention-2 style online softmax in fp32.

Rows. For one (row b, KV head), the R = Sq * G query rows that read that KV head (query i, group head
g, G = Hq / Hkv) are flattened as r = i * G + g and cut into BLOCK_M tiles: one program owns one tile,
so every K/V tile it loads serves all the query heads of the group (no repeat_kv, and an 8-token
sub-block of a 28/4-head model still fills a 64-row MMA). The grid's first axis walks the
(row, KV head) pairs fastest and the query tiles from the last: under a block-causal mask the last tile
sees the most keys, so the longest programs start first.

Visible range. Row r at position p = q_start[b] + i sees keys j < lim(p), lim(p) = kv_len[b], or
min(kv_len[b], (p // block_size + 1) * block_size) with a block size: a prefix of the cache. A tile
visits keys [0, max lim) only (tiles past it are never loaded), first in whole BLOCK_N tiles below
min lim with no mask at all, then in tail tiles masked by j < lim(p). kv_len is clamped to S_max
in-kernel, so a bad kv_len never reads past the cache.

Split KV. When the (tile, KV head, row) programs cannot fill the GPU (an 8-32 token block over a long
cache), the grid's second axis splits each tile's visible range [0, max lim) into equal whole-tile
chunks; each split writes its normalised partial output and log2-sum-exp into an fp32 workspace and
``_merge_kernel`` combines them exactly (weights 2^(lse_s - max lse)). The number of splits comes
from metadata only (programs vs SM count, S_max); chunk bounds from the loaded kv_len.

Fused KV write. ``_write_kv_kernel`` copies k_new / v_new into the caches at q_start[b] + i (positions
outside [0, S_max) are dropped) and is launched first on the same stream: the attention programs read
keys written by other programs, and stream order is the only grid-wide barrier, so it is the simple
correct choice (the copy is Sq * Hkv * D elements, negligible beside the attention).

Precision. Scores and the softmax run in fp32 in base 2 (scale * log2(e) folded into one multiply);
fp16 / bf16 tiles go to tl.dot with fp32 accumulation, P is rounded to the input dtype for P @ V as
in FlashAttention; fp32 inputs use input_precision="ieee". The interpreter's bf16 arithmetic is
wrong, so on CPU tensors bf16 tiles are converted to fp32 at the load (UPCAST).
"""

import math

import torch
import triton
import triton.language as tl

from ._common import num_sms, to_output

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
# A split should cover at least this many KV tiles: every split adds R * D fp32 of workspace traffic
# and a merge term, worth it only while a chunk's K/V bytes stay well above that.
_MIN_TILES_PER_SPLIT = 4
_MAX_SPLITS = 64
_MERGE_ROWS = 32  # rows per merge program (x D fp32 accumulator)
_WRITE_ROWS = 16  # positions per KV-write program


@triton.jit
def _load(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A 2-D tile, masked only along the axes that need it (interior tiles load with no mask)."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attend(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    start,
    hi,
    lim,
    qk_scale,
    offs_n,
    offs_d,
    d_ok,
    PAD_D: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One KV tile [start, start + BLOCK_N) of the online softmax. MASKED: a tail tile (keys may reach
    past hi, or past some row's lim); otherwise every key of the tile is visible to every row."""
    keys = start + offs_n
    k_ok = keys < hi
    start64 = tl.cast(start, tl.int64)  # start * stride may pass 2^31 in a big (e.g. layer-fused) cache
    kt_ptrs = k_base + start64 * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_base + start64 * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    kt = _load(kt_ptrs, d_ok, k_ok, PAD_D, MASKED)  # [BLOCK_D, BLOCK_N]: K^T, loaded transposed
    v = _load(v_ptrs, k_ok, d_ok, MASKED, PAD_D)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # log2 units
    if MASKED:
        s = tl.where(keys[None, :] < lim[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp2(-inf) = 0, no NaN
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees every key of the tile
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_rows(
    o_ptr,
    lse_ptr,
    out,
    lse2,
    b,
    qi,
    head,
    n_queries,
    n_heads,
    row_ok,
    offs_d,
    d_ok,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out [rows, BLOCK_D] fp32 -> o[b, qi, head, :] (o contiguous [B, Sq, Hq, D]); lse2 (log2 units) ->
    natural-log lse[b, head, qi] when lse_ptr is given (lse contiguous [B, Hq, Sq])."""
    o_rows = (b.to(tl.int64) * n_queries + qi) * n_heads + head
    o_ptrs = o_ptr + o_rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, to_output(out, o_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok[None, :])
    if lse_ptr is not None:
        lse_rows = (b.to(tl.int64) * n_heads + head) * n_queries + qi
        tl.store(lse_ptr + lse_rows, lse2 * _LN2, mask=row_ok)


@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    ws_o,
    ws_lse,
    q_start_ptr,
    kv_len_ptr,
    n_queries,
    s_max,
    n_kv_heads,
    block_size,
    qk_scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    n_rows = n_queries * GROUP
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    n_bh = tl.num_programs(0) // n_tiles
    pid = tl.program_id(0)
    tile = n_tiles - 1 - pid // n_bh  # last (longest under a block mask) tiles first
    bh = pid % n_bh
    b = bh // n_kv_heads
    kv_head = bh % n_kv_heads

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qi = tl.minimum(rows // GROUP, n_queries - 1)  # padding rows act as the last query, never stored
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    # Per-row visible prefix [0, lim); lim grows with the row, so the tile's min / max are its ends.
    kv = tl.maximum(tl.minimum(tl.load(kv_len_ptr + b), s_max), 0)
    if BLOCK_CAUSAL:
        pos = tl.load(q_start_ptr + b) + qi
        lim = tl.maximum(tl.minimum((pos // block_size + 1) * block_size, kv), 0)
    else:
        lim = tl.full([BLOCK_M], 0, tl.int32) + kv
    lim_min = tl.min(lim, 0)
    lim_max = tl.max(lim, 0)
    if SPLIT:
        n_splits = tl.num_programs(1)
        split = tl.program_id(1)
        chunk = tl.cdiv(tl.cdiv(lim_max, BLOCK_N), n_splits) * BLOCK_N  # whole tiles: interiors stay full
        lo = split * chunk
        hi = tl.minimum(lo + chunk, lim_max)
    else:
        lo = 0
        hi = lim_max
    full_end = tl.maximum(lo, lo + (tl.minimum(hi, lim_min) - lo) // BLOCK_N * BLOCK_N)

    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + qi[:, None] * stride_qs + head[:, None] * stride_qh
    q = _load(q_ptrs + offs_d[None, :], row_ok, d_ok, True, PAD_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Phase 0: the interior tiles, visible to every row (no mask); phase 1: the tail, where some rows (or
    # the cache) end inside the tile. Trip counts from 0, not range(lo, ...): with a dynamic start ptxas
    # serializes the wgmma pipeline.
    for MASKED in tl.static_range(2):
        begin = full_end if MASKED else lo
        n_tiles = tl.cdiv(hi - full_end, BLOCK_N) if MASKED else (full_end - lo) // BLOCK_N
        for t in range(0, n_tiles):
            acc, m_i, l_i = _attend(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                stride_ks,
                stride_vs,
                begin + t * BLOCK_N,
                hi,
                lim,
                qk_scale,
                offs_n,
                offs_d,
                d_ok,
                PAD_D,
                MASKED == 1,
                UPCAST,
                PRECISION,
            )

    # l_i >= 1 once a row saw a key (its maximum contributes 2^0), and NaN from a NaN query: only a row that
    # saw no key keeps l_i == 0 (out 0, lse -inf); a NaN stays NaN in both.
    unseen = l_i == 0
    out = acc * (1.0 / tl.where(unseen, 1.0, l_i))[:, None]
    lse2 = tl.where(unseen, float("-inf"), m_i + tl.log2(tl.where(unseen, 1.0, l_i)))
    if SPLIT:
        # Every split stores every row (an empty split: out 0, lse -inf) so the merge reads no garbage.
        item = (tl.program_id(1) * n_bh + bh).to(tl.int64) * n_rows + rows
        tl.store(ws_lse + item, lse2, mask=row_ok)
        ws_ptrs = ws_o + item[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(ws_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
    else:
        _store_rows(
            o_ptr,
            lse_ptr,
            out,
            lse2,
            b,
            qi,
            head,
            n_queries,
            n_kv_heads * GROUP,
            row_ok,
            offs_d,
            d_ok,
            HEAD_DIM,
            UPCAST,
        )


@triton.jit
def _merge_kernel(
    ws_o,
    ws_lse,
    o_ptr,
    lse_ptr,
    n_queries,
    n_kv_heads,
    n_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Exact merge of the splits of BLOCK_R rows: out = sum_s w_s out_s / sum_s w_s, w_s = 2^(lse_s - m)."""
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    n_rows = n_queries * GROUP
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(n_splits):
        item = (s * n_bh + bh).to(tl.int64) * n_rows + rows
        m = tl.maximum(m, tl.load(ws_lse + item, mask=row_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for s in range(n_splits):
        item = (s * n_bh + bh).to(tl.int64) * n_rows + rows
        w = tl.exp2(tl.load(ws_lse + item, mask=row_ok, other=float("-inf")) - m_use)
        part = tl.load(
            ws_o + item[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :]
        )
        acc += w[:, None] * part
        den += w
    unseen = den == 0  # as in _attn_kernel: NaN (a NaN query) stays NaN
    out = acc * (1.0 / tl.where(unseen, 1.0, den))[:, None]
    lse2 = tl.where(unseen, float("-inf"), m + tl.log2(tl.where(unseen, 1.0, den)))
    b = bh // n_kv_heads
    head = (bh % n_kv_heads) * GROUP + rows % GROUP
    qi = rows // GROUP
    _store_rows(
        o_ptr,
        lse_ptr,
        out,
        lse2,
        b,
        qi,
        head,
        n_queries,
        n_kv_heads * GROUP,
        row_ok,
        offs_d,
        d_ok,
        HEAD_DIM,
        UPCAST,
    )


@triton.jit
def _write_kv_kernel(
    k_new,
    v_new,
    k_cache,
    v_cache,
    q_start_ptr,
    n_queries,
    s_max,
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """cache[b, q_start[b] + i, h] = new[b, i, h] for BLOCK_I positions i of one (b, h); positions outside
    [0, S_max) are dropped (q_start is not value-checked on the GPU)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    pos = tl.load(q_start_ptr + b) + i
    ok = (i < n_queries) & (pos >= 0) & (pos < s_max)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    pos = pos.to(tl.int64)[:, None]
    src = b * stride_knb + i[:, None] * stride_kns + h * stride_knh + offs_d[None, :]
    dst = b * stride_kb + pos * stride_ks + h * stride_kh + offs_d[None, :]
    tl.store(k_cache + dst, tl.load(k_new + src, mask=mask), mask=mask)
    src = b * stride_vnb + i[:, None] * stride_vns + h * stride_vnh + offs_d[None, :]
    dst = b * stride_vb + pos * stride_vs + h * stride_vh + offs_d[None, :]
    tl.store(v_cache + dst, tl.load(v_new + src, mask=mask), mask=mask)


def _config(n_rows: int, head_dim: int, dtype: torch.dtype, gpu: bool = True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from metadata; every choice compiles for sm_90 without a
    register spill under triton 3.6 and 3.9 (tests/test_triton_aot.py checks a sample). fp16 / bf16: as
    many rows as there are, up to 128 (two warpgroups of wgmma), 64 at D = 256 to bound the fp32
    accumulator; 64-key K / V tiles in 3 stages. The padded D = 96 tile (masked along D) takes 2 stages
    and 32 keys under 64 rows, D = 256 2 stages of 32 keys (16 at 64 rows): the larger tiles sit at the
    255-register limit and spill a few bytes in one triton version or the other. fp32 runs the ieee dot
    on CUDA cores, for correctness only: the FMA dot holds its operands in registers, so only 16 x 16
    tiles stay out of local memory (the interpreter, which has no registers, takes the fp16 tiles:
    fewer, larger numpy steps)."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32 and gpu:
        return 16, 16, 4, 1
    block_m = min(64 if block_d > 128 else 128, max(16, triton.next_power_of_2(n_rows)))
    num_warps = 8 if block_m * block_d >= 8192 else 4
    if block_d > 128:
        return block_m, 16 if block_m == 64 else 32, num_warps, 2
    if block_d != head_dim:
        return block_m, 32 if block_m <= 32 else 64, num_warps, 2
    return block_m, 64, num_warps, 3


def _num_splits(programs: int, s_max: int, block_n: int, device: torch.device) -> int:
    """KV splits per tile: only when the tile programs leave SMs idle, never more than one wave, and
    each split at least _MIN_TILES_PER_SPLIT tiles of the largest possible cache (S_max)."""
    sms = num_sms(device)
    if programs >= sms:
        return 1
    by_cache = triton.cdiv(s_max, block_n) // _MIN_TILES_PER_SPLIT
    return max(1, min(sms // programs, by_cache, _MAX_SPLITS))


def block_attention(
    q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse, *, num_splits=None
):
    """Triton provider of ``dllm::block_attention`` (arguments already checked by the op): see
    docs/ops.md. ``num_splits`` forces the number of KV splits (1: no split, no merge). No host sync."""
    n_batch, n_queries, n_heads, head_dim = q.shape
    s_max, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    device = q.device
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty((n_batch, n_queries, n_heads, head_dim), dtype=q.dtype, device=device)
    if return_lse:
        lse = torch.empty((n_batch, n_heads, n_queries), dtype=torch.float32, device=device)
    else:
        lse = torch.empty(0, dtype=torch.float32, device=device)
    block_d = triton.next_power_of_2(head_dim)

    if k_new is not None and n_batch * n_queries > 0:
        # Launched first on the same stream: every attention program below sees the new K / V.
        _write_kv_kernel[(triton.cdiv(n_queries, _WRITE_ROWS), n_kv_heads, n_batch)](
            k_new,
            v_new,
            k_cache,
            v_cache,
            q_start,
            n_queries,
            s_max,
            *k_new.stride()[:3],
            *v_new.stride()[:3],
            *k_cache.stride()[:3],
            *v_cache.stride()[:3],
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_I=_WRITE_ROWS,
            num_warps=4,
        )
    if out.numel() == 0:
        return out, lse

    n_rows = n_queries * group
    block_m, block_n, num_warps, num_stages = _config(n_rows, head_dim, q.dtype, device.type == "cuda")
    n_tiles = triton.cdiv(n_rows, block_m)
    programs = n_tiles * n_batch * n_kv_heads
    splits = _num_splits(programs, s_max, block_n, device) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"dllm::block_attention: num_splits must be >= 1; got {splits}")
    ws_o = ws_lse = None
    if splits > 1:
        ws_o = torch.empty(
            (splits, n_batch * n_kv_heads, n_rows, head_dim), dtype=torch.float32, device=device
        )
        ws_lse = torch.empty((splits, n_batch * n_kv_heads, n_rows), dtype=torch.float32, device=device)
    upcast = device.type != "cuda" and q.dtype == torch.bfloat16  # interpreter: no bf16 arithmetic
    block_causal = block_size > 0
    _attn_kernel[(programs, splits)](
        q,
        k_cache,
        v_cache,
        out,
        lse if return_lse else None,
        ws_o,
        ws_lse,
        q_start,
        kv_len,
        n_queries,
        s_max,
        n_kv_heads,
        # 2^30 exceeds every position (the same mask) and keeps (p // b + 1) * b in int32
        min(block_size, 2**30) if block_causal else 1,
        scale * _LOG2E,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_CAUSAL=block_causal,
        SPLIT=splits > 1,
        UPCAST=upcast,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        block_r = _MERGE_ROWS if block_d <= 128 else _MERGE_ROWS // 2
        _merge_kernel[(triton.cdiv(n_rows, block_r), n_batch * n_kv_heads)](
            ws_o,
            ws_lse,
            out,
            lse if return_lse else None,
            n_queries,
            n_kv_heads,
            splits,
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_R=block_r,
            UPCAST=upcast,
            num_warps=4,
        )
    return out, lse
