"""``dllm::block_attention``: block-sparse attention with partial KV reuse. docs/ops.md#block_attention."""

import math

import torch

from .. import _extension
from .._backends import DEBUG_CHECKS, define_op
from ..reference import block_attention as reference
from ._common import FLOAT_DTYPES, OpError, describe, may_overlap, op_call

OP = "block_attention"
_err = OpError(OP)


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    block_size: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a block of queries over a KV cache, with the block-diffusion visibility rule.

    Args:
        q: ``[B, Sq, Hq, D]`` bf16 / fp16 / fp32; unit last stride, any other strides.
        k_cache, v_cache: ``[B, S_max, Hkv, D]``, q's dtype, ``Hq % Hkv == 0``: query head ``h`` reads KV head
            ``h // (Hq / Hkv)`` (GQA / MQA without expanding the cache). Mutated only when ``k_new`` is given.
        q_start, kv_len: int32 ``[B]``: query ``i`` of row ``b`` sits at position ``q_start[b] + i``; keys
            ``[0, kv_len[b])`` are valid.
        k_new, v_new: ``[B, Sq, Hkv, D]``, both or neither: written into the caches at
            ``q_start[b] .. q_start[b] + Sq - 1`` first (partial KV reuse: only the active block is new).
        block_size: 0 = every valid key is visible (prefix cache: ``kv_len = q_start + Sq``; dual cache:
            ``kv_len = L``); ``> 0`` = block-causal: key ``j`` is visible to position ``p`` iff
            ``j // block_size <= p // block_size`` (block-diffusion prefill / training, ``q_start = 0``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the fp32 log-sum-exp ``[B, Hq, Sq]`` (natural log); else an empty tensor.

    Returns:
        ``out`` ``[B, Sq, Hq, D]`` in q's dtype and ``lse``. A query that sees no key gets ``out = 0`` and
        ``lse = -inf``.
    """
    return _call(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse)


def _tensor4(err, name, t):
    err.tensor(name, t)
    if t.dim() != 4:
        err(f"{name} must be a 4-dim tensor; got {describe(t)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        err(f"{name} must be contiguous along D (stride(-1) == 1); got strides {list(t.stride())}")


def check_attention(err, q, k_cache, q_start, kv_len, block_size, scale):
    """What every op reading block_attention's queries and keys checks (errors through ``err``)."""
    _tensor4(err, "q", q)
    err.dtype("q", q, FLOAT_DTYPES)
    n_rows, _, n_heads, head_dim = q.shape
    _tensor4(err, "k_cache", k_cache)
    err.same_dtype("k_cache", k_cache, "q", q)
    err.same_device("k_cache", k_cache, "q", q)
    n_kv_heads = k_cache.shape[2]
    if k_cache.shape[0] != n_rows:
        err(f"k_cache must have q's batch size {n_rows}; got {k_cache.shape[0]}")
    if k_cache.shape[3] != head_dim:
        err(f"k_cache must have q's head dim {head_dim}; got {k_cache.shape[3]}")
    if n_heads == 0 or n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        err(f"Hq must be a positive multiple of Hkv >= 1; got Hq = {n_heads}, Hkv = {n_kv_heads}")
    if head_dim == 0:
        err(f"the head dim D must be >= 1; got q of shape {list(q.shape)}")
    for name, t in (("q_start", q_start), ("kv_len", kv_len)):
        err.dtype(name, t, (torch.int32,))
        err.shape(name, t, (n_rows,), " ([B])")
        err.same_device(name, t, "q", q)
    if block_size < 0:
        err(f"block_size must be >= 0; got {block_size}", ValueError)
    if scale is not None and not math.isfinite(scale):
        err(f"scale must be finite; got {scale}", ValueError)


def check_positions(err, q, k_cache, q_start, kv_len):
    """The values of q_start / kv_len (free on CPU, a host sync on a GPU: there only with
    DLLM_DEBUG_CHECKS=1)."""
    if q.shape[0] == 0 or not (q.device.type == "cpu" or DEBUG_CHECKS):
        return
    s_max = k_cache.shape[1]
    if int(q_start.min()) < 0 or int(kv_len.min()) < 0 or int(kv_len.max()) > s_max:
        err(
            f"q_start must be >= 0 and kv_len in [0, S_max = {s_max}]; got q_start = {q_start.tolist()}, "
            f"kv_len = {kv_len.tolist()}",
            ValueError,
        )


