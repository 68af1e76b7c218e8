"""csrc/cuda/select_unmask.cu under the host emulation: every policy on every key path the launcher picks
(keys in registers for rows up to 256, 1024 and 4096 positions, recomputed beyond), ties, scores at the
thresholds, NaN / -inf inside runs of eligible positions, the floor, radii up to past the row, the fused
commit through strided rows; against reference.select_unmask, exactly."""

import ctypes
import math
from types import SimpleNamespace

import torch
from harness import pointer

from dllm_kernels.ops.select_unmask import POLICIES
from dllm_kernels.reference.select_unmask import select_unmask as reference

KERNEL = "select_unmask"
PARAMS_TYPE = "DllmSelectParams"
THRESHOLD, LOW = 0.75, 0.5  # fp32 values: scores equal to them test inclusive and not


class Params(ctypes.Structure):
    _fields_ = [
        ("score", ctypes.c_void_p),
        ("eligible", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("score_stride", ctypes.c_int64),
        ("eligible_stride", ctypes.c_int64),
        ("policy", ctypes.c_int),
        ("k", ctypes.c_void_p),
        ("k_is_int64", ctypes.c_int),
        ("threshold", ctypes.c_double),
        ("inclusive", ctypes.c_int),
        ("factor", ctypes.c_double),
        ("min_per_row", ctypes.c_int64),
        ("low_threshold", ctypes.c_double),
        ("radius", ctypes.c_int64),
        ("margin", ctypes.c_double),
        ("token", ctypes.c_void_p),
        ("x", ctypes.c_void_p),
        ("token_stride", ctypes.c_int64),
        ("x_stride", ctypes.c_int64),
        ("selected", ctypes.c_void_p),
        ("count", ctypes.c_void_p),
    ]


def cases(generator):
    def pick(options):
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    # 1..256, ..1024, ..4096: keys in registers (K = 1, 4, 16); beyond: recomputed from global memory.
    for length in (1, 19, 256, 257, 989, 1024, 2100, 4096, 5000):
        for policy in POLICIES * 2:
            yield dict(
                policy=policy,
                rows=pick([1, 2, 3]) if length > 1024 else pick([1, 4, 7]),
                length=length,
                ties=pick([False, True]),
                inclusive=pick([False, True]),
                min_per_row=pick([0, 1, 3, 300]),
                radius=pick([0, 1, 4, length + 5]),
                margin=pick([0.0, 1e-5, 0.2]),
                factor=pick([0.3, 1.0]),
                window=pick([None, 32, 200]),  # eligible: a block of that width, or scattered
                commit=pick([False, True]),
                pad=pick([0, 3]),  # extra row stride
            )


def inputs(case, put):
    """The case's tensors placed by put (guarded host memory, or a GPU); rows are views of wider buffers
    when pad > 0."""
    rows, length, pad = case["rows"], case["length"], case["pad"]
    if case["ties"]:
        values = torch.tensor([0.2, LOW, 0.6, THRESHOLD, 0.9, 1.0, -0.0, 0.0])
        score = values[torch.randint(0, len(values), (rows, length))]
    else:
        score = torch.rand(rows, length)
    score[torch.rand(rows, length) < 0.05] = math.nan
    score[torch.rand(rows, length) < 0.05] = -math.inf
    if case["window"] is None:
        eligible = torch.rand(rows, length) < 0.6
    else:
        eligible = torch.zeros(rows, length, dtype=torch.bool)
        start = int(torch.randint(0, max(1, length - case["window"]), ()))
        eligible[:, start : start + case["window"]] = True
        eligible &= torch.rand(rows, length) < 0.9  # gaps split the block into runs
    a = SimpleNamespace()
    a.score = put(torch.cat([score, torch.rand(rows, pad)], 1))[:, :length]
    a.eligible = put(torch.cat([eligible, torch.ones(rows, pad, dtype=torch.bool)], 1))[:, :length]
    a.k = put(torch.randint(-1, length + 2, (rows,)))
    a.token = a.x = None
    if case["commit"]:
        a.token = put(torch.randint(0, 1000, (rows, length + pad)))[:, :length]
        a.x = put(torch.full((rows, length + pad), -1))[:, pad:]
    return a


def options(case):
    return dict(
        policy=case["policy"],
        threshold=THRESHOLD,
        inclusive=case["inclusive"],
        factor=case["factor"],
        min_per_row=case["min_per_row"],
        low_threshold=LOW,
        radius=case["radius"],
        margin=case["margin"],
    )


def check(case, a, selected, count, x_before):
    x_ref = None if a.x is None else x_before.cpu().clone()
    ref_selected, ref_count = reference(
        a.score.cpu(), a.eligible.cpu(), k=a.k.cpu(), token=None if a.x is None else a.token.cpu(), x=x_ref,
        **options(case),
    )  # fmt: skip
    assert torch.equal(selected.cpu(), ref_selected), "selected differs"
    assert torch.equal(count.cpu(), ref_count), "count differs"
    if a.x is not None:
        assert torch.equal(a.x.cpu(), x_ref), "x differs"


def run(lib, memory, case):
    """The emulated kernel through its extern "C" launcher."""
    a = inputs(case, memory.copy)
    rows, length = case["rows"], case["length"]
    selected = memory.empty((rows, length), torch.bool)
    count = memory.empty((rows,), torch.int32)
    x_before = None if a.x is None else a.x.clone()
    o = options(case)
    params = Params(
        pointer(a.score), pointer(a.eligible), rows, length, a.score.stride(0), a.eligible.stride(0),
        POLICIES.index(o["policy"]), pointer(a.k), 1, o["threshold"], int(o["inclusive"]), o["factor"],
        o["min_per_row"], o["low_threshold"], o["radius"], o["margin"], pointer(a.token), pointer(a.x),
        0 if a.x is None else a.token.stride(0), 0 if a.x is None else a.x.stride(0), pointer(selected),
        pointer(count),
    )  # fmt: skip
    err = lib.dllm_select_unmask_cuda(ctypes.byref(params), None)
    assert err == 0, f"launcher returned {err}"
    check(case, a, selected, count, x_before)


def run_on_gpu(case):
    """The real kernel on the same case (the GPU test), through the cuda backend's binding."""
    from dllm_kernels import _extension

    a = inputs(case, lambda t: t.cuda())
    x_before = None if a.x is None else a.x.clone()
    o = options(case)
    selected, count = _extension._C.select_unmask_run(
        a.score, a.eligible, POLICIES.index(o.pop("policy")), a.k, *o.values(), a.token, a.x
    )
    check(case, a, selected, count, x_before)
