"""select_unmask in Triton (docs/ops.md); the count rule mirrors csrc/common/select_unmask.h.

One program takes one row whole (BLOCK_L = next_power_of_2(L) lanes). Each position gets a 64-bit
key that orders exactly like the selection order: the high 32 bits map the fp32 score's bits to a
signed int32 that orders like the float (-0.0 folded onto +0.0), the low 32 bits are
``BLOCK_L - 1 - position`` so that, among equal scores, the lower position has the larger key. Every
key is distinct; unselectable positions (not eligible, NaN, -inf, padding) get keys below every
selectable one. A bitonic sort (tl.sort's network, with a partner exchange the interpreter runs
fast) puts the keys in descending order, so lane ``j`` of the sorted keys holds the
position of rank ``j + 1``; its score is decoded from the key and widened exactly to fp64 for the
factor rule. The count ``n`` follows ``select_count``; the n-th sorted key is the cut-off and a
position is selected when ``n > 0`` and its key is at least the cut-off. The fused commit writes
``x[selected] = token[selected]`` from the same program.

The set rules (local_leap, hierarchy) use the sort only for their floor (the first
``min(min_per_row, S)`` of the order) and add their rule from prefix scans and gathers, whatever the
radius: local_leap counts the anchors in ``[j - radius, j + radius]`` as the difference of two gathered
entries of their prefix count; hierarchy takes each run's largest score as the larger of a prefix and a
suffix max of ``run index << 32 | score order bits`` (run indices only grow along L, so neither crosses
into another run), each by doubling with gathers. (tl.associative_scan with a max would do, but the
interpreter calls Python for each element of such a scan; gathers and cumsum run in numpy.)

No float arithmetic touches the score before the fp64 comparisons: NaN / -inf / -0.0 are recognised
on the bit pattern, so flush-to-zero modes cannot move a score. ``threshold``, ``factor``,
``low_threshold`` and ``margin`` travel as the two int32 halves of their fp64 bit patterns (a Python
float argument would be passed as fp32).
"""

import struct

import torch
import triton
import triton.language as tl


@triton.jit
def _fp64(hi, lo):
    """The fp64 whose bit pattern is (hi << 32) | (lo as unsigned), hi and lo int32."""
    bits = (hi.to(tl.int64) << 32) | lo.to(tl.uint32).to(tl.int64)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _order_bits(bits):
    """fp32 bits (int32, not NaN) -> int32 that orders like the float; -0.0 and +0.0 both map to 0."""
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 == +0.0: same key, ties go by position
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _score_of(okey):
    """Inverse of _order_bits, widened exactly to fp64."""
    bits = tl.where(okey >= 0, okey, okey ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True).to(tl.float64)


@triton.jit
def _indicator(N_DIMS: tl.constexpr, J: tl.constexpr):
    """0 / 1 along hypercube axis N_DIMS - 1 - J (the J-th innermost), broadcastable to the cube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - J - 1) + [2] + [1] * J)


@triton.jit
def _compare_and_swap(h, flip, N_DIMS: tl.constexpr, J: tl.constexpr):
    """One bitonic step along the J-th innermost axis of a [2] * N_DIMS cube of distinct int64 keys.

    As tl.sort's step, but the partner of each lane is the axis sum minus itself (exact: int64 sums
    wrap modulo 2^64) instead of an xor-sum: a built-in reduction, which the interpreter runs in numpy
    instead of one Python call per element."""
    partner = tl.sum(h, axis=N_DIMS - 1 - J, keep_dims=True) - h
    take_max = (flip ^ _indicator(N_DIMS, J)) != 0
    return tl.where(take_max, tl.maximum(h, partner), tl.minimum(h, partner))


@triton.jit
def _sort_descending(x, LOG_N: tl.constexpr):
    """Bitonic sort of a [2 ** LOG_N] (LOG_N >= 1) int64 vector, largest first."""
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:
            flip = _indicator(LOG_N, stage)  # alternate directions between sub-sequences
        else:
            flip = 1  # the last merge: descending throughout
        for i in tl.static_range(stage):
            h = _compare_and_swap(h, flip, LOG_N, stage - 1 - i)
    return tl.reshape(h, [2**LOG_N])


@triton.jit
def _scan_max(x, LOG_N: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive prefix max of a [2 ** LOG_N] vector (suffix max when REVERSE), by doubling."""
    offs = tl.arange(0, 2**LOG_N)
    for step in tl.static_range(LOG_N):
        if REVERSE:
            src = tl.minimum(offs + (1 << step), 2**LOG_N - 1)  # clamped: still inside the suffix
        else:
            src = tl.maximum(offs - (1 << step), 0)
        x = tl.maximum(x, tl.gather(x, src, 0))
    return x