def checked_args(
    q,
    k_cache,
    v_cache,
    q_start,
    kv_len,
    *,
    k_new=None,
    v_new=None,
    block_size=0,
    scale=None,
    return_lse=False,
):
    """The schema's arguments, checked before anything is written, in schema order."""
    check_attention(_err, q, k_cache, q_start, kv_len, block_size, scale)
    n_rows, n_queries, _, head_dim = q.shape
    _tensor4(_err, "v_cache", v_cache)
    _err.same_dtype("v_cache", v_cache, "q", q)
    _err.same_device("v_cache", v_cache, "q", q)
    if k_cache.shape != v_cache.shape:
        _err(f"v_cache must have k_cache's shape {list(k_cache.shape)}; got {list(v_cache.shape)}")
    if (k_new is None) != (v_new is None):
        _err(
            "k_new and v_new go together; got only " + ("k_new" if k_new is not None else "v_new"), ValueError
        )
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            _tensor4(_err, name, t)
            _err.same_dtype(name, t, "q", q)
            _err.shape(name, t, (n_rows, n_queries, k_cache.shape[2], head_dim), " ([B, Sq, Hkv, D])")
            _err.same_device(name, t, "q", q)
        _err.no_internal_overlap("k_cache", k_cache)
        _err.no_internal_overlap("v_cache", v_cache)
    return q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse


def _prepare(q, k_cache, v_cache, q_start, kv_len, k_new, *options):
    """Checks on real tensors, before anything is written: where the two caches lie in memory, and (free on
    CPU, a host sync on a GPU, so there only with DLLM_DEBUG_CHECKS=1) the values of q_start / kv_len."""
    arguments = (q, k_cache, v_cache, q_start, kv_len, k_new, *options)
    if k_new is not None and may_overlap(k_cache, v_cache):
        _err(
            "k_cache and v_cache are written in place, so they must not share memory; got views that "
            f"overlap (strides {list(k_cache.stride())} and {list(v_cache.stride())})"
        )
    s_max = k_cache.shape[1]
    # GPU kernels never write outside the cache: the values are read there only under DLLM_DEBUG_CHECKS.
    values_checked = q.shape[0] > 0 and (q.device.type == "cpu" or DEBUG_CHECKS)
    if k_new is not None and values_checked and int((q_start.long() + q.shape[1]).max()) > s_max:
        _err(
            f"q_start + Sq must be <= S_max = {s_max} when writing; got q_start = {q_start.tolist()}, "
            f"Sq = {q.shape[1]}",
            ValueError,
        )
    check_positions(_err, q, k_cache, q_start, kv_len)
    return arguments


def _lse_shape(q, return_lse):
    return (q.shape[0], q.shape[2], q.shape[1]) if return_lse else (0,)


def _fake(q, *args):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, args[-1]), dtype=torch.float32)


dispatcher = define_op(OP, checked_args, _fake, _prepare)
_call = op_call(OP, block_attention)
# The reference takes the schema's arguments in order.
dispatcher.register("reference")(reference.block_attention)


@dispatcher.register("cpu")
def _cpu(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse):
    """Chunked ATen in C++ (csrc/torch/block_attention.cpp): each run of queries that sees the same key
    prefix is one call of torch's CPU flash kernel over exactly that prefix."""
    return _extension._C.block_attention_run(
        q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse
    )


def _cuda_supports(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, *options):
    """The CUDA kernel takes fp16 / bf16 at head dims 64 and 128 with 16-byte aligned rows (cp.async and
    ldmatrix move 16 bytes); anything else falls through to Triton."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"cuda runs fp16 and bf16; got {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"cuda runs head dims 64 and 128; got {q.shape[-1]}"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if t is not None and (t.data_ptr() % 16 or any(stride % 8 for stride in t.stride()[:3])):
            return f"cuda needs 16-byte aligned rows; {name} has strides {list(t.stride())}"
    if k_cache.shape[2] > 65535:
        return f"cuda runs up to 65535 KV heads; got {k_cache.shape[2]}"
    return None


@dispatcher.register("cuda", supports=_cuda_supports)
def _cuda(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse):
    """csrc/cuda/block_attention.cu: FlashAttention-2 on mma.sync, split-KV for decode shapes."""
    return _extension._C.block_attention_cuda_run(
        q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse, 0
    )


def _triton_supports(q, *args):
    if q.shape[-1] not in (64, 96, 128, 256):
        return f"triton runs head dims 64, 96, 128, 256; got {q.shape[-1]}"
    return None


@dispatcher.register("triton", supports=_triton_supports)
def _triton(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse):
    from ..triton_kernels.block_attention import block_attention as launch

    return launch(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse)
