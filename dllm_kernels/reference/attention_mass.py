"""attention_mass in plain PyTorch (fp64 arithmetic, fp32 result): the statement of the statistic and the
oracle.

Query ``i`` of row ``b`` sits at position ``p = q_start[b] + i`` and sees key ``j`` iff ``j < kv_len[b]`` and
(``block_size == 0`` or ``j // block_size <= p // block_size``), exactly as in block_attention; query head
``h`` reads KV head ``h // (Hq / Hkv)``. With ``lse`` the log-sum-exp block_attention returned for the same
call, ``exp(q[b, i, h] . k[b, j, h // G] * scale - lse[b, h, i])`` is the probability query ``i`` gives key
``j`` in head ``h``, and

    mass[b, j] = sum over heads h and counted queries i (query_mask) that see key j of that probability,

0 for keys past kv_len, keys no counted query sees and excluded keys (``key_mask`` True: a still-masked
token). A query whose lse is -inf (it sees nothing) adds 0. Keys no counted query sees, and queries that are
not counted, never affect a mass whatever they hold (NaN, inf); a NaN in a counted query or in a key it sees
makes the masses it touches NaN (an excluded key's mass stays 0).

``top[b]`` is the first index of the largest mass of row ``b`` as ``torch.argmax`` orders them (a NaN counts
as larger than any number, ties go to the lowest index), or -1 where the row has no positive or NaN mass.
"""

import math

import torch

# Queries per chunk are chosen so that one chunk's [B, Hq, chunk, S] scores stay near this many doubles:
# nothing [B, H, L, L] is built for long inputs.
_SCORES_PER_CHUNK = 2**23


def top_of(mass: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest mass (NaN largest), -1 where none is positive (or NaN)."""
    if mass.shape[1] == 0:
        return torch.full((mass.shape[0],), -1, dtype=torch.int64, device=mass.device)
    top = mass.argmax(1)
    best = mass.gather(1, top[:, None])[:, 0]
    return torch.where((best > 0) | best.isnan(), top, -1)


def attention_mass(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    lse: torch.Tensor,
    q_start: torch.Tensor,
    kv_len: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    block_size: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_queries, n_heads, head_dim = q.shape
    s_max, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    device = q.device

    key_pos = torch.arange(s_max, device=device)
    valid = key_pos[None, :] < kv_len.long()[:, None]  # [B, S]
    # fp64: torch's fp32 CPU matmul was seen 2e-5 off in some processes, too far for an oracle
    keys = k_cache.double().transpose(1, 2)  # [B, Hkv, S, D]
    counted = torch.ones(n_rows, n_queries, dtype=torch.bool, device=device)
    if query_mask is not None:
        counted = query_mask
    mass = torch.zeros(n_rows, s_max, dtype=torch.float64, device=device)
    chunk = max(1, _SCORES_PER_CHUNK // max(1, n_rows * n_heads * s_max))
    for start in range(0, n_queries, chunk):
        end = min(start + chunk, n_queries)
        # [B, Hkv, G, c, D]: each query head next to the KV head it reads. A NaN score (a NaN query or key)
        # stays in its own (query, key) entry, which the torch.where below drops unless it counts.
        queries = q[:, start:end].double().reshape(n_rows, end - start, n_kv_heads, group, head_dim)
        queries = queries.permute(0, 2, 3, 1, 4)
        scores = torch.einsum("bkgqd,bksd->bkgqs", queries, keys) * scale
        chunk_lse = lse[:, :, start:end].double().reshape(n_rows, n_kv_heads, group, end - start, 1)
        query_pos = q_start.long()[:, None] + torch.arange(start, end, device=device)  # [B, c]
        visible = valid[:, None, :] & counted[:, start:end, None]  # [B, c, S]
        if block_size > 0:
            visible = visible & (key_pos[None, None, :] // block_size <= query_pos[:, :, None] // block_size)
        take = visible[:, None, None] & (chunk_lse != -torch.inf)
        probs = torch.where(take, torch.exp(scores - chunk_lse), 0.0)
        mass += probs.sum(dim=(1, 2, 3))
    mass = mass.float()
    if key_mask is not None:
        mass = torch.where(key_mask, 0.0, mass)
    return mass, top_of(mass)
