"""logits_to_confidence in Triton (docs/ops.md); the math mirrors csrc/common/logits_to_confidence.h.

One program scans one vocabulary chunk of one row in tiles of BLOCK_V, keeping the row state of the
C++ kernels: the largest raw logit (first index) and the runner-up, z = sum 2^((l - lmax) * c) and
s1 = sum 2^t * t (per lane, against the running maximum), and for sampling the largest Gumbel key
l + T * g per lane (its first index and logit). The noise of a tile comes from one Philox call per 4
columns (counter col // 4, word col % 4; tiles and chunks start on multiples of 4). With one chunk per
row the program writes (token, score) itself; with several, each writes its partial state to a
workspace and ``_merge_kernel`` merges the states of a row in chunk order. Chunking depends on metadata
only (rows, V, SM count).

A vocabulary shard (``logits_to_confidence_partial``) is scanned in shifted columns: global id minus
``col_base`` (``vocab_start`` rounded down to a multiple of 4), its first ``lead`` columns reading as
-inf, so every tile still starts on a whole Philox call; the row's state is stored (``_store_state``)
instead of being finalized.
"""

import torch
import triton
import triton.language as tl

from ._common import num_sms

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
# Tile sizes: 4096 elements over 8 warps need ~64 registers a thread on sm_90, so ~4 programs (32 KiB of
# bf16 loads) are in flight per SM; sampling keeps 3 more values per lane and is bound by Philox
# arithmetic, so it takes 2048 to keep 2 programs per SM.
_MAX_BLOCK_V, _MAX_BLOCK_V_SAMPLE = 4096, 2048
_PROGRAMS_PER_SM = 4  # enough tiles in flight per SM to cover memory latency


@triton.jit
def _to_uniform(word):
    """The uniform (0, 1) of a random word: ((x >> 9) + 0.5) * 2^-23, exact in fp32."""
    return ((word >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _uniform(seed, col, row, off_lo, off_hi):
    """counter_rng.uniform of one column: word col % 4 of Philox4x32-10 at counter (col // 4, row, off)."""
    w0, w1, w2, w3 = tl.philox(seed, col // 4, row, off_lo, off_hi)
    word = col % 4
    return _to_uniform(tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3))))


