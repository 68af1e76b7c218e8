"""csrc/cuda/block_attention.cu under the host emulation: head dims 64 / 128, fp16 / bf16, GQA groups,
prefix / dual-cache / sub-block / block-causal visibility, rows that see nothing, forced and automatic KV
splits, the fused K / V write, strided views, against reference.block_attention."""

import ctypes
import itertools
import math
from types import SimpleNamespace

import torch
from harness import pointer
from helpers import assert_close

from dllm_kernels.reference.block_attention import block_attention as reference

KERNEL = "block_attention"
PARAMS_TYPE = "DllmBlockAttentionParams"
DTYPES = {torch.float16: 1, torch.bfloat16: 2}
Strides = ctypes.c_int64 * 3


class Params(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("q_stride", Strides),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("k_stride", Strides),
        ("v_stride", Strides),
        ("k_new", ctypes.c_void_p),
        ("v_new", ctypes.c_void_p),
        ("k_new_stride", Strides),
        ("v_new_stride", Strides),
        ("q_start", ctypes.c_void_p),
        ("kv_len", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("n_queries", ctypes.c_int64),
        ("s_max", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int),
        ("num_splits", ctypes.c_int),
    ]


# (label, Sq, S_max, block_size): the visibility regimes of the op's contract.
REGIMES = [
    ("decode over a prefix cache", 8, 300, 0),
    ("dual cache, whole sequence visible", 32, 257, 0),
    ("one query", 1, 100, 0),
    ("sub-block of a larger block", 19, 200, 32),
    ("block-causal prefill", 99, 99, 16),
    ("block-causal prefill, blocks across tiles", 70, 140, 37),
    ("block of a long cache", 32, 600, 32),
    ("tiny cache", 5, 1, 0),
]
HEADS = [(8, 2), (28, 4), (2, 1), (3, 3), (4, 1)]


def cases(generator):
    def pick(options):
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    for label, n_queries, s_max, block_size in REGIMES:
        for head_dim, dtype, _ in itertools.product((64, 128), (torch.bfloat16, torch.float16), range(2)):
            yield dict(
                label=label,
                n_queries=n_queries,
                s_max=s_max,
                block_size=block_size,
                head_dim=head_dim,
                dtype=dtype,
                heads=pick(HEADS),
                batch=pick([1, 2, 3]),
                write=pick([False, True]),
                splits=pick([0, 0, 1, 3, 7]),
                lse=pick([False, True]),
                strided=pick([False, True]),
                scale=pick([None, 0.3]),
            )


def layout(put, shape, dtype, strided):
    """A [B, S, H, D] tensor placed by put: contiguous, or a view into a wider buffer (as a fused QKV or K|V
    projection output is), with every outer stride a multiple of 8 elements."""
    b, s, h, d = shape
    if not strided:
        return put(torch.randn(shape).to(dtype))
    return put(torch.randn(b, s, h + 3, d).to(dtype))[:, :, 1 : h + 1]


def inputs(case, put):
    """The case's arguments placed by put (guarded host memory, or a GPU), the reference's results, and NaN
    in every key no query sees (the kernel must never let one reach an output)."""
    batch, n_queries, s_max, head_dim = case["batch"], case["n_queries"], case["s_max"], case["head_dim"]
    (n_heads, n_kv), dtype, block_size = case["heads"], case["dtype"], case["block_size"]
    if case["write"]:
        n_queries = min(n_queries, s_max)
    a = SimpleNamespace(k_new=None, v_new=None)
    a.q = layout(put, (batch, n_queries, n_heads, head_dim), dtype, case["strided"])
    a.k_cache = layout(put, (batch, s_max, n_kv, head_dim), dtype, case["strided"])
    a.v_cache = layout(put, (batch, s_max, n_kv, head_dim), dtype, case["strided"])
    if case["write"]:
        a.k_new = layout(put, (batch, n_queries, n_kv, head_dim), dtype, case["strided"])
        a.v_new = layout(put, (batch, n_queries, n_kv, head_dim), dtype, case["strided"])
    # Per row: where the block starts and how much of the cache is valid (0: the row sees nothing).
    q_start = torch.zeros(batch, dtype=torch.int32)
    if n_queries <= s_max:
        q_start = torch.randint(0, s_max - n_queries + 1, (batch,), dtype=torch.int32)
    kv_len = torch.randint(0, s_max + 1, (batch,), dtype=torch.int32)
    if block_size == 0 and n_queries <= s_max and batch > 1:
        kv_len[1] = int(q_start[1]) + n_queries  # prefix cache: the block ends the valid keys
    kv_len[-1] = s_max
    a.q_start, a.kv_len = put(q_start), put(kv_len)
    a.ref_out, a.ref_lse = reference(
        a.q, a.k_cache.clone(), a.v_cache.clone(), a.q_start, a.kv_len, a.k_new, a.v_new, block_size,
        case["scale"], True,
    )  # fmt: skip
    for b in range(batch):
        end = int(kv_len[b])
        if block_size:
            last = int(q_start[b]) + n_queries - 1
            end = min(end, (last // block_size + 1) * block_size)
        a.k_cache[b, end:], a.v_cache[b, end:] = math.nan, math.nan
        if case["write"]:
            a.k_cache[b, int(q_start[b]) : int(q_start[b]) + n_queries] = math.nan  # overwritten first
    return a


def check(case, a, out, lse):
    assert_close(out, a.ref_out, "out")
    if case["lse"]:
        assert_close(lse, a.ref_lse, "lse")
    if case["write"]:
        for b in range(a.q.shape[0]):
            rows = slice(int(a.q_start[b]), int(a.q_start[b]) + a.q.shape[1])
            assert torch.equal(a.k_cache[b, rows], a.k_new[b]), "k_new written"
            assert torch.equal(a.v_cache[b, rows], a.v_new[b]), "v_new written"


def run(lib, memory, case):
    """The emulated kernel through its extern "C" launcher."""
    a = inputs(case, memory.copy)
    (batch, n_queries, n_heads, head_dim), (s_max, n_kv) = a.q.shape, a.k_cache.shape[1:3]
    out = memory.empty(tuple(a.q.shape), a.q.dtype)
    lse = memory.empty((batch, n_heads, n_queries), torch.float32) if case["lse"] else None
    scale = case["scale"] if case["scale"] is not None else 1 / math.sqrt(head_dim)

    def strides(t):
        return Strides(*(t.stride()[:3] if t is not None else (0, 0, 0)))

    params = Params(
        pointer(a.q), strides(a.q),
        pointer(a.k_cache), pointer(a.v_cache), strides(a.k_cache), strides(a.v_cache),
        pointer(a.k_new), pointer(a.v_new), strides(a.k_new), strides(a.v_new),
        pointer(a.q_start), pointer(a.kv_len), pointer(out), pointer(lse),
        batch, n_queries, s_max, n_heads, n_kv, head_dim, case["block_size"], scale, DTYPES[a.q.dtype],
        case["splits"],
    )  # fmt: skip
    lib.dllm_block_attention_cuda_workspace.restype = ctypes.c_size_t
    workspace_bytes = lib.dllm_block_attention_cuda_workspace(ctypes.byref(params))
    workspace = memory.empty((workspace_bytes,), torch.uint8) if workspace_bytes else None
    err = lib.dllm_block_attention_cuda(ctypes.byref(params), ctypes.c_void_p(pointer(workspace)), None)
    assert err == 0, f"launcher returned {err}"
    check(case, a, out, lse)


def run_on_gpu(case):
    """The real kernel on the same case (the GPU test): the cuda backend's binding, splits forced alike."""
    from dllm_kernels import _extension

    a = inputs(case, lambda t: t.cuda())
    out, lse = _extension._C.block_attention_cuda_run(
        a.q, a.k_cache, a.v_cache, a.q_start, a.kv_len, a.k_new, a.v_new, case["block_size"], case["scale"],
        case["lse"], case["splits"],
    )  # fmt: skip
    check(case, a, out, lse)
