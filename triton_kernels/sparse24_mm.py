"""sparse24_mm and armor_linear in Triton (docs/ops.md); the format: dllm_kernels/reference/sparse24.py.

Triton has no sparse MMA, so each program rebuilds dense tiles of the weight in registers and feeds them
to ``tl.dot``. Per K step a program loads, for its BLOCK_N weight rows, the contiguous ``values`` tile
``[BLOCK_N, BLOCK_K/2]`` and ``meta`` tile ``[BLOCK_N, BLOCK_K/16]`` (9/16 of the dense bytes for 16-bit
weights, the whole point at small M), expands every int16 into its four 4-bit codes ``i0 | i1 << 2``,
splits the values into the pairs (v0, v1) of each group of 4 and places them: dense position p of a group
holds v0 where p == i0, v1 where p == i1, else 0. No gather from memory; the loads stay contiguous.
BLOCK_K is a power of two dividing K (and every split's chunk), so no load is masked along K and, with a
multiple-of-16 hint on the chunk start, every load vectorises: Triton's pipeliner skips loads narrower
than 32 bits a thread, and these are the ones it multi-buffers with cp.async (num_stages).

Operand order (swap AB). The program computes ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T``: the weight
rows are the MMA's M side (64 / 128 rows fill a wgmma) and the few rows of x (decode: M = 1..16) its N
side, padded to 16. ``out[m, n] = acc[n, m]`` is stored transposed.

Split K. At decode M the (N tile, M tile) programs cannot fill the GPU (N = 4096 gives 64 tiles of 64
rows on 132 SMs), so the grid's third axis cuts K into equal chunks of whole K tiles. Each split writes its
fp32 partial tile to a workspace ``[splits, M, N]`` and ``_sparse24_reduce_kernel`` adds the splits in
order (deterministic: no atomics) and runs the epilogue. Tiles, splits and warps come from metadata only
(M, N, K, dtype, wrap block size, SM count; a notional 132 SMs under the interpreter), one config each.

Non-finite x. A pruned position is absent, not a zero (reference.sparse24.sparse_product): the dot sees
x's finite part only, and a program that met a NaN or inf walks its chunk again after the main loop,
adding the non-finite entries' effect (found with 0 / 1 products) to the outputs whose weight rows keep
them. A runtime branch: finite x (all of it, in practice) pays one reduction and one select per x tile.

Epilogue: ``blockdiag(wrap_out)`` (armor_linear), then bias, then the store in the output dtype. An N
tile that is a multiple of wrap_out's block size holds whole diagonal blocks, so the tile's output is
multiplied by its ``[BLOCK_N, BLOCK_N]`` block-diagonal (zeros outside the blocks, never loaded) with a
tf32x3 dot: fp32-accurate on tensor cores (an ieee FMA dot would hold the whole tile in registers).
armor_linear applies ``wrap_in`` first with the reference's fp32 block-diagonal product in torch
(``[M, K]``, small beside the weight) and passes that fp32 x to the kernel.

Precision. fp32 accumulation always. 16-bit weights with 16-bit x: 16-bit MMA. 16-bit weights with an
fp32 x (armor_linear's ``wrap_in`` output, kept in fp32 as the reference does): x = hi + lo in two 16-bit
parts and two MMAs (exact to ~2^-22 relative for fp16, ~2^-17 for bf16; twice the tensor-core work,
free while the weight read bounds the time). fp32 weights: ieee dot on CUDA cores, small tiles,
for correctness. The interpreter's bf16 arithmetic is wrong, so on CPU tensors bf16 tiles are converted to
fp32 at the load (UPCAST), every dot runs in fp32, and the store rounds to bf16 to nearest even on the
bits (the interpreter's own conversion truncates).
"""

import torch
import triton
import triton.language as tl

from ..reference.sparse24 import block_diagonal_apply
from ._common import num_sms, to_output

