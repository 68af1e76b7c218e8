"""csrc/cuda/sparse24_mm.cu under the host emulation: sparse24_mm over every tile shape (n-tiles 1..8), split
and unsplit K, vector and element loads, strided x, bias, fp16 / bf16 / fp32; armor_linear with wrap_out
fused in the epilogue (blocks up to 64), applied after a split K or a wide block (up to 256), and fp32;
against reference.sparse24."""

import ctypes
import math
from types import SimpleNamespace

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
                    non_finite=pick([False, False, True]),  # inf / NaN in x: only kept weights meet them
                )
    for m in (1, 3, 8, 17, 40):
        for k, wrap_in in ((64, 16), (256, 64), (1024, 32), (48, 48), (0, 16)):
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


def wrap(blocks, size, dtype):
    """Near-orthogonal wrap blocks, as ARMOR learns them: identity plus a small random part."""
    return (torch.eye(size) + 0.2 * torch.randn(blocks, size, size)).to(dtype)


def inputs(case, put):
    """The case's arguments placed by put (guarded host memory, or a GPU): x a row slice of a wider
    buffer when x_pad > 0, then the 2:4 weight, bias and, for armor_linear, the wraps."""
    m, n, k, dtype = case["m"], case["n"], case["k"], case["dtype"]
    weight = torch.randn(n, k).to(dtype)
    a = SimpleNamespace(wrap_in=None, wrap_out=None, bias=None)
    a.values, a.meta = (put(t) for t in reference.compress_24(weight, reference.prune_24(weight)))
    x = torch.randn(m, k + case["x_pad"])
    if case.get("non_finite"):
        for value in (math.inf, -math.inf, math.nan):
            x[torch.randint(0, m, ()), torch.randint(0, k, ())] = value
    a.x = put(x.to(dtype))[:, :k]
    if case["bias"]:
        a.bias = put(torch.randn(n).to(dtype))
    if case.get("armor"):
        a.wrap_in = put(wrap(k // case["wrap_in"], case["wrap_in"], dtype))
        a.wrap_out = put(wrap(n // case["wrap_out"], case["wrap_out"], dtype))
    return a


def check(case, a, out):
    if case.get("armor"):
        expected = reference.armor_linear(a.x, a.wrap_in, a.values, a.meta, a.wrap_out, a.bias)
        # Three fp32 products in another order than the reference's: the tolerance follows their lengths.
        assert_close(out, expected, reduction=4 * (case["k"] // 2 + case["wrap_in"] + case["wrap_out"]))
    else:
        assert_close(out, reference.sparse24_mm(a.x, a.values, a.meta, a.bias), reduction=case["k"])


def run(lib, memory, case):
    """The emulated kernels through their extern "C" launchers."""
    a = inputs(case, memory.copy)
    m, n, k, code = case["m"], case["n"], case["k"], DTYPES[case["dtype"]]
    out = memory.empty((m, n), case["dtype"])
    params = Params(
        pointer(a.x), m, k, a.x.stride(0), pointer(a.values), pointer(a.meta), n, pointer(a.bias),
        pointer(out), code, code,
    )  # fmt: skip
    if case.get("armor"):
        params = ArmorParams(
            params, pointer(a.wrap_in), case["wrap_in"], pointer(a.wrap_out), case["wrap_out"]
        )
        workspace_of, launch = lib.dllm_armor_linear_cuda_workspace, lib.dllm_armor_linear_cuda
    else:
        workspace_of, launch = lib.dllm_sparse24_mm_cuda_workspace, lib.dllm_sparse24_mm_cuda
    workspace_of.restype = ctypes.c_size_t
    workspace_bytes = workspace_of(ctypes.byref(params))
    workspace = memory.empty((workspace_bytes,), torch.uint8) if workspace_bytes else None
    err = launch(ctypes.byref(params), ctypes.c_void_p(pointer(workspace)), None)
    assert err == 0, f"launcher returned {err}"
    check(case, a, out)


def run_on_gpu(case):
    """The real kernels on the same case (the GPU test), through the cuda backend's bindings."""
    from dllm_kernels import _extension

    a = inputs(case, lambda t: t.cuda())
    if case.get("armor"):
        out = _extension._C.armor_linear_cuda_run(a.x, a.wrap_in, a.values, a.meta, a.wrap_out, a.bias)
    else:
        out = _extension._C.sparse24_mm_run(a.x, a.values, a.meta, a.bias)
    check(case, a, out)
