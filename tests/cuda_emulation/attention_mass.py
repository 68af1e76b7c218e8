"""csrc/cuda/attention_mass.cu under the host emulation: head dims 64 / 128, fp16 / bf16, GQA groups, prefix /
dual-cache / sub-block / block-causal visibility, query and key masks, rows that see nothing, strided views,
NaN where nothing may read, against reference.attention_mass (mass within tolerance, top exactly by its
rule)."""

import ctypes
import itertools
import math
from types import SimpleNamespace

import torch
from harness import pointer
from helpers import assert_close

from dllm_kernels.reference.attention_mass import attention_mass as reference
from dllm_kernels.reference.attention_mass import top_of
from dllm_kernels.reference.block_attention import block_attention

KERNEL = "attention_mass"
PARAMS_TYPE = "DllmAttentionMassParams"
DTYPES = {torch.float16: 1, torch.bfloat16: 2}
Strides3 = ctypes.c_int64 * 3
Strides2 = ctypes.c_int64 * 2


class Params(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("q_stride", Strides3),
        ("k_cache", ctypes.c_void_p),
        ("k_stride", Strides3),
        ("lse", ctypes.c_void_p),
        ("lse_stride", Strides3),
        ("q_start", ctypes.c_void_p),
        ("kv_len", ctypes.c_void_p),
        ("query_mask", ctypes.c_void_p),
        ("query_mask_stride", Strides2),
        ("key_mask", ctypes.c_void_p),
        ("key_mask_stride", Strides2),
        ("mass", ctypes.c_void_p),
        ("top", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("n_queries", ctypes.c_int64),
        ("s_max", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int),
    ]


# (label, Sq, S_max, block_size): the visibility regimes of the op's contract.
REGIMES = [
    ("decode over a prefix cache", 8, 150, 0),
    ("one query", 1, 70, 0),
    ("sub-block of a larger block", 19, 130, 32),
    ("block-causal prefill", 40, 40, 16),
    ("tiny cache", 5, 1, 0),
]
HEADS = [(8, 2), (28, 4), (2, 1), (3, 3)]


def cases(generator):
    def pick(options):
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    for label, n_queries, s_max, block_size in REGIMES:
        for head_dim, dtype in itertools.product((64, 128), (torch.bfloat16, torch.float16)):
            yield dict(
                label=label,
                n_queries=n_queries,
                s_max=s_max,
                block_size=block_size,
                head_dim=head_dim,
                dtype=dtype,
                heads=pick(HEADS),
                batch=pick([1, 2, 3]),
                query_mask=pick([False, True]),
                key_mask=pick([False, True]),
                strided=pick([False, True]),
                scale=pick([None, 0.3]),
            )


def layout(put, shape, dtype, strided):
    """A [B, S, H, D] tensor placed by put: contiguous, or a view into a wider buffer (a fused projection)."""
    b, s, h, d = shape
    if not strided:
        return put(torch.randn(shape).to(dtype))
    return put(torch.randn(b, s, h + 3, d).to(dtype))[:, :, 1 : h + 1]


def inputs(case, put):
    """The case's arguments placed by put (guarded host memory, or a GPU), the reference's results, and NaN in
    every key no query sees and in every query that does not count (the kernel must never let one through)."""
    batch, n_queries, s_max, head_dim = case["batch"], case["n_queries"], case["s_max"], case["head_dim"]
    (n_heads, n_kv), dtype, block_size = case["heads"], case["dtype"], case["block_size"]
    a = SimpleNamespace(query_mask=None, key_mask=None)
    a.q = layout(put, (batch, n_queries, n_heads, head_dim), dtype, case["strided"])
    a.k_cache = layout(put, (batch, s_max, n_kv, head_dim), dtype, case["strided"])
    v_cache = torch.randn(batch, s_max, n_kv, head_dim).to(dtype)
    q_start = torch.zeros(batch, dtype=torch.int32)
    if n_queries <= s_max:
        q_start = torch.randint(0, s_max - n_queries + 1, (batch,), dtype=torch.int32)
    kv_len = torch.randint(0, s_max + 1, (batch,), dtype=torch.int32)
    kv_len[-1] = s_max
    a.q_start, a.kv_len = put(q_start), put(kv_len)
    _, lse = block_attention(
        a.q.cpu(), a.k_cache.cpu(), v_cache, q_start, kv_len, None, None, block_size, case["scale"], True
    )
    if case["strided"]:
        a.lse = put(torch.empty(batch, n_queries, n_heads)).transpose(1, 2)  # [B, Hq, Sq], strided
        a.lse.copy_(lse)
    else:
        a.lse = put(lse)
    if case["query_mask"]:
        a.query_mask = put(torch.rand(batch, n_queries) < 0.7)
    if case["key_mask"]:
        a.key_mask = put(torch.rand(batch, s_max) < 0.3)
    args = (a.q, a.k_cache, a.lse, a.q_start, a.kv_len, a.query_mask, a.key_mask, block_size, case["scale"])
    a.ref_mass, _ = reference(*args)
    for b in range(batch):
        end = int(kv_len[b])
        if block_size:
            last = int(q_start[b]) + n_queries - 1
            end = min(end, (last // block_size + 1) * block_size)
        a.k_cache[b, end:] = math.nan
        if a.query_mask is not None:
            a.q[b, ~a.query_mask[b]] = math.nan
    return a


def check(case, a, mass, top):
    n_heads = case["heads"][0]
    assert_close(mass, a.ref_mass, "mass", reduction=n_heads * case["n_queries"])
    assert torch.equal(top.cpu(), top_of(mass.cpu())), "top"


def run(lib, memory, case):
    """The emulated kernel through its extern "C" launcher."""
    a = inputs(case, memory.copy)
    (batch, n_queries, n_heads, head_dim), (s_max, n_kv) = a.q.shape, a.k_cache.shape[1:3]
    mass = memory.empty((batch, s_max), torch.float32)
    top = memory.empty((batch,), torch.int64)
    scale = case["scale"] if case["scale"] is not None else 1 / math.sqrt(head_dim)

    def strides(t, n):
        return (Strides3 if n == 3 else Strides2)(*(t.stride()[:n] if t is not None else (0,) * n))

    params = Params(
        pointer(a.q), strides(a.q, 3), pointer(a.k_cache), strides(a.k_cache, 3), pointer(a.lse),
        strides(a.lse, 3), pointer(a.q_start), pointer(a.kv_len), pointer(a.query_mask),
        strides(a.query_mask, 2), pointer(a.key_mask), strides(a.key_mask, 2), pointer(mass), pointer(top),
        batch, n_queries, s_max, n_heads, n_kv, head_dim, case["block_size"], scale, DTYPES[a.q.dtype],
    )  # fmt: skip
    err = lib.dllm_attention_mass_cuda(ctypes.byref(params), None)
    assert err == 0, f"launcher returned {err}"
    check(case, a, mass, top)


def run_on_gpu(case):
    """The real kernels on the same case (the GPU test), through the cuda backend's binding."""
    from dllm_kernels import _extension

    a = inputs(case, lambda t: t.cuda())
    mass, top = _extension._C.attention_mass_cuda_run(
        a.q,
        a.k_cache,
        a.lse,
        a.q_start,
        a.kv_len,
        a.query_mask,
        a.key_mask,
        case["block_size"],
        case["scale"],
    )
    check(case, a, mass, top)