_PROGRAMS_PER_SM = 4  # weight tiles in flight per SM to cover HBM latency at decode
# A split covers at least this many K tiles: each split adds M * N fp32 of workspace write + read (mostly
# L2: the workspace of a decode product is a few MiB at most), worth it while its share of the weight
# (BLOCK_N x chunk at 9/8 bytes an element for 16-bit weights) stays well above that.
_MIN_K_TILES_PER_SPLIT = 2
_MAX_SPLITS = 32
_MAX_BLOCK_N = 128  # the largest wrap_out block the fused epilogue takes
# Under the interpreter: one small config, so that the tests' small shapes cover several N, M and K tiles.
_INTERPRETER_TILES = (16, 32, 64)  # BLOCK_M, BLOCK_N, BLOCK_K


@triton.jit
def _weight_tile(
    values_ptr,
    meta_ptr,
    rows,
    rows_ok,
    k0,
    stride_v,
    stride_meta,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The dense ``[BLOCK_N, BLOCK_K]`` weight tile of columns [k0, k0 + BLOCK_K) rebuilt from its values
    and meta (k0 a multiple of BLOCK_K, which divides K: no column mask)."""
    kv = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    km = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    v_ptrs = values_ptr + rows.to(tl.int64)[:, None] * stride_v + kv[None, :]
    m_ptrs = meta_ptr + rows.to(tl.int64)[:, None] * stride_meta + km[None, :]
    vals = tl.load(v_ptrs, mask=rows_ok[:, None], other=0.0)
    meta = tl.load(m_ptrs, mask=rows_ok[:, None], other=0)
    if UPCAST:
        vals = vals.to(tl.float32)
    # int16 -> its four nibbles, group g of the tile at [:, g // 4, g % 4] (the sign extension of the
    # arithmetic shift is masked off by & 0xF).
    shifts = tl.arange(0, 4) * 4
    codes = (meta.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 0xF
    codes = tl.reshape(codes, [BLOCK_N, BLOCK_K // 4])
    i0 = codes & 3
    i1 = codes >> 2
    v0, v1 = tl.split(tl.reshape(vals, [BLOCK_N, BLOCK_K // 4, 2]))
    p = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros([BLOCK_N, BLOCK_K // 4, 4], vals.dtype)
    dense = tl.where(p == i0[:, :, None], v0[:, :, None], tl.where(p == i1[:, :, None], v1[:, :, None], zero))
    return tl.reshape(dense, [BLOCK_N, BLOCK_K])


@triton.jit
def _kept_tile(meta_ptr, rows, rows_ok, k0, stride_meta, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool ``[BLOCK_N, BLOCK_K]``: the positions of the tile the weight keeps."""
    km = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    meta = tl.load(meta_ptr + rows.to(tl.int64)[:, None] * stride_meta + km[None, :], mask=rows_ok[:, None])
    shifts = tl.arange(0, 4) * 4
    codes = tl.reshape(
        (meta.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 0xF, [BLOCK_N, BLOCK_K // 4]
    )
    p = tl.arange(0, 4)[None, None, :]
    kept = (p == (codes & 3)[:, :, None]) | (p == (codes >> 2)[:, :, None])
    return tl.reshape(kept, [BLOCK_N, BLOCK_K])


@triton.jit
def _add_nonfinite(acc, w, kept, xt):
    """acc + what the non-finite entries of an x slice (16 columns) do to ``W @ x^T`` over the kept elements
    only (reference.sparse24.sparse_product), in IEEE arithmetic: a NaN meeting a kept weight or an inf
    meeting a kept zero makes NaN, an inf meeting a positive / negative weight adds +inf / -inf (so both
    together make NaN). Found with 0 / 1 products in fp16 (counts of at most 32: exact), one class at a
    time, so that a single extra half-size tile lives beside acc."""
    nan = (xt != xt).to(tl.float16)
    up = (xt == float("inf")).to(tl.float16)
    down = (xt == float("-inf")).to(tl.float16)
    positive = (w > 0).to(tl.float16)
    negative = (w < 0).to(tl.float16)
    hits = tl.dot(kept.to(tl.float16), nan, out_dtype=tl.float16)
    hits = tl.dot((kept & (w == 0)).to(tl.float16), up + down, hits, out_dtype=tl.float16)
    acc = tl.where(hits > 0, float("nan"), acc)
    hits = tl.dot(positive, up, out_dtype=tl.float16)
    hits = tl.dot(negative, down, hits, out_dtype=tl.float16)
    acc += tl.where(hits > 0, float("inf"), 0.0)
    hits = tl.dot(negative, up, out_dtype=tl.float16)
    hits = tl.dot(positive, down, hits, out_dtype=tl.float16)
    return acc - tl.where(hits > 0, float("inf"), 0.0)


@triton.jit
def _epilogue(
    acc,
    rows,
    rows_ok,
    cols,
    cols_ok,
    bias_ptr,
    wrap_ptr,
    out_ptr,
    stride_om,
    WRAP_BS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """acc ``[BLOCK_N, BLOCK_M]`` (fp32, out transposed) -> blockdiag(wrap_out) @ acc + bias -> out."""
    if wrap_ptr is not None:
        # The tile's block-diagonal [BLOCK_N, BLOCK_N]: a[i, j] = wrap_out[r_i // bs, r_i % bs, r_j % bs]
        # where rows r_i, r_j share a block. The tile starts on a block boundary (BLOCK_N % bs == 0).
        block = rows // WRAP_BS
        same = (block[:, None] == block[None, :]) & rows_ok[:, None] & rows_ok[None, :]
        a_ptrs = (
            wrap_ptr
            + block.to(tl.int64)[:, None] * (WRAP_BS * WRAP_BS)
            + (rows % WRAP_BS)[:, None] * WRAP_BS
            + (rows % WRAP_BS)[None, :]
        )
        a = tl.load(a_ptrs, mask=same, other=0.0).to(tl.float32)
        acc = tl.dot(a, acc, input_precision="tf32x3")
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32)[:, None]
    out = to_output(acc, out_ptr.dtype.element_ty, UPCAST)
    o_ptrs = out_ptr + cols.to(tl.int64)[None, :] * stride_om + rows[:, None]
    tl.store(o_ptrs, out, mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def _sparse24_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    bias_ptr,
    wrap_ptr,
    out_ptr,
    ws_ptr,
    M,
    N,
    K,
    chunk,
    stride_xm,
    stride_v,
    stride_meta,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WRAP_BS: tl.constexpr,
    SPLIT: tl.constexpr,
    X_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (N tile, M tile, K chunk): acc = W[rows, lo:hi] @ x[cols, lo:hi]^T; then the epilogue, or
    (SPLIT) the fp32 partial tile into the workspace."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < N
    cols_ok = cols < M
    # Chunks and K are multiples of BLOCK_K (a power of two >= 16): the hint lets the loads of every tile
    # vectorise, which is what makes them eligible for cp.async pipelining.
    lo = tl.multiple_of(tl.program_id(2) * chunk, 16)
    hi = tl.minimum(lo + chunk, K)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + cols.to(tl.int64)[None, :] * stride_xm
    xt_ptrs = x_rows + offs_k[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    seen_bad = tl.zeros((), tl.int32)
    for k0 in range(lo, hi, BLOCK_K):
        w = _weight_tile(
            values_ptr, meta_ptr, rows, rows_ok, k0, stride_v, stride_meta, BLOCK_N, BLOCK_K, UPCAST
        )
        xt = tl.load(xt_ptrs + k0, mask=cols_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        # A pruned position is absent, not a zero: a non-finite x there must not reach the dot (0 * inf). The
        # tile's finite part goes through the dot; the non-finite entries' effect is added after the loop.
        bad = (xt != xt) | (tl.abs(xt) == float("inf"))
        seen_bad |= tl.max(tl.max(bad.to(tl.int32), 1), 0)
        xt = tl.where(bad, 0.0, xt)
        if X_SPLIT:
            # fp32 x with a 16-bit weight: x = hi + lo, each exact in the weight's dtype to ~2^-22 / 2^-17.
            x_hi = xt.to(w.dtype)
            x_lo = (xt - x_hi.to(tl.float32)).to(w.dtype)
            acc = tl.dot(w, x_hi, acc)
            acc = tl.dot(w, x_lo, acc)
        else:
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    if seen_bad != 0:
        # Rare: walk the chunk again in slices of 16 columns, registers freed by the main loop (small tiles,
        # one class at a time).
        for k1 in range(lo, hi, 16):
            w_part = _weight_tile(
                values_ptr, meta_ptr, rows, rows_ok, k1, stride_v, stride_meta, BLOCK_N, 16, UPCAST
            )
            kept = _kept_tile(meta_ptr, rows, rows_ok, k1, stride_meta, BLOCK_N, 16)
            x_part = tl.load(x_rows + (k1 + tl.arange(0, 16))[:, None], mask=cols_ok[None, :], other=0.0)
            if UPCAST:
                x_part = x_part.to(tl.float32)
            acc = _add_nonfinite(acc, w_part, kept, x_part)
    if SPLIT:
        ws = ws_ptr + (tl.program_id(2) * M).to(tl.int64) * N
        ws_ptrs = ws + cols.to(tl.int64)[None, :] * N + rows[:, None]
        tl.store(ws_ptrs, acc, mask=rows_ok[:, None] & cols_ok[None, :])
    else:
        _epilogue(acc, rows, rows_ok, cols, cols_ok, bias_ptr, wrap_ptr, out_ptr, stride_om, WRAP_BS, UPCAST)


@triton.jit
def _sparse24_reduce_kernel(
    ws_ptr,
    bias_ptr,
    wrap_ptr,
    out_ptr,
    M,
    N,
    splits,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRAP_BS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Second pass of split K: the splits' partial tiles added in split order, then the epilogue."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < N
    cols_ok = cols < M
    ws_ptrs = ws_ptr + cols.to(tl.int64)[None, :] * N + rows[:, None]
    mask = rows_ok[:, None] & cols_ok[None, :]
    plane = M.to(tl.int64) * N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for s in range(splits):
        acc += tl.load(ws_ptrs + s * plane, mask=mask, other=0.0)
    _epilogue(acc, rows, rows_ok, cols, cols_ok, bias_ptr, wrap_ptr, out_ptr, stride_om, WRAP_BS, UPCAST)


def _tiles(m: int, dtype: torch.dtype, wrap_bs: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) from metadata; every GPU choice is compiled for
    sm_90 in tests/test_triton_aot.py. 16-bit decode (M <= 16): 64 weight rows (one wgmma M) by 128 K
    (64 values + 8 metas a row: 128-byte contiguous row loads), 4 stages of loads in flight. Larger M:
    more x rows per weight tile, up to 128 x 128 (8 warps), shorter K tiles. fp32: ieee FMA dot, whose
    operands live in registers, so small tiles. BLOCK_N grows to wrap_out's block size for the epilogue."""
    if device.type != "cuda":
        block_m, block_n, block_k = _INTERPRETER_TILES
        return block_m, max(block_n, wrap_bs), block_k, 4, 1
    if dtype == torch.float32:
        block_m, block_n, block_k, warps, stages = 16, 32, 32, 4, 2
    elif m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = triton.next_power_of_2(m), 64, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 3
    if wrap_bs > block_n:
        block_n, warps = wrap_bs, max(warps, wrap_bs // 16)
    if block_n * block_m > 128 * 64 and wrap_bs >= 128:
        block_m = 64  # the 128-wide block-diagonal epilogue beside a 128 x 128 tile spills on sm_90
    return block_m, block_n, block_k, warps, stages


def _plan(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, device, num_splits=None):
    """(splits, chunk, BLOCK_K) from metadata only. BLOCK_K is cut to the largest power of two dividing K
    (>= 16, K being a multiple of 16) and the chunk is a multiple of it, so no tile reaches past its
    chunk or K: the kernel has no column masks (model dims are multiples of 128: nothing is cut there)."""
    if k:
        block_k = min(block_k, k & -k)
    if num_splits is None:
        # Split K only as far as needed to give every SM a few weight tiles, each split >= 2 K tiles.
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        k_tiles = triton.cdiv(k, block_k)
        splits = min(
            triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), tiles),
            max(1, k_tiles // _MIN_K_TILES_PER_SPLIT),
            _MAX_SPLITS,
        )
        chunk = max(1, triton.cdiv(k_tiles, splits)) * block_k
    else:
        if num_splits < 1:
            raise ValueError(f"dllm::sparse24_mm: num_splits must be >= 1; got {num_splits}")
        chunk = max(16, triton.cdiv(triton.cdiv(k, num_splits), 16) * 16)
        block_k = min(block_k, chunk & -chunk)
    return max(1, triton.cdiv(k, chunk)), chunk, block_k


def _launch(x2d, values, meta, bias, wrap_out, out_dtype, num_splits):
    m, k = x2d.shape
    n = values.shape[0]
    device = x2d.device
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    if k == 0:  # an empty sum (and no kernel on possibly null data pointers)
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    if values.stride(-1) != 1:
        values = values.contiguous()
    if meta.stride(-1) != 1:
        meta = meta.contiguous()
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if wrap_out is not None:
        wrap_out = wrap_out.contiguous()
    wrap_bs = 0 if wrap_out is None else wrap_out.shape[1]
    block_m, block_n, block_k, num_warps, num_stages = _tiles(m, values.dtype, wrap_bs, device)
    splits, chunk, block_k = _plan(m, n, k, block_m, block_n, block_k, device, num_splits)
    upcast = device.type != "cuda" and torch.bfloat16 in (values.dtype, x2d.dtype)
    x_split = x2d.dtype == torch.float32 and values.dtype != torch.float32 and not upcast
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=device) if splits > 1 else None
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _sparse24_kernel[(*grid, splits)](
        x2d,
        values,
        meta,
        None if ws is not None else bias,
        None if ws is not None else wrap_out,
        None if ws is not None else out,
        ws,
        m,
        n,
        k,
        chunk,
        x2d.stride(0),
        values.stride(0),
        meta.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        WRAP_BS=max(wrap_bs, 1),
        SPLIT=ws is not None,
        X_SPLIT=x_split,
        UPCAST=upcast,
        PRECISION="ieee" if values.dtype == torch.float32 or upcast else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if ws is not None:
        _sparse24_reduce_kernel[grid](
            ws,
            bias,
            wrap_out,
            out,
            m,
            n,
            splits,
            out.stride(0),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            WRAP_BS=max(wrap_bs, 1),
            UPCAST=upcast,
            num_warps=4,
        )
    return out


def sparse24_mm(x2d, values, meta, bias=None, *, num_splits=None):
    """Triton provider of ``dllm::sparse24_mm`` on ``x2d [M, K]`` (arguments checked by the op): out
    ``[M, N]`` in x's dtype. ``num_splits`` forces the number of K splits (tests; 1: no workspace)."""
    return _launch(x2d, values, meta, bias, None, x2d.dtype, num_splits)


def fused_wrap_supported(block_size: int) -> str | None:
    """None if the epilogue can fuse a wrap_out of this block size, else why not."""
    if block_size & (block_size - 1) or block_size > _MAX_BLOCK_N:
        return f"triton fuses wrap_out blocks of a power of two up to {_MAX_BLOCK_N}; got {block_size}"
    return None


def armor_linear(x2d, wrap_in, values, meta, wrap_out, bias=None, *, num_splits=None):
    """Triton provider of ``dllm::armor_linear`` on ``x2d [M, K]``: blockdiag(wrap_in) in fp32 first (torch
    batched product), then the sparse product with blockdiag(wrap_out) and bias fused in its epilogue.
    wrap_out's block size must pass ``fused_wrap_supported``."""
    inner = block_diagonal_apply(wrap_in, x2d)
    return _launch(inner, values, meta, bias, wrap_out, x2d.dtype, num_splits)
