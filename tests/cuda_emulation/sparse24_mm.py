"""csrc/cuda/sparse24_mm.cu under the host emulation: sparse24_mm over every tile shape (n-tiles 1..8), split
and unsplit K, vector and element loads, strided x, bias, fp16 / bf16 / fp32; armor_linear with wrap_out
fused in the epilogue (blocks up to 64), applied after a split K or a wide block (up to 256), and fp32;
against reference.sparse24."""

import ctypes

import torch
from harness import pointer
from helpers import assert_close

from dllm_kernels.reference import sparse24 as reference

KERNEL = "sparse24_mm"
PARAMS_TYPE = "DllmSparse24Params"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Params(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("x_stride", ctypes.c_int64),
        ("values", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("x_dtype", ctypes.c_int),
    ]


class ArmorParams(ctypes.Structure):
    _fields_ = [
        ("mm", Params),
        ("wrap_in", ctypes.c_void_p),
        ("wrap_in_bs", ctypes.c_int64),
        ("wrap_out", ctypes.c_void_p),
        ("wrap_out_bs", ctypes.c_int64),
    ]


def cases(generator):
    def pick(options):
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    # Every M class (1, 2, 4, 8 n-tiles and several m-tiles), K that splits or not, with and without a
    # 64-multiple (vector loads), N that ends inside a warp's 16 rows.
    for m in (1, 5, 8, 9, 16, 19, 33, 64, 99):
        for k in (16, 48, 64, 272, 1024):
            for _ in range(3):
                yield dict(
                    m=m,
                    n=pick([1, 17, 64, 100, 130]),
                    k=k,
                    dtype=pick([torch.float16, torch.bfloat16, torch.bfloat16, torch.float32]),
                    bias=pick([False, True]),
                    x_pad=pick([0, 0, 4, 3]),  # extra row stride: 3 breaks the 8-byte cp.async of x
                )
    for m in (1, 3, 8, 17, 40):
        for k, wrap_in in ((64, 16), (256, 64), (1024, 32), (48, 48)):
            for wrap_out in (1, 16, 64, 128, 256):
                yield dict(
                    armor=True,
                    m=m,
                    n=wrap_out * pick([1, 2, 3]) if wrap_out > 16 else pick([16, 48, 128, 192]),
                    k=k,
                    wrap_in=wrap_in,
                    wrap_out=wrap_out,
                    dtype=pick([torch.float16, torch.bfloat16, torch.bfloat16, torch.float32]),
                    bias=pick([False, True]),
                    x_pad=pick([0, 3]),
                )


def run(lib, memory, case):
    (run_armor if case.get("armor") else run_mm)(lib, memory, case)


def run_mm(lib, memory, case):
    m, n, k, dtype = case["m"], case["n"], case["k"], case["dtype"]
    weight = torch.randn(n, k).to(dtype)
    values, meta = reference.compress_24(weight, reference.prune_24(weight))
    x_rows = memory.copy(torch.randn(m, k + case["x_pad"]).to(dtype))
    x = x_rows[:, :k]
    values, meta = memory.copy(values), memory.copy(meta)
    bias = memory.copy(torch.randn(n).to(dtype)) if case["bias"] else None
    out = memory.empty((m, n), dtype)
    code = DTYPES[dtype]
    params = Params(
        pointer(x),
        m,
        k,
        x.stride(0),
        pointer(values),
        pointer(meta),
        n,
        pointer(bias),
        pointer(out),
        code,
        code,
    )
    lib.dllm_sparse24_mm_cuda_workspace.restype = ctypes.c_size_t
    workspace_bytes = lib.dllm_sparse24_mm_cuda_workspace(ctypes.byref(params))
    workspace = memory.empty((workspace_bytes,), torch.uint8) if workspace_bytes else None
    err = lib.dllm_sparse24_mm_cuda(ctypes.byref(params), ctypes.c_void_p(pointer(workspace)), None)
    assert err == 0, f"launcher returned {err}"
    expected = reference.sparse24_mm(x, values, meta, bias)
    assert_close(out, expected, reduction=k // 2)


def run_armor(lib, memory, case):
    m, n, k, dtype = case["m"], case["n"], case["k"], case["dtype"]
    weight = torch.randn(n, k).to(dtype)
    values, meta = (memory.copy(t) for t in reference.compress_24(weight, reference.prune_24(weight)))
    x = memory.copy(torch.randn(m, k + case["x_pad"]).to(dtype))[:, :k]
    # Near-orthogonal wraps, as ARMOR learns them: identity plus a small random part.
    wrap_in = memory.copy(
        (
            torch.eye(case["wrap_in"])
            + 0.2 * torch.randn(k // case["wrap_in"], case["wrap_in"], case["wrap_in"])
        ).to(dtype)
    )
    wrap_out = memory.copy(
        (
            torch.eye(case["wrap_out"])
            + 0.2 * torch.randn(n // case["wrap_out"], case["wrap_out"], case["wrap_out"])
        ).to(dtype)
    )
    bias = memory.copy(torch.randn(n).to(dtype)) if case["bias"] else None
    out = memory.empty((m, n), dtype)
    code = DTYPES[dtype]
    params = ArmorParams(
        Params(pointer(x), m, k, x.stride(0), pointer(values), pointer(meta), n, pointer(bias), pointer(out),
               code, code),
        pointer(wrap_in), case["wrap_in"], pointer(wrap_out), case["wrap_out"],
    )  # fmt: skip
    lib.dllm_armor_linear_cuda_workspace.restype = ctypes.c_size_t
    workspace_bytes = lib.dllm_armor_linear_cuda_workspace(ctypes.byref(params))
    assert workspace_bytes > 0
    workspace = memory.empty((workspace_bytes,), torch.uint8)
    err = lib.dllm_armor_linear_cuda(ctypes.byref(params), ctypes.c_void_p(pointer(workspace)), None)
    assert err == 0, f"launcher returned {err}"
    expected = reference.armor_linear(x, wrap_in, values, meta, wrap_out, bias)
    # Three fp32 products in another order than the reference's: the tolerance follows their lengths.
    assert_close(out, expected, reduction=4 * (k // 2 + case["wrap_in"] + case["wrap_out"]))
