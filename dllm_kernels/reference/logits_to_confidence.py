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
