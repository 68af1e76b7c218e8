"""logits_to_confidence in plain PyTorch and float64: the statement of the math and the test oracle.

For every eligible row ``l`` (a ``[V]`` slice of ``logits``):

1. banned ids get logit ``-inf`` (ids outside ``[0, V)`` are ignored);
2. ``token = argmax(l)`` when ``temperature == 0`` (lowest index on ties), else the Gumbel-max
   sample ``argmax(l / T + g)`` with ``g = -log(-log u)``, ``u`` from ``counter_rng`` keyed by
   ``(seed, offset, row, v)``;
3. ``p = softmax(l)``, or ``softmax(l / T)`` when ``tempered_score`` and ``T > 0``;
4. ``score`` is ``p[token]`` ("prob"), ``p_top1 - p_top2`` ("margin"), ``sum p log p``
   ("neg_entropy"), ``l_top1 - l_top2`` of the raw logits ("logit_margin"; ``+inf`` when only one
   token is left) or ``u(seed, offset, row, V)`` ("random").

A row holding NaN or ``+inf`` (where the softmax is undefined) gives ``(-1, NaN)``; a row with no
finite logit left gives ``(-1, -inf)``; an ineligible row is not read and gives ``(-1, -inf)``.
"""

import torch

from .counter_rng import gumbel, uniform


