"""2:4 sparsity: the format (exact), every backend's products against the reference, the module, errors."""

import pytest
import torch
from helpers import (
    DEVICES,
    KERNEL_BACKENDS,
    assert_close,
    python,
    run_cuda_emulation,
    run_emulated_cases_on_gpu,
)

import dllm_kernels
from dllm_kernels import use_backend
from dllm_kernels.nn import Sparse24Linear
from dllm_kernels.ops.sparse24 import dispatchers
from dllm_kernels.reference import sparse24 as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pruned(n, k, dtype=torch.float32, device="cpu"):
    weight = torch.randn(n, k, device=device).to(dtype)
    mask = dllm_kernels.prune_24(weight)
    return weight, mask, *dllm_kernels.compress_24(weight, mask)


def test_prune_keeps_two_largest_of_four_lowest_index_on_ties():
    weight = torch.tensor(
        [[1.0, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -0.0, 5.0, 5.0, -5.0, 4.0]]
    )
    mask = dllm_kernels.prune_24(weight)
    assert mask[0].int().tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    score = torch.arange(16.0)[None].flip(-1)  # a score overrides |weight|
    assert dllm_kernels.prune_24(weight, score)[0].int().tolist() == [1, 1, 0, 0] * 4
    big = torch.randn(64, 4096)
    assert (dllm_kernels.prune_24(big).view(64, -1, 4).sum(-1) == 2).all()


