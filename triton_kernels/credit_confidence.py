"""credit_confidence in Triton (docs/ops.md); the math mirrors csrc/common/credit_confidence.h.

The vocabulary pass is logits_to_confidence's scan: its row states (lmax, the first index lidx of the
maximum, z = sum exp(l - lmax)) at vocab_start 0. ``_credit_kernel`` then runs one program per row with one
lane per credit slot: the decay, the slot that takes lidx's credit, and the fused argmax and its fused
softmax probability from the S gathered logits, without a second pass over V.
"""

import torch
import triton
import triton.language as tl

from .logits_to_confidence import _expm1
from .logits_to_confidence import logits_to_confidence as scan


@triton.jit
def _credit_kernel(
    x_ptr,
    state_ptr,
    banned_ptr,
    tok_ptr,
    val_ptr,
    token_ptr,
    score_ptr,
    n_inner,
    stride_o,
    stride_i,
    V,
    n_banned,
    S,
    tok_stride,
    val_stride,
    alpha,
    beta,
    gamma,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < S
    tok_at = tok_ptr + row.to(tl.int64) * tok_stride + s
    val_at = val_ptr + row.to(tl.int64) * val_stride + s
    tok = tl.load(tok_at, mask=ok, other=-1)
    val = tl.load(val_at, mask=ok, other=0.0) * beta  # every slot decays; an empty one stays (-1, 0)

    state = state_ptr + row.to(tl.int64) * 8
    lmax = tl.load(state).to(tl.float32)  # NaN once a NaN was read
    z = tl.load(state + 2).to(tl.float32)
    lidx = tl.load(state + 6).to(tl.int64)  # -1: ineligible, or nothing finite left
    defined = (lmax == lmax) & (lmax != float("inf"))
    credited = (lidx >= 0) & defined

    # The slot holding lidx, else the first empty one, else the smallest value (lowest slot on ties).
    holding = tl.min(tl.where(ok & (tok == lidx), s, BLOCK_S), 0)
    free = tl.min(tl.where(ok & (tok == -1), s, BLOCK_S), 0)
    smallest = tl.min(tl.where(ok, val, float("inf")), 0)
    lowest = tl.min(tl.where(ok & (val == smallest), s, BLOCK_S), 0)
    slot = tl.where(holding < BLOCK_S, holding, tl.where(free < BLOCK_S, free, lowest))
    credit = tl.exp2(gamma * tl.log2(1.0 / tl.where(credited, z, 1.0)))  # pmax ** gamma, pmax = 1 / z
    live = tl.where(credited, ok, False)  # ok & credited: the interpreter makes a scalar & a block int32
    mine = (s == slot) & live
    val = tl.where(mine, tl.where(tok == lidx, val + credit, credit), val)
    tok = tl.where(mine, lidx, tok)
    tl.store(tok_at, tok, mask=ok)
    tl.store(val_at, val, mask=ok)

    # Fused logits f = l + alpha * log(C + 1) at the slot tokens: the only ones above their raw logits.
    valid = live & (tok >= 0) & (tok < V)
    row_ptr = x_ptr + (row // n_inner).to(tl.int64) * stride_o + (row % n_inner).to(tl.int64) * stride_i
    logit = tl.load(row_ptr + tl.where(valid, tok, 0), mask=valid, other=float("-inf")).to(tl.float32)
    if banned_ptr is not None:
        for k in range(n_banned):
            logit = tl.where(tok == tl.load(banned_ptr + k), float("-inf"), logit)
    boost = alpha * tl.log(val + 1.0)
    f = tl.where(valid, logit + boost, float("-inf"))
    f_best = tl.max(f, 0)
    best = tl.min(tl.where(valid & (f == f_best), tok, V), 0)
    # sum_v exp(f_v - f_best): z rescaled, plus each slot's exp(f - f_best) * (1 - exp(-boost)).
    extra = tl.where(valid, tl.exp(f - f_best) * -_expm1(-boost), 0.0)
    denom = tl.exp(lmax - f_best) * z + tl.sum(extra, 0)
    score = tl.minimum(1.0 / denom, 1.0)
    tl.store(token_ptr + row, tl.where(credited, best, -1).to(tl.int64))
    tl.store(score_ptr + row, tl.where(defined, tl.where(credited, score, float("-inf")), float("nan")))


def _slot_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A slot tensor [..., S] as a [rows, S] view, or None where its leading dims do not merge."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def credit_confidence(rows, eligible, credit_token, credit_value, alpha, beta, gamma, banned):
    """Triton provider of ``dllm::credit_confidence`` on an ``[O, I, V]`` rows view of the logits (any strides
    on O and I, unit stride on V) with eligible ``[O, I]``: ``(token, score)``, each ``[O, I]``; the slots
    are updated in place (through a contiguous copy where their leading dims do not merge)."""
    n_outer, n_inner, vocab = rows.shape
    n_rows = n_outer * n_inner
    token = torch.empty((n_outer, n_inner), dtype=torch.int64, device=rows.device)
    score = torch.empty((n_outer, n_inner), dtype=torch.float32, device=rows.device)
    if n_rows == 0:
        return token, score
    states = scan(rows, eligible, banned, 0.0, "prob", False, 0, 0, vocab_start=0)
    slots = credit_token.shape[-1]
    tok, val = _slot_rows(credit_token), _slot_rows(credit_value)
    tok_rows = credit_token.reshape(-1, slots) if tok is None else tok
    val_rows = credit_value.reshape(-1, slots) if val is None else val
    _credit_kernel[(n_rows,)](
        rows,
        states,
        banned,
        tok_rows,
        val_rows,
        token,
        score,
        n_inner,
        rows.stride(0),
        rows.stride(1),
        vocab,
        0 if banned is None else banned.numel(),
        slots,
        tok_rows.stride(0),
        val_rows.stride(0),
        alpha,
        beta,
        gamma,
        BLOCK_S=triton.next_power_of_2(slots),
        num_warps=1,
    )
    if tok is None:
        credit_token.copy_(tok_rows.view(credit_token.shape))
    if val is None:
        credit_value.copy_(val_rows.view(credit_value.shape))
    return token, score
