"""2:4 semi-structured sparsity in plain PyTorch: the format, the products, and the test oracle.

A weight ``[N, K]`` keeps 2 of every 4 consecutive elements along ``K``. ``values`` ``[N, K/2]`` holds the
kept elements in order; ``meta`` int16 ``[N, K/16]`` holds, for group ``g`` of 4, the 4-bit code
``i0 | (i1 << 2)`` (``i0 < i1`` its kept positions) at bits ``4 * (g % 4)`` of ``meta[:, g // 4]``: the
encoding PyTorch's semi-structured conversion produces before its CUTLASS-specific reordering.
"""

import torch


def prune_24(weight: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep, in every group of 4 along K, the 2 with the largest ``|weight|`` (or ``score``); ties keep the
    lower index (NaN counts as largest). Returns a bool mask with exactly 2 of every 4 set."""
    n, k = weight.shape
    key = (weight.abs() if score is None else score).reshape(n, k // 4, 4)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=weight.device)
    mask.scatter_(-1, order[..., :2], True)
    return mask.reshape(n, k)


def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[N, K/4, 2]`` int64: the kept positions ``i0 < i1`` of each group of a 2-of-4 mask."""
    n, k = mask.shape
    groups = mask.reshape(n, k // 4, 4)
    # Sorting the group's "not kept" flags puts the two kept positions first, in order.
    return torch.sort(~groups, dim=-1, stable=True).indices[..., :2]


def compress_24(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of ``weight`` under a 2-of-4 ``mask`` (checked by the op)."""
    n, k = weight.shape
    positions = kept_positions(mask)
    values = weight.reshape(n, k // 4, 4).gather(-1, positions).reshape(n, k // 2)
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).reshape(n, k // 16, 4)
    shifts = torch.arange(0, 16, 4, device=weight.device)
    meta = (nibbles << shifts).sum(-1)  # [N, K/16], 16 bits each
    return values, (meta - ((meta >> 15) << 16)).to(torch.int16)  # as a signed 16-bit pattern


def nibbles(meta: torch.Tensor) -> torch.Tensor:
    """``[N, K/4]`` int64 4-bit codes of an int16 meta."""
    bits = meta.to(torch.int64) & 0xFFFF
    return ((bits[..., None] >> torch.arange(0, 16, 4, device=meta.device)) & 0xF).flatten(-2)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense ``[N, K]`` weight: kept elements in place, zeros elsewhere."""
    n, half = values.shape
    codes = nibbles(meta)
    positions = torch.stack([codes & 3, codes >> 2], -1)  # [N, K/4, 2]
    dense = torch.zeros(n, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(n, half // 2, 2))
    return dense.reshape(n, 2 * half)


def kept_mask(meta: torch.Tensor) -> torch.Tensor:
    """bool ``[N, K]``: the positions the 2:4 weight keeps."""
    codes = nibbles(meta)
    p = torch.arange(4, device=meta.device)
    kept = (p == (codes & 3)[..., None]) | (p == (codes >> 2)[..., None])
    return kept.flatten(-2)


def sparse_product(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in fp32 over the kept elements only: a pruned position is absent, not a zero, so a NaN
    or inf of x there never reaches the output (as on sparse tensor cores); at kept positions x meets the
    weight in IEEE arithmetic. The weight itself is taken to be finite.

    Computed as the dense product with x's non-finite entries set to 0, plus their effect on the outputs
    whose weight row keeps them, classified with 0 / 1 products: NaN meets any kept weight, or +-inf meets
    a kept zero -> NaN; +inf and -inf contributions together -> NaN; otherwise +inf or -inf."""
    weight = decompress_24(values, meta).float()
    x = x.float()
    finite = torch.isfinite(x)
    out = torch.where(finite, x, 0.0) @ weight.T
    kept = kept_mask(meta)

    def meets(x_class, w_class):
        return (x_class.float() @ w_class.float().T) > 0

    positive, negative, zero = kept & (weight > 0), kept & (weight < 0), kept & (weight == 0)
    up, down = torch.isposinf(x), torch.isneginf(x)
    to_nan = meets(torch.isnan(x), kept) | meets(up | down, zero)
    to_pos = meets(up, positive) | meets(down, negative)
    to_neg = meets(up, negative) | meets(down, positive)
    out = torch.where(to_pos, torch.inf, out)
    out = torch.where(to_neg, -torch.inf, out)
    return torch.where(to_nan | (to_pos & to_neg), torch.nan, out)


def sparse24_mm(x, values, meta, bias=None):
    """``x @ decompress_24(values, meta).T + bias`` with fp32 accumulation, in x's dtype, over the kept
    elements only (``sparse_product``)."""
    out = sparse_product(x, values, meta)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def block_diagonal_apply(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks) @ x`` along x's last dim, blocks ``[n / bs, bs, bs]`` (fp32)."""
    n_blocks, bs, _ = blocks.shape
    return torch.einsum("gij,...gj->...gi", blocks.float(), x.float().unflatten(-1, (n_blocks, bs))).flatten(
        -2
    )


def armor_linear(x, wrap_in, values, meta, wrap_out, bias=None):
    """ARMOR's ``W ~ A . S . B`` per row of x: ``blockdiag(wrap_out) . S . blockdiag(wrap_in) . x + bias``, in
    fp32 throughout (``S`` over its kept elements, ``sparse_product``)."""
    inner = block_diagonal_apply(wrap_in, x)
    sparse = sparse_product(inner, values, meta)
    out = block_diagonal_apply(wrap_out, sparse)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