@triton.jit
def _tile_uniforms(seed, start, row, off_lo, off_hi, BLOCK_V: tl.constexpr):
    """The uniforms of columns [start, start + BLOCK_V) (start a multiple of 4): one Philox call per 4
    columns, its words interleaved into column order."""
    w0, w1, w2, w3 = tl.philox(seed, start // 4 + tl.arange(0, BLOCK_V // 4), row, off_lo, off_hi)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_V])  # [4i + 2b + a] = w_(2b + a)
    return _to_uniform(words)


@triton.jit
def _rescale(z, s1, d):
    """(z, s1) summed against a maximum m_old, re-expressed against m_new >= m_old; d = (m_old - m_new) * c,
    NaN or -inf when nothing was summed yet (m_old = -inf): then z stays 0."""
    d = tl.where(z == 0.0, 0.0, d)
    w = tl.exp2(d)
    return z * w, w * (s1 + d * z)


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0 without cancellation: Taylor terms to x^6 for |x| < 1/4 (rel. err < 5e-8)."""
    s = tl.maximum(x, -0.25)
    p = s * (1.0 + s * (0.5 + s * (1 / 6 + s * (1 / 24 + s * (1 / 120 + s / 720)))))
    return tl.where(x > -0.25, p, tl.exp(x) - 1.0)


@triton.jit
def _finalize(
    token_ptr,
    score_ptr,
    row,
    lmax,
    l2,
    z,
    s1,
    kl,
    lidx,
    kidx,
    c,
    seed,
    off_lo,
    off_hi,
    V,
    SCORE: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    """finalize_state: the (token, score) of a row from its whole-row state, scores clamped to their ranges;
    a sampled row whose every key rounded to -inf takes its argmax. A NaN read makes z NaN (its term is
    NaN and no rescale undoes it), so z stands in for the state's nan flag."""
    if SAMPLE:
        sampled = kidx >= 0
        token = tl.where(sampled, kidx, lidx)
        mass = tl.where(sampled, tl.exp2((kl - lmax) * c), 1.0)
    else:
        token = lidx
        mass = 1.0
    if SCORE == "prob":
        value = tl.minimum(mass / z, 1.0)
    elif SCORE == "margin":
        value = tl.minimum(-_expm1((l2 - lmax) * c * _LN2) / z, 1.0)
    elif SCORE == "neg_entropy":
        value = tl.minimum(_LN2 * s1 / z - tl.log(z), 0.0)
    elif SCORE == "logit_margin":
        value = lmax - l2
    else:
        value = _uniform(seed, V, row, off_lo, off_hi)
    undefined = (z != z) | (lmax == float("inf"))
    empty = lidx < 0
    tl.store(token_ptr + row, tl.where(undefined | empty, -1, token).to(tl.int64))
    tl.store(score_ptr + row, tl.where(undefined, float("nan"), tl.where(empty, float("-inf"), value)))


@triton.jit
def _store_state(state_ptr, row, lmax, l2, z, s1, kmax, kl, lidx, kidx, col_base):
    """store_state of csrc/common/logits_to_confidence.h: 8 doubles, lmax NaN when a NaN was read (z is NaN
    then), indices global."""
    out = state_ptr + row.to(tl.int64) * 8
    tl.store(out, tl.where(z != z, float("nan"), lmax).to(tl.float64))
    tl.store(out + 1, l2.to(tl.float64))
    tl.store(out + 2, z.to(tl.float64))
    tl.store(out + 3, s1.to(tl.float64))
    tl.store(out + 4, kmax.to(tl.float64))
    tl.store(out + 5, kl.to(tl.float64))
    tl.store(out + 6, tl.where(lidx < 0, -1, lidx.to(tl.int64) + col_base).to(tl.float64))
    tl.store(out + 7, tl.where(kidx < 0, -1, kidx.to(tl.int64) + col_base).to(tl.float64))


@triton.jit(do_not_specialize=["seed", "off_lo", "off_hi", "col_base", "lead"])
def _scan_kernel(
    x_ptr,
    eligible_ptr,
    banned_ptr,
    token_ptr,
    score_ptr,
    state_ptr,
    ws_f,
    ws_i,
    n_inner,
    stride_o,
    stride_i,
    V,
    chunk,
    n_banned,
    c,
    temperature,
    seed,
    off_lo,
    off_hi,
    col_base,
    lead,
    SCORE: tl.constexpr,
    SAMPLE: tl.constexpr,
    SPLIT: tl.constexpr,
    STATE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V + lead)
    if eligible_ptr is not None:
        # An ineligible row reads nothing; its empty state finalizes to (-1, -inf).
        hi = tl.where(tl.load(eligible_ptr + row) != 0, hi, lo)
    row_ptr = x_ptr + (row // n_inner).to(tl.int64) * stride_o + (row % n_inner).to(tl.int64) * stride_i

    offs = tl.arange(0, BLOCK_V)
    lmax = tl.full((), float("-inf"), tl.float32)
    l2 = tl.full((), float("-inf"), tl.float32)
    lidx = tl.full((), -1, tl.int32)
    z = tl.zeros([BLOCK_V], tl.float32)
    s1 = tl.zeros([BLOCK_V], tl.float32)
    kmax = tl.full([BLOCK_V], float("-inf"), tl.float32)
    kl = tl.full([BLOCK_V], float("-inf"), tl.float32)
    kidx = tl.full([BLOCK_V], -1, tl.int32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        # fp32 at once: every later step (and the interpreter's arithmetic) works in fp32.
        x = tl.load(row_ptr + (cols - lead), mask=(cols >= lead) & (cols < hi), other=float("-inf")).to(
            tl.float32
        )
        if banned_ptr is not None:
            for k in range(n_banned):
                ban = tl.load(banned_ptr + k) - col_base
                ban = tl.where((ban >= lead) & (ban < V + lead), ban, -1).to(tl.int32)  # 32-bit compare below
                x = tl.where(cols == ban, float("-inf"), x)
        tile_max = tl.max(x, 0)
        if tile_max > lmax:  # the row's maximum moves into this tile (rare after the first tiles)
            first = tl.min(tl.where(x == tile_max, cols, hi), 0)
            if SCORE == "margin" or SCORE == "logit_margin":
                l2 = tl.maximum(lmax, tl.max(tl.where(cols == first, float("-inf"), x), 0))
            z, s1 = _rescale(z, s1, (lmax - tile_max) * c)
            lmax = tile_max
            lidx = first
        else:
            l2 = tl.maximum(l2, tile_max)
        # Exactly 0 at the maximum, so z >= 1; only -inf so far: every term is 0.
        t = (x - tl.where(lmax == float("-inf"), 0.0, lmax)) * c
        e = tl.exp2(t)
        z += e
        if SCORE == "neg_entropy":
            s1 += e * tl.maximum(t, -1024.0)  # 2^-1024 is 0 in fp32; the clamp avoids 0 * -inf = NaN
        if SAMPLE:
            u = _tile_uniforms(seed, col_base + start, row, off_lo, off_hi, BLOCK_V)
            key = x + temperature * -tl.log(-tl.log(u))
            better = key > kmax  # strict: each lane keeps its first maximum
            kmax = tl.where(better, key, kmax)
            kl = tl.where(better, x, kl)
            kidx = tl.where(better, cols, kidx)

    z = tl.sum(z, 0)
    s1 = tl.sum(s1, 0)
    key_max = tl.max(kmax, 0)
    key_idx = tl.min(tl.where(kmax == key_max, kidx, V + lead), 0)
    key_logit = tl.max(tl.where(kidx == key_idx, kl, float("-inf")), 0)
    if SPLIT:
        n = tl.num_programs(0) * tl.num_programs(1)
        item = row * tl.num_programs(1) + split
        tl.store(ws_f + item, lmax)
        tl.store(ws_f + n + item, l2)
        tl.store(ws_f + 2 * n + item, z)
        tl.store(ws_f + 3 * n + item, s1)
        tl.store(ws_f + 4 * n + item, key_max)
        tl.store(ws_f + 5 * n + item, key_logit)
        tl.store(ws_i + item, lidx)
        tl.store(ws_i + n + item, key_idx)
    elif STATE:
        _store_state(state_ptr, row, lmax, l2, z, s1, key_max, key_logit, lidx, key_idx, col_base)
    else:
        _finalize(
            token_ptr,
            score_ptr,
            row,
            lmax,
            l2,
            z,
            s1,
            key_logit,
            lidx,
            key_idx,
            c,
            seed,
            off_lo,
            off_hi,
            V,
            SCORE,
            SAMPLE,
        )


@triton.jit(do_not_specialize=["seed", "off_lo", "off_hi", "col_base"])
def _merge_kernel(
    f_ptr,
    i_ptr,
    token_ptr,
    score_ptr,
    state_ptr,
    parts,
    row_stride,
    part_stride,
    field_stride,
    V,
    c,
    seed,
    off_lo,
    off_hi,
    col_base,
    SCORE: tl.constexpr,
    SAMPLE: tl.constexpr,
    STATE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """merge_states over a row's parts in any order (equal maxima: the lowest index wins), then finalize or
    (STATE) store the state. Part s of the row holds float field f at f_ptr + row * row_stride + s *
    part_stride + f * field_stride and its two indices likewise from i_ptr: the chunk workspace, or the
    states [parts, rows, 8] of vocabulary shards (a NaN lmax there marks a NaN read)."""
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < parts
    fp = f_ptr + row.to(tl.int64) * row_stride + s * part_stride
    ip = i_ptr + row.to(tl.int64) * row_stride + s * part_stride
    lmax_s = tl.load(fp, mask=ok, other=float("-inf")).to(tl.float32)
    l2_s = tl.load(fp + field_stride, mask=ok, other=float("-inf")).to(tl.float32)
    z_s = tl.load(fp + 2 * field_stride, mask=ok, other=0.0).to(tl.float32)
    s1_s = tl.load(fp + 3 * field_stride, mask=ok, other=0.0).to(tl.float32)
    kmax_s = tl.load(fp + 4 * field_stride, mask=ok, other=float("-inf")).to(tl.float32)
    kl_s = tl.load(fp + 5 * field_stride, mask=ok, other=float("-inf")).to(tl.float32)
    lidx_s = tl.load(ip, mask=ok, other=-1).to(tl.int64)
    kidx_s = tl.load(ip + field_stride, mask=ok, other=-1).to(tl.int64)
    nan = tl.max((lmax_s != lmax_s).to(tl.int32), 0) != 0
    lmax_s = tl.where(lmax_s != lmax_s, float("-inf"), lmax_s)

    lmax = tl.max(lmax_s, 0)
    lidx = tl.min(tl.where((lmax_s == lmax) & (lidx_s >= 0), lidx_s, V), 0)
    at = tl.min(tl.where((lmax_s == lmax) & (lidx_s == lidx), s, BLOCK_S), 0)
    lidx = tl.where(lidx == V, -1, lidx)
    # Runner-up of the union: every part's runner-up and every part maximum but the winning one.
    l2 = tl.maximum(tl.max(l2_s, 0), tl.max(tl.where(s == at, float("-inf"), lmax_s), 0))
    z_s, s1_s = _rescale(z_s, s1_s, (lmax_s - lmax) * c)
    key_max = tl.max(kmax_s, 0)
    kidx = tl.min(tl.where((kmax_s == key_max) & (kidx_s >= 0), kidx_s, V), 0)
    kl = tl.max(tl.where((kmax_s == key_max) & (kidx_s == kidx), kl_s, float("-inf")), 0)
    kidx = tl.where(kidx == V, -1, kidx)
    z = tl.where(nan, float("nan"), tl.sum(z_s, 0))
    s1 = tl.sum(s1_s, 0)
    if STATE:
        _store_state(state_ptr, row, lmax, l2, z, s1, key_max, kl, lidx, kidx, col_base)
    else:
        _finalize(
            token_ptr,
            score_ptr,
            row,
            lmax,
            l2,
            z,
            s1,
            kl,
            lidx,
            kidx,
            c,
            seed,
            off_lo,
            off_hi,
            V,
            SCORE,
            SAMPLE,
        )


def _plan(n_rows: int, vocab: int, max_block: int, device: torch.device, num_splits: int | None):
    """(splits, chunk, BLOCK_V) from metadata only; chunks and tiles start on multiples of 4 (whole Philox
    calls). ``num_splits`` asks for at most that many chunks."""
    block_v = min(max_block, max(4, triton.next_power_of_2(vocab)))
    if num_splits is None:
        # Split the vocabulary only as far as needed to give every SM a few programs.
        tiles = triton.cdiv(vocab, block_v)
        splits = min(tiles, triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), n_rows))
        chunk = triton.cdiv(tiles, splits) * block_v  # whole tiles: every chunk starts aligned
        return triton.cdiv(vocab, chunk), chunk, block_v
    chunk = triton.cdiv(triton.cdiv(vocab, num_splits), 4) * 4
    return triton.cdiv(vocab, chunk), chunk, min(block_v, triton.next_power_of_2(chunk))


def _int32(value: int) -> int:
    """The low 32 bits of a Python int as a signed int32 (Philox counter words are passed as int32)."""
    return (value + 2**31) % 2**32 - 2**31


def _launch_constants(temperature, score, tempered_score, seed, offset):
    """(sample, c, seed, off_lo, off_hi) as the kernels take them: c = log2(e) times the softmax's scale,
    the seed as its int64 two's complement pattern, the offset as two int32 words."""
    sample = temperature > 0
    c = _LOG2E / temperature if sample and tempered_score and score != "logit_margin" else _LOG2E
    return sample, c, (seed + 2**63) % 2**64 - 2**63, _int32(offset), _int32(offset >> 32)


def logits_to_confidence(
    rows,
    eligible,
    banned,
    temperature,
    score,
    tempered_score,
    seed,
    offset,
    *,
    vocab_start=None,
    num_splits=None,
):
    """Triton provider of ``dllm::logits_to_confidence`` on an ``[O, I, V]`` rows view (any strides on
    O and I, unit stride on V): ``(token, score)``, each ``[O, I]``. With ``vocab_start`` (the global id of
    the first column) the rows are a vocabulary shard and the result is their states ``[O, I, 8]`` float64
    (``dllm::logits_to_confidence_partial``). ``num_splits`` forces the number of vocabulary chunks."""
    n_outer, n_inner, vocab = rows.shape
    n_rows = n_outer * n_inner
    state = vocab_start is not None
    col_base = 0 if vocab_start is None else vocab_start // 4 * 4
    lead = 0 if vocab_start is None else vocab_start - col_base
    token = value = states = None
    if state:
        states = torch.empty((n_outer, n_inner, 8), dtype=torch.float64, device=rows.device)
    else:
        token = torch.empty((n_outer, n_inner), dtype=torch.int64, device=rows.device)
        value = torch.empty((n_outer, n_inner), dtype=torch.float32, device=rows.device)
    if n_rows == 0:
        return states if state else (token, value)

    sample, c, seed, off_lo, off_hi = _launch_constants(temperature, score, tempered_score, seed, offset)
    if eligible is not None:
        eligible = eligible.contiguous().view(torch.uint8)
    max_block = _MAX_BLOCK_V_SAMPLE if sample else _MAX_BLOCK_V
    splits, chunk, block_v = _plan(n_rows, vocab + lead, max_block, rows.device, num_splits)
    ws_f = ws_i = None
    if splits > 1:
        ws_f = torch.empty((6, n_rows * splits), dtype=torch.float32, device=rows.device)
        ws_i = torch.empty((2, n_rows * splits), dtype=torch.int32, device=rows.device)

    _scan_kernel[(n_rows, splits)](
        rows,
        eligible,
        banned,
        token,
        value,
        states,
        ws_f,
        ws_i,
        n_inner,
        rows.stride(0),
        rows.stride(1),
        vocab,
        chunk,
        0 if banned is None else banned.numel(),
        c,
        temperature,
        seed,
        off_lo,
        off_hi,
        col_base,
        lead,
        SCORE=score,
        SAMPLE=sample,
        SPLIT=splits > 1,
        STATE=state,
        BLOCK_V=block_v,
        num_warps=max(1, min(8, block_v // 256)),
    )
    if splits > 1:
        _merge_kernel[(n_rows,)](
            ws_f,
            ws_i,
            token,
            value,
            states,
            splits,
            splits,
            1,
            n_rows * splits,
            vocab + lead,
            c,
            seed,
            off_lo,
            off_hi,
            col_base,
            SCORE=score,
            SAMPLE=sample,
            STATE=state,
            BLOCK_S=triton.next_power_of_2(splits),
            num_warps=1,
        )
    return states if state else (token, value)


def merge(states, vocab_size, temperature, score, tempered_score, seed, offset):
    """Triton provider of ``dllm::logits_to_confidence_merge`` on contiguous ``states[P, R, 8]``:
    ``(token, score)``, each ``[R]``."""
    parts, n_rows, _ = states.shape
    token = torch.empty(n_rows, dtype=torch.int64, device=states.device)
    value = torch.empty(n_rows, dtype=torch.float32, device=states.device)
    if n_rows == 0:
        return token, value
    sample, c, seed, off_lo, off_hi = _launch_constants(temperature, score, tempered_score, seed, offset)
    _merge_kernel[(n_rows,)](
        states,
        states[..., 6:],
        token,
        value,
        None,
        parts,
        8,
        n_rows * 8,
        1,
        vocab_size,
        c,
        seed,
        off_lo,
        off_hi,
        0,
        SCORE=score,
        SAMPLE=sample,
        STATE=False,
        BLOCK_S=triton.next_power_of_2(parts),
        num_warps=1,
    )
    return token, value
