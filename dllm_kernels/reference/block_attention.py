"""block_attention in plain PyTorch (fp32 accumulation): the statement of the visibility rule and the oracle.

Query ``i`` of row ``b`` sits at absolute position ``p = q_start[b] + i``. Key ``j`` is visible to it iff
``j < kv_len[b]`` and (``block_size == 0`` or ``j // block_size <= p // block_size``). Query head ``h``
reads KV head ``h // (Hq / Hkv)``. When ``k_new`` / ``v_new`` are given they are first written into the
caches at positions ``q_start[b] .. q_start[b] + Sq - 1`` (only the active block is recomputed), then
attention runs over the caches. A query that sees no key gets ``out = 0`` and ``lse = -inf``. Keys a query
cannot see never affect it, whatever they hold (NaN, inf); a NaN in a query that sees a key makes its
``out`` and ``lse`` NaN.
"""

import math

import torch

# Queries per chunk are chosen so that one chunk's [B, Hq, chunk, S] scores stay near this many floats:
# the reference never builds a dense [B, H, L, L] tensor for long inputs.
_SCORES_PER_CHUNK = 2**24


def write_kv(k_cache, v_cache, k_new, v_new, q_start):
    """k_cache[b, q_start[b] + i] = k_new[b, i] (and v), for every row b and new position i."""
    rows = torch.arange(k_cache.shape[0], device=k_cache.device)[:, None]
    positions = q_start.long()[:, None] + torch.arange(k_new.shape[1], device=k_cache.device)
    k_cache[rows, positions] = k_new
    v_cache[rows, positions] = v_new


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    kv_len: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    block_size: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_queries, n_heads, head_dim = q.shape
    s_max, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if k_new is not None:
        write_kv(k_cache, v_cache, k_new, v_new, q_start)

    keys = k_cache.float().transpose(1, 2)  # [B, Hkv, S, D]
    key_pos = torch.arange(s_max, device=q.device)
    # Keys past kv_len are visible to no query of their row: their values are zeroed so that a stale NaN
    # there never meets a zero probability (0 * NaN is NaN).
    valid = key_pos[None, :] < kv_len.long()[:, None]  # [B, S]
    values = torch.where(valid[:, None, :, None], v_cache.float().transpose(1, 2), 0.0)
    out = torch.empty_like(q)
    lse = torch.empty(n_rows, n_heads, n_queries, dtype=torch.float32, device=q.device)
    chunk = max(1, _SCORES_PER_CHUNK // max(1, n_rows * n_heads * s_max))
    for start in range(0, n_queries, chunk):
        end = min(start + chunk, n_queries)
        # [B, Hkv, G, c, D]: each query head next to the KV head it reads
        queries = (
            q[:, start:end]
            .float()
            .view(n_rows, end - start, n_kv_heads, group, head_dim)
            .permute(0, 2, 3, 1, 4)
        )
        scores = torch.einsum("bkgqd,bksd->bkgqs", queries, keys) * scale
        query_pos = q_start.long()[:, None] + torch.arange(start, end, device=q.device)  # [B, c]
        visible = valid[:, None, :].expand(n_rows, end - start, s_max)  # [B, c, S]
        if block_size > 0:
            visible = visible & (key_pos[None, None, :] // block_size <= query_pos[:, :, None] // block_size)
        scores = scores.masked_fill(~visible[:, None, None], -torch.inf)
        chunk_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible, NaN from a NaN score
        seen = chunk_lse[..., None] != -torch.inf
        probs = torch.where(seen, torch.exp(scores - chunk_lse[..., None]), 0.0)
        if block_size == 0:
            chunk_out = torch.einsum("bkgqs,bksd->bkgqd", probs, values)
        else:
            # A key block adds to the queries that see it only, so that keys of a later block (which
            # the row may hold as NaN) never meet a zero probability either.
            chunk_out = torch.zeros(*probs.shape[:-1], head_dim, device=q.device)
            for first in range(0, s_max, block_size):
                keys_in = slice(first, min(first + block_size, s_max))
                part = torch.einsum("bkgqs,bksd->bkgqd", probs[..., keys_in], values[:, :, keys_in])
                sees = query_pos // block_size >= first // block_size  # [B, c]
                chunk_out += torch.where(sees[:, None, None, :, None], part, 0.0)
        out[:, start:end] = (
            chunk_out.permute(0, 3, 1, 2, 4).reshape(n_rows, end - start, n_heads, head_dim).to(q.dtype)
        )
        lse[:, :, start:end] = chunk_lse.reshape(n_rows, n_heads, end - start)
    if not return_lse:
        lse = lse.new_empty(0)
    return out, lse