@triton.jit
def _passes(s, bound, INCLUSIVE: tl.constexpr):
    if INCLUSIVE:
        return s >= bound
    else:
        return s > bound


@triton.jit(
    do_not_specialize=[
        "thr_hi",
        "thr_lo",
        "fac_hi",
        "fac_lo",
        "min_per_row",
        "low_hi",
        "low_lo",
        "radius",
        "mar_hi",
        "mar_lo",
    ]
)
def _select_kernel(
    score_ptr,
    eligible_ptr,
    k_ptr,
    token_ptr,
    x_ptr,
    selected_ptr,
    count_ptr,
    L,
    stride_s,
    stride_e,
    stride_t,
    stride_x,
    thr_hi,
    thr_lo,
    fac_hi,
    fac_lo,
    min_per_row,
    low_hi,
    low_lo,
    radius,
    mar_hi,
    mar_lo,
    POLICY: tl.constexpr,
    INCLUSIVE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    LOG_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    in_row = offs < L

    # Selectable positions, recognised on the bit pattern: NaN is any exponent-all-ones pattern with a
    # non-zero mantissa, -inf is 0xFF800000.
    bits = tl.load(score_ptr + row * stride_s + offs, mask=in_row, other=0.0).to(tl.int32, bitcast=True)
    elig = tl.load(eligible_ptr + row * stride_e + offs, mask=in_row, other=0) != 0
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    selectable = elig & ~is_nan & (bits != -8388608)
    n_selectable = tl.sum(selectable.to(tl.int32), 0)

    # Distinct keys in selection order; unselectable ones sit below every selectable one (the lowest
    # selectable high word is -FLT_MAX's, -2^31 + 2^23).
    okey = tl.where(selectable, _order_bits(bits), -2147483648)
    key = (okey.to(tl.int64) << 32) | (BLOCK_L - 1 - offs).to(tl.int64)
    ranked = _sort_descending(key, LOG_L)  # lane j: the key of rank j + 1
    rank0 = offs  # 0-based rank of each sorted lane
    in_range = rank0 < n_selectable

    if k_ptr is not None:
        k = tl.maximum(tl.load(k_ptr + row).to(tl.int64), 0)
    else:
        k = tl.zeros((), tl.int64)
    top_k = tl.minimum(k, n_selectable.to(tl.int64))
    s = bits.to(tl.float32, bitcast=True).to(tl.float64)
    threshold = _fp64(thr_hi, thr_lo)
    floor = tl.minimum(min_per_row, n_selectable).to(tl.int64)

    if POLICY == "local_leap" or POLICY == "hierarchy":
        high = selectable & _passes(s, threshold, INCLUSIVE)
        low = selectable & _passes(s, _fp64(low_hi, low_lo), INCLUSIVE)
        if POLICY == "local_leap":
            anchors = tl.cumsum(high.to(tl.int32), 0)  # anchors at or before each position
            last = tl.gather(anchors, tl.minimum(offs + radius, BLOCK_L - 1), 0)
            first = offs - radius - 1  # the last position before the window
            near = last > tl.where(first >= 0, tl.gather(anchors, tl.maximum(first, 0), 0), 0)
        else:
            # Run index: 1 + the run starts at or before; an ineligible position keeps the last run's
            # index with value 0, below every selectable score's biased order bits (>= 2^23).
            prev = tl.load(eligible_ptr + row * stride_e + offs - 1, mask=in_row & (offs > 0), other=0) != 0
            run = tl.cumsum((elig & ~prev).to(tl.int64), 0)
            value = tl.where(selectable, okey.to(tl.int64) + 2147483648, 0)
            ahead = _scan_max((run << 32) | value, LOG_L, False) & 0xFFFFFFFF
            behind = _scan_max(((BLOCK_L - run) << 32) | value, LOG_L, True) & 0xFFFFFFFF
            near = value == tl.maximum(ahead, behind)
        rule = high | (near & low)
        n = floor  # the floor's prefix first; the rule joins it below
    elif POLICY == "topk":
        n = top_k
    elif POLICY == "factor" or POLICY == "factor_upstream":
        c = _score_of((ranked >> 32).to(tl.int32))
        factor = _fp64(fac_hi, fac_lo)
        bound = 1.0 - factor / (rank0 + 2).to(tl.float64)  # 1 - factor / (i + 1), i = rank0 + 1
        fails = in_range & (rank0 > 0) & ~(c >= bound)  # rank 1 always passes
        n = tl.min(tl.where(fails, rank0, n_selectable), 0).to(tl.int64)
        if POLICY == "factor_upstream":  # Fast-dLLM's released loop also commits a last rank that fails first
            n = tl.where(n == n_selectable - 1, n_selectable.to(tl.int64), n)
    elif POLICY == "all":
        n = n_selectable.to(tl.int64)
    elif POLICY == "near_best":  # how many pass min(threshold, best - margin): a prefix of the order
        best = _score_of((tl.max(key, 0) >> 32).to(tl.int32))  # NaN in a row with nothing selectable
        bound = tl.minimum(best - _fp64(mar_hi, mar_lo), threshold)
        n = tl.sum((selectable & _passes(s, bound, INCLUSIVE)).to(tl.int32), 0).to(tl.int64)
    else:  # "threshold", "topk_or_threshold": how many selectable scores pass (a prefix of the order)
        n_pass = tl.sum((selectable & _passes(s, threshold, INCLUSIVE)).to(tl.int32), 0).to(tl.int64)
        if POLICY == "threshold":
            n = n_pass
        else:
            n = tl.where(n_pass >= k, n_pass, top_k)
    n = tl.maximum(n, floor)

    # The key of rank n is the cut-off: selected = the n largest keys (all selectable since n <= S).
    # n = 0 selects nothing: no key reaches INT64_MAX (the largest is +inf's, 0x7F800000 << 32 | low).
    # (The interpreter turns `tensor & scalar` of booleans into integers, hence no `& (n > 0)`.)
    cut = tl.max(tl.where(rank0.to(tl.int64) == n - 1, ranked, -9223372036854775807 - 1), 0)
    cut = tl.where(n > 0, cut, 9223372036854775807)
    selected = (key >= cut) & in_row
    if POLICY == "local_leap" or POLICY == "hierarchy":
        selected = selected | rule
        n = tl.sum(selected.to(tl.int32), 0).to(tl.int64)
    tl.store(selected_ptr + row * L + offs, selected.to(tl.uint8), mask=in_row)
    tl.store(count_ptr + row, n.to(tl.int32))
    if x_ptr is not None:
        token = tl.load(token_ptr + row * stride_t + offs, mask=selected, other=0)
        tl.store(x_ptr + row * stride_x + offs, token, mask=selected)


def _halves(value: float) -> tuple[int, int]:
    """The fp64 bit pattern of ``value`` as (high, low) signed int32 halves."""
    (bits,) = struct.unpack("<q", struct.pack("<d", float(value)))
    hi, lo = bits >> 32, bits & 0xFFFFFFFF
    return hi, lo - 2**32 if lo >= 2**31 else lo


def _num_warps(block_l: int) -> int:
    return max(1, min(16, block_l // 256))


def select_unmask(
    score,
    eligible,
    policy,
    k,
    threshold,
    inclusive,
    factor,
    min_per_row,
    low_threshold,
    radius,
    margin,
    token,
    x,
):
    """Triton provider of ``dllm::select_unmask`` (arguments already checked by the op). ``score`` fp32
    and ``eligible`` bool ``[B, L]``, unit stride along L; ``token`` / ``x`` int64 ``[B, L]`` or None
    (``x`` is written in place). Returns ``(selected bool [B, L], count int32 [B])``. No host sync."""
    n_rows, length = score.shape
    device = score.device
    selected = torch.empty((n_rows, length), dtype=torch.bool, device=device)
    count = torch.empty((n_rows,), dtype=torch.int32, device=device)
    if n_rows == 0 or length == 0:
        selected.zero_()
        count.zero_()
        return selected, count

    if k is not None:
        k = k.contiguous()
    commit = x is not None
    thr_hi, thr_lo = _halves(threshold)
    fac_hi, fac_lo = _halves(factor)
    low_hi, low_lo = _halves(low_threshold)
    mar_hi, mar_lo = _halves(margin)
    block_l = max(2, triton.next_power_of_2(length))
    _select_kernel[(n_rows,)](
        score,
        eligible.view(torch.uint8),
        k,
        token if commit else None,
        x if commit else None,
        selected.view(torch.uint8),
        count,
        length,
        score.stride(0),
        eligible.stride(0),
        token.stride(0) if commit else 0,
        x.stride(0) if commit else 0,
        thr_hi,
        thr_lo,
        fac_hi,
        fac_lo,
        min(int(min_per_row), length),  # min(min_per_row, S) == min(min(min_per_row, L), S)
        low_hi,
        low_lo,
        min(int(radius), length),  # a wider neighbourhood sees nothing more
        mar_hi,
        mar_lo,
        POLICY=policy,
        INCLUSIVE=bool(inclusive),
        BLOCK_L=block_l,
        LOG_L=block_l.bit_length() - 1,
        num_warps=_num_warps(block_l),
    )
    return selected, count