def logits_to_confidence(
    logits: torch.Tensor,
    eligible: torch.Tensor | None = None,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    banned: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    n_rows = flat.shape[0]
    row_ids = torch.arange(n_rows, device=logits.device)
    if eligible is not None:
        row_ids = row_ids[eligible.reshape(-1)]

    x = flat[row_ids].double()
    if banned is not None:
        x[:, banned[(banned >= 0) & (banned < vocab)]] = -torch.inf

    if temperature > 0:
        cols = torch.arange(vocab, device=logits.device)
        token = torch.argmax(x / temperature + gumbel(seed, offset, row_ids[:, None], cols), dim=-1)
    else:
        token = torch.argmax(x, dim=-1)

    dist = x / temperature if (tempered_score and temperature > 0) else x
    p = torch.softmax(dist, dim=-1)
    pad = torch.full_like(x[:, :1], -torch.inf)
    if score == "prob":
        value = p.gather(-1, token[:, None])[:, 0]
    elif score == "margin":
        top = torch.cat([p, torch.zeros_like(pad)], -1).topk(2, dim=-1).values
        value = top[:, 0] - top[:, 1]
    elif score == "neg_entropy":
        value = torch.special.xlogy(p, p).sum(-1)
    elif score == "logit_margin":
        top = torch.cat([x, pad], -1).topk(2, dim=-1).values
        value = top[:, 0] - top[:, 1]
    elif score == "random":
        value = uniform(seed, offset, row_ids, torch.tensor(vocab, device=logits.device))
    else:
        raise ValueError(f"dllm::logits_to_confidence: unknown score {score!r}")

    undefined = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    empty = (x == -torch.inf).all(-1)
    value = torch.where(empty, -torch.inf, value)
    value = torch.where(undefined, torch.nan, value)
    token = torch.where(undefined | empty, -1, token)

    token_out = torch.full((n_rows,), -1, dtype=torch.int64, device=logits.device)
    score_out = torch.full((n_rows,), -torch.inf, dtype=torch.float32, device=logits.device)
    token_out[row_ids] = token
    score_out[row_ids] = value.float()
    return token_out.reshape(logits.shape[:-1]), score_out.reshape(logits.shape[:-1])


# Tensor-parallel halves: a vocabulary shard's per-row state, and the merge of every shard's states.
# The state of a row holds what the finalization above needs, over the shard's columns only (global ids):
# [lmax, l2, z, s1, kmax, kl, lidx, kidx] with lmax / l2 the two largest logits (repeats count; lmax NaN
# if a NaN was read), lidx the first global id of lmax, z = sum 2^t and s1 = sum 2^t * t for
# t = (l - lmax) * c (c = log2(e), divided by T when tempered), and for sampling the largest key
# kmax = l + T * g with its first global id kidx and its logit kl. Missing indices are -1.
STATE_FIELDS = 8
_LOG2E = 1.4426950408889634


def _scale(temperature: float, score: str, tempered_score: bool) -> float:
    """c: log2(e) times the softmax's scale (logit_margin always reads raw logits)."""
    tempered = temperature > 0 and tempered_score and score != "logit_margin"
    return _LOG2E / temperature if tempered else _LOG2E


def _first_index(values: torch.Tensor, best: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The smallest index (>= 0) along dim where values == best; -1 where none."""
    big = torch.iinfo(torch.int64).max
    hit = (values == best.unsqueeze(dim)) & (index >= 0)
    first = torch.where(hit, index, big).amin(dim)
    return torch.where(first == big, -1, first)


def logits_to_confidence_partial(
    logits: torch.Tensor,
    eligible: torch.Tensor | None = None,
    vocab_start: int = 0,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    banned: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """The state ``[..., 8]`` (float64) of every row of the shard ``logits[..., W]`` holding global ids
    ``[vocab_start, vocab_start + W)``; an ineligible row is not read and has the empty state."""
    width = logits.shape[-1]
    flat = logits.reshape(-1, width)
    row_ids = torch.arange(flat.shape[0], device=logits.device)
    if eligible is not None:
        row_ids = row_ids[eligible.reshape(-1)]
    x = flat[row_ids].double()
    if banned is not None:
        local = banned - vocab_start
        x[:, local[(local >= 0) & (local < width)]] = -torch.inf
    cols = vocab_start + torch.arange(width, device=logits.device).expand_as(x)

    nan = torch.isnan(x).any(-1)
    x = torch.where(torch.isnan(x), -torch.inf, x)  # flagged, then out of every comparison
    top = torch.cat([x, torch.full_like(x[:, :2], -torch.inf)], -1).topk(2, dim=-1).values
    lmax, l2 = top[:, 0], top[:, 1]
    lidx = _first_index(x, lmax, torch.where(x > -torch.inf, cols, -1), -1)
    t = (x - lmax[:, None]) * _scale(temperature, score, tempered_score)
    e = torch.where(lmax[:, None] > -torch.inf, torch.exp2(t), 0.0)
    z = e.sum(-1)
    s1 = torch.where(e > 0, e * t, 0.0).sum(-1)
    if temperature > 0:
        key = x + temperature * gumbel(seed, offset, row_ids[:, None], cols)
        kmax = key.max(-1).values
        kidx = _first_index(key, kmax, torch.where(key > -torch.inf, cols, -1), -1)
        kl = torch.where(
            kidx >= 0, x.gather(-1, (kidx - vocab_start).clamp(min=0)[:, None])[:, 0], -torch.inf
        )
    else:
        kmax = kl = torch.full_like(lmax, -torch.inf)
        kidx = torch.full_like(lidx, -1)
    lmax = torch.where(nan, torch.nan, lmax)
    fields = torch.stack([lmax, l2, z, s1, kmax, kl, lidx.double(), kidx.double()], -1)

    empty = torch.tensor([-torch.inf, -torch.inf, 0, 0, -torch.inf, -torch.inf, -1, -1], dtype=torch.float64)
    state = empty.to(logits.device).repeat(flat.shape[0], 1)
    state[row_ids] = fields
    return state.reshape(*logits.shape[:-1], STATE_FIELDS)


def logits_to_confidence_merge(
    states: torch.Tensor,
    vocab_size: int,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, score)`` of the rows whose shard states are ``states[P, ..., 8]`` (P shards in any order,
    together covering ``[0, vocab_size)``): ``logits_to_confidence`` of the whole rows."""
    shape = states.shape[1:-1]
    lmax_p, l2_p, z_p, s1_p, kmax_p, kl_p, lidx_p, kidx_p = states.reshape(states.shape[0], -1, 8).unbind(-1)
    lidx_p, kidx_p = lidx_p.long(), kidx_p.long()
    nan = torch.isnan(lmax_p).any(0)
    lmax_p = torch.where(torch.isnan(lmax_p), -torch.inf, lmax_p)

    lmax = lmax_p.max(0).values
    lidx = _first_index(lmax_p, lmax, lidx_p, 0)
    l2 = torch.cat([lmax_p, l2_p], 0).topk(2, dim=0).values[1]  # runner-up of every shard's top two
    c = _scale(temperature, score, tempered_score)
    d = (lmax_p - lmax) * c
    w = torch.where(z_p > 0, torch.exp2(d), 0.0)
    z = (w * z_p).sum(0)
    s1 = torch.where(z_p > 0, w * (s1_p + d * z_p), 0.0).sum(0)
    kmax = kmax_p.max(0).values
    kidx = _first_index(kmax_p, kmax, kidx_p, 0)
    kl = torch.where((kmax_p == kmax) & (kidx_p == kidx), kl_p, -torch.inf).max(0).values

    sampled = (kidx >= 0) if temperature > 0 else torch.zeros_like(nan)
    token = torch.where(sampled, kidx, lidx)
    if score == "prob":
        value = torch.where(sampled, torch.exp2((kl - lmax) * c), 1.0) / z
    elif score == "margin":
        value = -torch.expm1((l2 - lmax) * c / _LOG2E) / z
    elif score == "neg_entropy":
        value = s1 / (z * _LOG2E) - torch.log(z)
    elif score == "logit_margin":
        value = lmax - l2
    else:
        rows = torch.arange(lmax.numel(), device=states.device)
        value = uniform(seed, offset, rows, torch.tensor(vocab_size, device=states.device))
    undefined = nan | (lmax == torch.inf)
    empty = lidx < 0
    value = torch.where(empty, -torch.inf, value)
    value = torch.where(undefined, torch.nan, value)
    token = torch.where(undefined | empty, -1, token)
    return token.reshape(shape), value.float().reshape(shape)