def test_compress_format_by_hand():
    # group 0 keeps (1, 2): code 1 | 2 << 2 = 0b1001; group 1 keeps (0, 3): 0b1100; group 2 (2, 3): 0b1110;
    # group 3 (0, 1): 0b0100 -> meta = 0x4EC9
    weight = torch.arange(1.0, 17.0)[None]
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    values, meta = dllm_kernels.compress_24(weight, mask)
    assert values.tolist() == [[2.0, 3.0, 5.0, 8.0, 11.0, 12.0, 13.0, 14.0]]
    assert meta.dtype == torch.int16 and (meta.int() & 0xFFFF).tolist() == [[0x4EC9]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_exact_and_keeps_zeros(dtype):
    weight, mask, values, meta = pruned(48, 4096 + 64, dtype)
    weight[mask & (torch.rand_like(weight, dtype=torch.float32) < 0.1)] = 0.0  # kept exact zeros
    weight[0, :4] = torch.tensor([-0.0, -0.0, 1.0, 2.0]).to(dtype)
    mask[0, :4] = torch.tensor([True, True, False, False])
    values, meta = dllm_kernels.compress_24(weight, mask)
    assert torch.equal(dllm_kernels.decompress_24(values, meta), weight * mask)
    again = dllm_kernels.compress_24(dllm_kernels.decompress_24(values, meta), mask)
    assert torch.equal(again[0], values) and torch.equal(again[1], meta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sparse24_mm_matches_reference(backend, device, dtype):
    # K % 32 == 16 (half a CPU chunk), N not a power of two, M of 1 / odd / large
    for m, n, k in ((1, 16, 16), (3, 48, 64), (19, 64, 128), (99, 19, 272), (989, 7, 48), (16, 40, 4096)):
        *_, values, meta = pruned(n, k, dtype, device)
        x = torch.randn(m, k, device=device).to(dtype)
        strided = torch.randn(m, 2 * k, device=device).to(dtype)[:, ::2]
        bias = torch.randn(n, device=device).to(dtype)
        reason = dispatchers["sparse24_mm"].why_not(backend, x.device, x, values, meta, bias, explicit=True)
        if reason is not None:
            pytest.skip(reason)
        with use_backend(backend):
            cases = ((x, values, meta, bias), (x, values, meta), (x.view(1, m, k), values, meta, bias))
            for args in (*cases, (strided, values, meta, bias)):
                got = dllm_kernels.sparse24_mm(*args)
                assert got.dtype == dtype and got.shape == (*args[0].shape[:-1], n)
                assert_close(got, reference.sparse24_mm(*args), reduction=k)


@pytest.mark.parametrize("out_block", [32, 128], ids=lambda b: f"wrap_out {b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_armor_linear_matches_reference(backend, device, dtype, out_block):
    """wrap_out fused into the product's epilogue (32) or applied after it (128 spans two CUDA tiles)."""
    weight, mask, values, meta = pruned(128, 128, dtype, device)
    x = torch.randn(2, 5, 128, device=device).to(dtype)
    wrap_in = torch.randn(4, 32, 32, device=device).to(dtype) / 6
    wrap_out = torch.randn(128 // out_block, out_block, out_block, device=device).to(dtype) / out_block**0.5
    bias = torch.randn(128, device=device).to(dtype)
    args = (x, wrap_in, values, meta, wrap_out, bias)
    reason = dispatchers["armor_linear"].why_not(backend, x.device, *args, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        got = dllm_kernels.armor_linear(*args)
    # x passes through three products (32, 64 kept and 32 terms) whose partial sums reach |out| ~ 10, each
    # rounded in its own order: the chain drifts like one 512-term sum, not one 128-term sum (seen: 1.5e-5)
    chain = 512
    assert_close(got, reference.armor_linear(*args), reduction=chain)
    # A x S x B as three dense products, written out
    dense = torch.block_diag(*wrap_out.float()) @ (weight * mask).float() @ torch.block_diag(*wrap_in.float())
    assert_close(got, (x.float() @ dense.T + bias.float()).to(dtype), reduction=chain)


def kept_products(x, weight, mask):
    """sum over kept k of x[m, k] * w[n, k] in float64 IEEE arithmetic: the classes (NaN, +-inf) any correct
    backend must give, pruned columns absent."""
    n, k = weight.shape
    kept = mask.nonzero()[:, 1].view(n, k // 2)  # [N, K/2] kept columns of each row
    products = x.double()[:, kept] * weight.double().gather(1, kept)[None]  # [M, N, K/2]
    return products.sum(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_non_finite_x_meets_kept_weights_only(backend, device, dtype):
    """A pruned position is absent, not a zero: NaN / inf in x at a pruned column never reach the output;
    at a kept one they meet the weight in IEEE arithmetic (a kept zero times inf is NaN). Every backend
    gives the same NaN / inf pattern as the float64 sum over kept elements."""
    weight, mask, _, _ = pruned(48, 64, dtype, device)
    weight[0, mask[0].nonzero()[0, 0]] = 0  # a kept zero in row 0
    values, meta = dllm_kernels.compress_24(weight, mask)
    x = torch.randn(6, 64, device=device).to(dtype)
    pruned_col = (~mask[1]).nonzero()[0, 0]
    kept_col = mask[2].nonzero()[0, 0]
    x[0, pruned_col] = float("nan")  # pruned by row 1, maybe kept by others
    x[1, pruned_col] = float("inf")
    x[2, kept_col] = float("-inf")
    x[3, mask[0].nonzero()[0, 0]] = float("inf")  # meets row 0's kept zero: NaN there
    x[4, kept_col], x[4, (~mask[2]).nonzero()[0, 0]] = float("inf"), float("-inf")
    args = (x, values, meta)
    reason = dispatchers["sparse24_mm"].why_not(backend, x.device, *args, None, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        got = dllm_kernels.sparse24_mm(*args).float()
    want = kept_products(x, weight, mask)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), backend
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(
        torch.isneginf(got), torch.isneginf(want)
    )
    assert not torch.isnan(got[1, 1]) and torch.isnan(got[3, 0]), "the scenario's premise"
    finite = torch.isfinite(want)
    assert_close(got[finite].to(dtype), want[finite].float(), reduction=64)


def test_debug_checks_catch_invalid_meta_in_products():
    """DLLM_DEBUG_CHECKS=1 (read at import) makes the products check meta's values (decompress_24 always
    does)."""
    code = """
        import torch, dllm_kernels
        values, meta = dllm_kernels.compress_24(torch.randn(8, 32))
        bad, x = torch.zeros_like(meta), torch.randn(2, 32)
        eye = lambda n: torch.eye(n)[None]
        calls = {"sparse24_mm": (x, values, bad), "armor_linear": (x, eye(32), values, bad, eye(8))}
        for op, args in calls.items():
            try:
                getattr(dllm_kernels, op)(*args)
                print(op, "no error")
            except ValueError as e:
                print(str(e).split(";")[0])
    """
    result = python(code, DLLM_DEBUG_CHECKS="1")
    assert result.returncode == 0, result.stderr
    rule = "meta must hold, for every group of 4, the code i0 | i1 << 2 of two kept positions i0 < i1"
    assert result.stdout.splitlines() == [f"dllm::sparse24_mm: {rule}", f"dllm::armor_linear: {rule}"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":")[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.parametrize(
    "disabled, needs",
    [("", {"amx_bf16", "avx512_vbmi2"}), ("amx", {"avx512_bf16"}), ("amx,avx512bf16", set())],
    ids=["amx tiles", "vdpbf16ps pairs", "fp32 permute"],
)
def test_every_cpu_path_of_the_bf16_product(disabled, needs):
    """The CPU product's bf16 paths for 8+ rows of x (the tile unit, vdpbf16ps pairs, the fp32 permute path),
    each forced with DLLM_CPU_DISABLE where this machine has its instructions, against the reference:
    non-finite x, no bias, a strided x. Every path sums in fp32, so outputs agree to the last bf16 place."""
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - _cpu_flags())}")
    code = """
        import math, torch, dllm_kernels
        from dllm_kernels.reference import sparse24 as reference
        torch.manual_seed(SEED)
        for m, n, k in ((8, 72, 512), (16, 40, 1024), (19, 33, 512), (33, 64, 2048)):
            values, meta = dllm_kernels.compress_24(torch.randn(n, k).bfloat16())
            wide = torch.randn(m, k + 48).bfloat16()
            for x, bias in ((wide[:, :k].clone(), torch.randn(n).bfloat16()), (wide[:, 16 : k + 16], None)):
                for poison in (False, True):
                    if poison:
                        x[1, 5], x[2, 6] = math.nan, math.inf
                    got = dllm_kernels.sparse24_mm(x, values, meta, bias).float()
                    want = reference.sparse24_mm(x, values, meta, bias).float()
                    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
                    finite = want.isfinite()
                    torch.testing.assert_close(got[finite], want[finite], rtol=2**-7, atol=1e-2)
        print("ok")
    """.replace("SEED", str(torch.randint(2**31, ()).item()))
    result = python(code, DLLM_CPU_DISABLE=disabled)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (0, 0)], ids=str)
def test_empty_weights(shape):
    weight = torch.randn(shape)
    mask = dllm_kernels.prune_24(weight)
    assert mask.shape == shape
    for given in (None, mask):
        values, meta = dllm_kernels.compress_24(weight, given)
        assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 16)
        assert torch.equal(dllm_kernels.decompress_24(values, meta), weight)


def test_sparse24_linear_module_round_trips():
    linear = torch.nn.Linear(64, 48)
    module = Sparse24Linear.from_linear(linear)
    x = torch.randn(7, 64)
    mask = dllm_kernels.prune_24(linear.weight.detach())
    expected = torch.nn.functional.linear(x, linear.weight.detach() * mask, linear.bias.detach())
    assert_close(module(x), expected)
    clone = Sparse24Linear(64, 48)
    clone.load_state_dict(module.state_dict())
    assert torch.equal(clone(x), module(x))
    assert set(module.state_dict()) == {"values", "meta", "bias"}
    # a score (or a mask) picks the kept pattern instead of |w|
    plain = torch.nn.Linear(32, 16, bias=False)
    score = torch.rand(16, 32)
    no_bias = Sparse24Linear.from_linear(plain, score=score)
    kept = dllm_kernels.prune_24(plain.weight.detach(), score)
    assert no_bias.bias is None and not torch.equal(kept, dllm_kernels.prune_24(plain.weight.detach()))
    x = torch.randn(2, 32)
    assert_close(no_bias(x), x @ (plain.weight.detach() * kept).T)
    by_mask = Sparse24Linear.from_linear(plain, mask=kept)
    assert torch.equal(by_mask.values, no_bias.values) and torch.equal(by_mask.meta, no_bias.meta)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_k_gives_bias(backend):
    """K = 0: an empty sum, so the output is the bias (or 0), never uninitialised memory."""
    x, bias = torch.randn(3, 0), torch.randn(5)
    values, meta = torch.empty(5, 0), torch.empty(5, 0, dtype=torch.int16)
    reason = dispatchers["sparse24_mm"].why_not(backend, x.device, x, values, meta, bias, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        assert torch.equal(dllm_kernels.sparse24_mm(x, values, meta, bias), bias.expand(3, 5))
        assert torch.equal(dllm_kernels.sparse24_mm(x, values, meta), torch.zeros(3, 5))


def test_sparse24_linear_errors():
    with pytest.raises(ValueError, match=r"^dllm::Sparse24Linear: in_features must be a multiple of 16"):
        Sparse24Linear(24, 8)
    with pytest.raises(TypeError, match=r"^dllm::Sparse24Linear: dtype must be .*; got torch.float64"):
        Sparse24Linear(16, 8, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"^dllm::Sparse24Linear: from_linear takes a torch.nn.Linear; got Conv1d"
    ):
        Sparse24Linear.from_linear(torch.nn.Conv1d(16, 8, 1))


def test_opcheck_and_compile():
    weight, mask, values, meta = pruned(32, 64)
    x, bias = torch.randn(3, 64), torch.randn(32)
    checks = (
        ("prune_24", (weight,)),
        ("compress_24", (weight, mask)),
        ("decompress_24", (values, meta)),
        ("sparse24_mm", (x, values, meta, bias)),
        ("armor_linear", (x, torch.randn(4, 16, 16), values, meta, torch.randn(2, 16, 16), bias)),
    )
    for name, args in checks:
        torch.library.opcheck(getattr(torch.ops.dllm, name).default, args)

    @torch.compile(fullgraph=True)
    def layer(x):
        return torch.relu(dllm_kernels.sparse24_mm(x, values, meta, bias))

    assert_close(layer(x), torch.relu(reference.sparse24_mm(x, values, meta, bias)))


def _bad_calls():
    w = torch.randn(8, 32)
    m = dllm_kernels.prune_24(w)
    v, meta = dllm_kernels.compress_24(w, m)
    x = torch.randn(2, 32)
    three_of_four = m.clone()
    three_of_four[1, 4:8] = torch.tensor([True, True, True, False])
    wrap = torch.randn(2, 16, 16)
    return {
        "K not a multiple of 16": (
            "compress_24",
            (torch.randn(8, 24),),
            RuntimeError,
            "K must be a multiple of 16",
        ),
        "mask not 2 of 4": (
            "compress_24",
            (w, three_of_four),
            ValueError,
            "row 1, group 1 (columns 4..7) keeps 3",
        ),
        "score dtype": ("prune_24", (w, torch.ones(8, 32, dtype=torch.int32)), TypeError, "score must be"),
        "meta dtype": ("decompress_24", (v, meta.int()), TypeError, "meta must be int16; got int32"),
        "meta shape": ("decompress_24", (v, meta[:, :1]), RuntimeError, "meta must have shape [8, 2]"),
        "x last dim": (
            "sparse24_mm",
            (torch.randn(2, 16), v, meta),
            RuntimeError,
            "x must have shape [..., K]",
        ),
        "bias length": (
            "sparse24_mm",
            (x, v, meta, torch.randn(7)),
            RuntimeError,
            "bias must have shape [8]",
        ),
        "dtypes differ": ("sparse24_mm", (x.half(), v, meta), TypeError, "x must have the weight's dtype"),
        "wrap_in blocks": (
            "armor_linear",
            (x, torch.randn(3, 10, 10), v, meta, wrap[:1, :8, :8]),
            RuntimeError,
            "wrap_in's blocks must tile 32 exactly",
        ),
        "wrap_out blocks": (
            "armor_linear",
            (x, wrap, v, meta, torch.randn(1, 6, 6)),
            RuntimeError,
            "wrap_out's blocks must tile 8 exactly",
        ),
        "repeated index in meta": (
            "decompress_24",
            (v, torch.zeros_like(meta)),
            ValueError,
            "row 0, group 0 (columns 0..3) has code 0x0 (i0 = 0, i1 = 0)",
        ),
        "descending pair in meta": (
            "decompress_24",
            (
                v,
                meta.clone().index_put_(
                    (torch.tensor([3]), torch.tensor([1])), torch.tensor(0x4441, dtype=torch.int16)
                ),
            ),
            ValueError,
            "row 3, group 4 (columns 16..19) has code 0x1 (i0 = 1, i1 = 0)",
        ),
        "None weight": ("compress_24", (None,), TypeError, "weight must be a Tensor; got NoneType"),
        "None x": ("sparse24_mm", (None, v, meta), TypeError, "x must be a Tensor; got NoneType"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_messages(case):
    op, args, exc, fragment = _bad_calls()[case]
    with pytest.raises(exc) as info:
        getattr(dllm_kernels, op)(*args)
    message = str(info.value)
    assert message.startswith(f"dllm::{op}: "), message
    assert fragment in message, message


@pytest.mark.parametrize("part", range(2))
def test_cuda_kernel_under_host_emulation(part, summary):
    """csrc/cuda/sparse24_mm.cu compiled for the host with its PTX emulated (tests/cuda_emulation): every tile
    shape, split, load path and dtype against the reference."""
    code, report = run_cuda_emulation("sparse24_mm", part, 2)
    assert code == 0, report
    summary("sparse24_mm CUDA emulation", report.splitlines()[-1])


@pytest.mark.gpu
def test_cuda_kernel_on_the_emulated_cases():
    """The real kernels on every case the host emulation runs (tests/cuda_emulation): the first GPU run
    checks what the emulation could not, the hardware itself."""
    run_emulated_cases_on_gpu("sparse24_mm")
