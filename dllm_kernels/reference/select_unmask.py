"""select_unmask in plain PyTorch: the statement of the selection rules and the test oracle.

Per row, the *selectable* positions are the eligible ones whose score is neither ``-inf`` nor NaN. They
are ordered by a stable descending sort on ``(score, -position)``: higher score first, equal scores
lower position first. Every policy but the two set rules below picks a count ``n`` and selects the first
``n`` of that order:

- ``topk``: ``n = min(k[b], S)`` (``S`` = selectable count; ``k < 0`` counts as 0)
- ``threshold``: ``n`` = how many have ``score > threshold`` (``>=`` when ``inclusive``); they are a
  prefix of the order
- ``factor``: the longest prefix with ``c_i >= 1 - factor / (i + 1)`` at every 1-based rank ``i``;
  rank 1 always passes
- ``factor_upstream``: ``factor``, except that a row whose first failing rank is its last (``n = S - 1``)
  selects all ``S``: what Fast-dLLM's released loop does
- ``topk_or_threshold``: the threshold's ``n`` if it reaches ``k[b]``, else ``min(k[b], S)``
- ``all``: ``n = S``
- ``near_best``: ``n`` = how many pass ``min(threshold, best - margin)``, ``best`` the largest selectable
  score (dInfer's threshold decoder)

then ``n = max(n, min(min_per_row, S))``. The set rules select the selectable positions that pass a rule,
united with the first ``min(min_per_row, S)`` of the order (``passes(t)``: ``score > t``, ``>=`` when
``inclusive``):

- ``local_leap``: ``passes(threshold)``, or ``passes(low_threshold)`` within ``radius`` positions (along
  L, whatever lies between) of an *anchor*, a selectable position that passes ``threshold`` (LocalLeap)
- ``hierarchy``: ``passes(threshold)``, or ``passes(low_threshold)`` and equal to the largest selectable
  score of its *run*, a maximal stretch of consecutive eligible positions; tied maxima all qualify
  (dInfer's HierarchyDecoder)

Comparisons widen the fp32 score to fp64 and compare with the bound computed in fp64 from the arguments
as passed.
"""

import torch


def select_unmask(
    score: torch.Tensor,
    eligible: torch.Tensor,
    policy: str = "topk",
    k: torch.Tensor | None = None,
    threshold: float = 0.9,
    inclusive: bool = False,
    factor: float = 1.0,
    min_per_row: int = 1,
    low_threshold: float = 0.0,
    radius: int = 0,
    margin: float = 0.0,
    token: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, length = score.shape
    device = score.device
    s = score.double()
    selectable = eligible & ~torch.isnan(s) & (s != -torch.inf)

    # Stable descending order: unselectable positions last, then by score, ties by position.
    key = torch.where(selectable, s, -torch.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranked = key.gather(-1, order)  # c_1 >= c_2 >= ... per row
    n_selectable = selectable.sum(-1)
    rank = torch.arange(1, length + 1, device=device).expand(n_rows, length)
    in_range = rank <= n_selectable[:, None]

    def passes(values, bound):
        return values >= bound if inclusive else values > bound

    n_pass = (passes(ranked, threshold) & in_range).sum(-1)
    k_row = torch.zeros(n_rows, dtype=torch.int64, device=device) if k is None else k.long().clamp_min(0)
    top_k = torch.minimum(k_row, n_selectable)
    if policy == "topk":
        n = top_k
    elif policy == "threshold":
        n = n_pass
    elif policy in ("factor", "factor_upstream"):
        ok = (ranked >= 1.0 - factor / (rank.double() + 1.0)) | (rank == 1)  # bound in fp64
        n = (torch.cumprod((ok & in_range).long(), -1)).sum(-1)
        if policy == "factor_upstream":
            n = torch.where(n == n_selectable - 1, n_selectable, n)
    elif policy == "topk_or_threshold":
        n = torch.where(n_pass >= k_row, n_pass, top_k)
    elif policy == "all":
        n = n_selectable
    elif policy == "near_best":
        best = ranked[:, :1]  # -inf in a row with nothing selectable, which then selects nothing
        bound = torch.clamp(best - margin, max=threshold)
        n = (passes(ranked, bound) & in_range).sum(-1)
    elif policy in ("local_leap", "hierarchy"):
        n = torch.zeros_like(n_selectable)  # the floor's prefix; the rule joins it below
    else:
        raise ValueError(f"dllm::select_unmask: unknown policy {policy!r}")
    n = torch.maximum(n, torch.clamp(n_selectable, max=min_per_row))

    selected = torch.zeros(n_rows, length, dtype=torch.bool, device=device)
    selected.scatter_(-1, order, rank <= n[:, None])
    if policy in ("local_leap", "hierarchy"):
        high = passes(s, threshold)
        near = _dilate(selectable & high, radius) if policy == "local_leap" else _is_run_max(key, eligible)
        selected |= selectable & (high | (near & passes(s, low_threshold)))
        n = selected.sum(-1)
    if x is not None:
        x.copy_(torch.where(selected, token, x))
    return selected, n.to(torch.int32)


def _dilate(anchor: torch.Tensor, radius: int) -> torch.Tensor:
    """Positions within ``radius`` of a True of ``anchor`` [B, L] along L."""
    radius = min(radius, anchor.shape[1])  # a wider window sees nothing more
    pooled = torch.nn.functional.max_pool1d(anchor[:, None].float(), 2 * radius + 1, 1, radius)
    return pooled[:, 0] > 0


def _is_run_max(key: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """key [B, L] (fp64, -inf where unselectable) equals the largest key of its run of eligible positions."""
    n_rows, length = key.shape
    previous = torch.nn.functional.pad(eligible[:, :-1], (1, 0), value=False)
    run = torch.cumsum(eligible & ~previous, -1) - 1  # the run's index in its row; -1 before the first
    run = torch.where(eligible, run, length)  # ineligible positions share a spare slot
    run_max = torch.full((n_rows, length + 1), -torch.inf, dtype=key.dtype, device=key.device)
    run_max.scatter_reduce_(-1, run, key, "amax")
    return key == run_max.gather(-1, run)
