"""``dllm::attention_mass``: each key's attention mass (Elastic-Cache). docs/ops.md#attention_mass."""

import torch

from .. import _extension
from .._backends import define_op
from ..reference import attention_mass as reference
from ._common import OpError, op_call
from .block_attention import check_attention, check_positions

OP = "attention_mass"
_err = OpError(OP)


def attention_mass(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    lse: torch.Tensor,
    q_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    block_size: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much attention each cached key receives from a block of queries, summed over heads and queries,
    from block_attention's lse (no ``[B, H, Sq, S]`` probabilities are materialised).

    Args:
        q: ``[B, Sq, Hq, D]`` bf16 / fp16 / fp32; unit last stride, any other strides.
        k_cache: ``[B, S_max, Hkv, D]``, q's dtype, unit last stride, ``Hq % Hkv == 0``: query head ``h``
            reads KV head ``h // (Hq / Hkv)``.
        lse: fp32 ``[B, Hq, Sq]``, any strides: the natural-log log-sum-exp that ``block_attention(q, k_cache,
            v_cache, q_start, kv_len, block_size=..., scale=..., return_lse=True)`` returned.
        q_start, kv_len: int32 ``[B]`` as in block_attention: query ``i`` of row ``b`` sits at position
            ``q_start[b] + i`` and sees key ``j`` iff ``j < kv_len[b]`` and (``block_size == 0`` or
            ``j // block_size <= p // block_size``).
        query_mask: bool ``[B, Sq]`` or None (every query): the queries whose attention is counted.
        key_mask: bool ``[B, S_max]`` or None: True marks a key whose token is still masked; its mass is 0.
        block_size: ``>= 0``, as in block_attention.
        scale: as in block_attention, default ``1 / sqrt(D)``; must be finite.

    Returns:
        ``mass`` fp32 ``[B, S_max]``: ``sum_{h, counted i that see j} exp(q[b,i,h] . k[b,j,h//G] * scale -
        lse[b,h,i])``; 0 for keys past kv_len, keys no counted query sees and excluded keys. A query whose lse
        is -inf adds 0; keys no counted query sees are never read. ``top`` int64 ``[B]``: the first index of
        the row's largest mass (a NaN counts as largest, as in ``torch.argmax``), -1 where none is positive.
    """
    return _call(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale)


def checked_args(
    q, k_cache, lse, q_start, kv_len, *, query_mask=None, key_mask=None, block_size=0, scale=None
):
    """The schema's arguments, checked before anything is computed, in schema order."""
    check_attention(_err, q, k_cache, q_start, kv_len, block_size, scale)
    n_rows, n_queries, n_heads, _ = q.shape
    s_max = k_cache.shape[1]
    _err.dtype("lse", lse, (torch.float32,))
    _err.shape("lse", lse, (n_rows, n_heads, n_queries), " ([B, Hq, Sq])")
    _err.same_device("lse", lse, "q", q)
    for name, t, shape, what in (
        ("query_mask", query_mask, (n_rows, n_queries), " ([B, Sq])"),
        ("key_mask", key_mask, (n_rows, s_max), " ([B, S_max])"),
    ):
        if t is not None:
            _err.dtype(name, t, (torch.bool,))
            _err.shape(name, t, shape, what)
            _err.same_device(name, t, "q", q)
    return q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale


def _prepare(q, k_cache, lse, q_start, kv_len, *options):
    check_positions(_err, q, k_cache, q_start, kv_len)
    return (q, k_cache, lse, q_start, kv_len, *options)


def _fake(q, k_cache, *args):
    return (
        q.new_empty((q.shape[0], k_cache.shape[1]), dtype=torch.float32),
        q.new_empty((q.shape[0],), dtype=torch.int64),
    )


dispatcher = define_op(OP, checked_args, _fake, _prepare)
_call = op_call(OP, attention_mass)
# The reference takes the schema's arguments in order.
dispatcher.register("reference")(reference.attention_mass)


@dispatcher.register("cpu")
def _cpu(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale):
    """csrc/cpu/attention_mass.cpp: OpenMP over (row, key tile), the scores of a tile in registers."""
    return _extension._C.attention_mass_run(
        q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale
    )


def _cuda_supports(q, k_cache, *args):
    """The CUDA kernel takes fp16 / bf16 at head dims 64 and 128 with 4-byte aligned rows (its fragments are
    32-bit loads of two elements); anything else falls through to Triton."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"cuda runs fp16 and bf16; got {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"cuda runs head dims 64 and 128; got {q.shape[-1]}"
    for name, t in (("q", q), ("k_cache", k_cache)):
        if t.data_ptr() % 4 or any(stride % 2 for stride in t.stride()[:3]):
            return f"cuda needs 4-byte aligned rows; {name} has strides {list(t.stride())}"
    return None


@dispatcher.register("cuda", supports=_cuda_supports)
def _cuda(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale):
    """csrc/cuda/attention_mass.cu: mma.sync scores, a CTA per (row, 64-key tile), top by a second kernel."""
    return _extension._C.attention_mass_cuda_run(
        q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale
    )


def _triton_supports(q, *args):
    if q.shape[-1] > 256:
        return f"triton runs head dims up to 256; got {q.shape[-1]}"
    return None


@dispatcher.register("triton", supports=_triton_supports)
def _triton(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale):
    from ..triton_kernels.attention_mass import attention_mass as launch

    return launch(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale)
