"""credit_confidence in plain PyTorch: the statement of the math and the test oracle.

CreditDecoding's trace credits as dInfer's CreditThresholdParallelDecoder runs them, with the dense credit
``C[..., V]`` kept as S slots per position (``credit_token`` int64, ``credit_value`` fp32; token -1 = an
empty slot, whose value is 0). Per call:

1. every slot of every row decays: ``value *= beta`` (fp32);
2. an eligible row ``l`` (banned ids read as ``-inf``) gives ``lmax``, its first index ``lidx`` and
   ``pmax = max softmax(l) = 1 / sum exp(l - lmax)``; ``pmax ** gamma`` is added to the slot holding
   ``lidx``, else written into the first empty slot, else into the slot of smallest value (the lowest
   slot on ties), whose token is evicted with its credit;
3. the fused row is ``f = l + alpha * log(C + 1)`` with ``C`` the dense credit the slots describe (0 off
   the slots); ``token = argmax f`` (lowest id on ties), ``score = softmax(f)[token]``.

A row holding NaN or ``+inf`` gives ``(-1, NaN)`` and a row with no finite logit left ``(-1, -inf)``; an
ineligible row is not read and gives ``(-1, -inf)``. None of them gets credit; every row decays. Slot
tokens outside ``[0, V)`` (which this op never writes) take no part in the fused row.
"""

import torch


def credit_confidence(
    logits: torch.Tensor,
    eligible: torch.Tensor,
    credit_token: torch.Tensor,
    credit_value: torch.Tensor,
    alpha: float = 0.7,
    beta: float = 0.8,
    gamma: float = 0.2,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    vocab, slots = logits.shape[-1], credit_token.shape[-1]
    shape = logits.shape[:-1]
    credit_value.mul_(beta)  # every slot, eligible or not (fp32, as the kernels)

    # The eligible rows, fp64, banned ids at -inf.
    rows = eligible.reshape(-1).nonzero()[:, 0]
    x = logits.reshape(-1, vocab)[rows].double()
    if banned is not None:
        x[:, banned[(banned >= 0) & (banned < vocab)]] = -torch.inf
    undefined = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1)
    empty = (x == -torch.inf).all(-1)
    credited = ~undefined & ~empty
    lidx = torch.argmax(torch.where(torch.isnan(x), -torch.inf, x), -1)  # first index of the maximum
    pmax = torch.softmax(x, -1).gather(-1, lidx[:, None])[:, 0]

    # The slot update of every credited row. The state is indexed in place through its leading dims (any
    # strides; a leading 1 covers logits of shape [V]).
    at = torch.unravel_index(rows, (1, *shape))
    tokens, values = credit_token.unsqueeze(0), credit_value.unsqueeze(0)
    tok, val = tokens[at], values[at]
    positions = torch.arange(slots, device=logits.device)

    def first(mask):  # the first slot where mask holds, or `slots`
        return torch.where(mask, positions, slots).amin(-1)

    holding, free = first(tok == lidx[:, None]), first(tok == -1)
    smallest = first(val == val.amin(-1, keepdim=True))
    slot = torch.where(holding < slots, holding, torch.where(free < slots, free, smallest))
    credit = pmax**gamma
    old = val.gather(-1, slot[:, None])[:, 0].double()
    new = torch.where(holding < slots, old + credit, credit).float()
    mine = (positions == slot[:, None]) & credited[:, None]
    tok = torch.where(mine, lidx[:, None], tok)
    val = torch.where(mine, new[:, None], val)
    tokens[at], values[at] = tok, val

    # The dense credit the slots describe, the fused logits and their softmax.
    dense = torch.zeros_like(x)
    valid = (tok >= 0) & (tok < vocab)
    dense.scatter_add_(-1, torch.where(valid, tok, 0), torch.where(valid, val.double(), 0.0))
    fused = x + alpha * torch.log(dense + 1)
    token = torch.argmax(torch.where(torch.isnan(fused), -torch.inf, fused), -1)
    score = torch.softmax(fused, -1).gather(-1, token[:, None])[:, 0]

    token = torch.where(credited, token, -1)
    score = torch.where(empty, -torch.inf, score)
    score = torch.where(undefined, torch.nan, score)
    token_out = torch.full((shape.numel(),), -1, dtype=torch.int64, device=logits.device)
    score_out = torch.full((shape.numel(),), -torch.inf, dtype=torch.float32, device=logits.device)
    token_out[rows] = token
    score_out[rows] = score.float()
    return token_out.reshape(shape), score_out.reshape(shape)
