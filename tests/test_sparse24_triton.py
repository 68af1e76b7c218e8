"""2:4 sparsity in Triton (interpreter on CPU, the GPU where there is one) and the bridge to PyTorch's
semi-structured tensor (dllm_kernels.sparse24): products against the reference over small shapes with
tails in every tile dimension, forced and automatic split K, the launch rule, and the exact format
conversion both ways."""

import pytest
import torch
from helpers import assert_close

import dllm_kernels
from dllm_kernels import available_backends, use_backend
from dllm_kernels import sparse24 as s24
from dllm_kernels.ops.sparse24 import dispatchers
from dllm_kernels.reference import sparse24 as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, K) and the block sizes of wrap_in (along K) and wrap_out (along N) used with them
SHAPES = {(16, 16): (8, 16), (48, 64): (32, 16), (64, 128): (64, 32)}
ROWS = [1, 3, 16, 19]
PROTOTYPE = "ignore:The PyTorch API of SparseSemiStructuredTensor:UserWarning"


@pytest.fixture(scope="module")
def kernels():
    status = available_backends()["triton"]
    if not status.available:
        pytest.skip(str(status))
    from dllm_kernels.triton_kernels import sparse24_mm

    return sparse24_mm


def pruned(n, k, dtype, device=DEVICE):
    weight = torch.randn(n, k, device=device).to(dtype)
    return dllm_kernels.compress_24(weight, dllm_kernels.prune_24(weight))


def _inputs(m, n, k, dtype):
    values, meta = pruned(n, k, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    return x, values, meta, bias


def _wraps(n, k, dtype):
    bs_in, bs_out = SHAPES[(n, k)]
    wrap_in = (torch.randn(k // bs_in, bs_in, bs_in, device=DEVICE) / bs_in**0.5).to(dtype)
    wrap_out = (torch.randn(n // bs_out, bs_out, bs_out, device=DEVICE) / bs_out**0.5).to(dtype)
    return wrap_in, wrap_out


@pytest.mark.interpreter
@pytest.mark.parametrize("splits", [None, 2, 3], ids=lambda s: f"splits={s}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=lambda s: f"N{s[0]}K{s[1]}")
@pytest.mark.parametrize("m", ROWS)
def test_sparse24_mm_matches_reference(kernels, m, shape, dtype, splits):
    n, k = shape
    x, values, meta, bias = _inputs(m, n, k, dtype)
    for b in (bias, None):
        got = kernels.sparse24_mm(x, values, meta, b, num_splits=splits)
        assert got.dtype == dtype and got.shape == (m, n)
        assert_close(got, reference.sparse24_mm(x, values, meta, b))
    if splits is not None:  # the two-pass split K adds the splits in a fixed order: bitwise repeatable
        again = kernels.sparse24_mm(x, values, meta, bias, num_splits=splits)
        assert torch.equal(again, kernels.sparse24_mm(x, values, meta, bias, num_splits=splits))
    else:  # through the op: leading dims, a row stride other than K, a non-unit last stride
        wide = torch.randn(2, m, k + 16, device=DEVICE).to(dtype)
        every_other = torch.randn(m, 2 * k, device=DEVICE).to(dtype)
        with use_backend("triton"):
            for xs in (x.view(1, m, 1, k), wide[1, :, 16:], every_other[:, ::2]):
                got = dllm_kernels.sparse24_mm(xs, values, meta, bias)
                assert got.shape == (*xs.shape[:-1], n)
                assert_close(got, reference.sparse24_mm(xs, values, meta, bias))


@pytest.mark.interpreter
@pytest.mark.parametrize("splits", [None, 3], ids=lambda s: f"splits={s}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=lambda s: f"N{s[0]}K{s[1]}")
@pytest.mark.parametrize("m", ROWS)
def test_armor_linear_matches_reference(kernels, m, shape, dtype, splits):
    n, k = shape
    x, values, meta, bias = _inputs(m, n, k, dtype)
    wrap_in, wrap_out = _wraps(n, k, dtype)
    for b in (bias, None):
        args = (x, wrap_in, values, meta, wrap_out, b)
        got = kernels.armor_linear(*args, num_splits=splits)
        assert got.dtype == dtype and got.shape == (m, n)
        assert_close(got, reference.armor_linear(*args))
    if splits is None:
        with use_backend("triton"):
            got = dllm_kernels.armor_linear(x.view(m, 1, k), wrap_in, values, meta, wrap_out, bias)
        assert got.shape == (m, 1, n)
        assert_close(got, reference.armor_linear(x.view(m, 1, k), wrap_in, values, meta, wrap_out, bias))


@pytest.mark.interpreter
@pytest.mark.parametrize("splits", [None, 2])
def test_bf16(kernels, splits):
    """bf16 tiles are widened at the load under the interpreter and rounded to nearest even at the store."""
    x, values, meta, bias = _inputs(5, 48, 128, torch.bfloat16)
    wrap_in, wrap_out = _wraps(48, 64, torch.bfloat16)
    assert_close(
        kernels.sparse24_mm(x, values, meta, bias, num_splits=splits),
        reference.sparse24_mm(x, values, meta, bias),
    )
    x, values, meta, bias = _inputs(5, 48, 64, torch.bfloat16)
    args = (x, wrap_in, values, meta, wrap_out, bias)
    assert_close(kernels.armor_linear(*args, num_splits=splits), reference.armor_linear(*args))


@pytest.mark.interpreter
def test_armor_declines_wrap_out_blocks_it_cannot_fuse(kernels):
    x, values, meta, bias = _inputs(2, 48, 64, torch.float32)
    wrap_in = torch.randn(2, 32, 32, device=DEVICE)
    for wrap_out in (torch.randn(1, 48, 48, device=DEVICE), torch.randn(2, 24, 24, device=DEVICE)):
        args = (x, wrap_in, values, meta, wrap_out, bias)
        reason = dispatchers["armor_linear"].why_not("triton", x.device, *args, explicit=True)
        assert reason is not None and "power of two" in reason
        with use_backend("triton"), pytest.raises(RuntimeError, match="power of two"):
            dllm_kernels.armor_linear(*args)
    x, values, meta, bias = _inputs(1, 256, 16, torch.float32)
    big = torch.randn(1, 256, 256, device=DEVICE)
    args = (x, wrap_in[:, :16, :16], values, meta, big)
    reason = dispatchers["armor_linear"].why_not("triton", x.device, *args, explicit=True)
    assert reason is not None and "up to 128" in reason


def test_empty_and_k0(kernels):
    values, meta = pruned(32, 16, torch.float32)
    assert kernels.sparse24_mm(torch.randn(0, 16, device=DEVICE), values, meta).shape == (0, 32)
    bias = torch.randn(8, device=DEVICE)
    empty = torch.empty(8, 0, device=DEVICE)
    got = kernels.sparse24_mm(torch.randn(3, 0, device=DEVICE), empty, empty.short(), bias)
    assert torch.equal(got, bias.expand(3, 8))
    with use_backend("triton"):
        got = dllm_kernels.sparse24_mm(torch.randn(2, 3, 0, device=DEVICE), empty, empty.short(), bias)
    assert torch.equal(got, bias.expand(2, 3, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_launch_rule_fills_an_h200_at_decode(kernels, monkeypatch, dtype):
    """Metadata only: decode products of 7B-class layers give each of 132 SMs two or more programs (one
    for a 1024-row GQA projection); each split is whole K tiles, non-empty; prefill-sized M does not split."""
    monkeypatch.setattr(kernels, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    for m in (1, 4, 16):
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096)):
            block_m, block_n, block_k, *_ = kernels._tiles(m, dtype, 0, cuda)
            splits, chunk, bk = kernels._plan(m, n, k, block_m, block_n, block_k, cuda)
            tiles = triton_cdiv(m, block_m) * triton_cdiv(n, block_n)
            assert bk == block_k and chunk % block_k == 0 and (splits - 1) * chunk < k <= splits * chunk
            assert tiles * splits >= (2 if n >= 4096 else 1) * 132, (m, n, k, tiles, splits)
            assert chunk >= kernels._MIN_K_TILES_PER_SPLIT * block_k or splits == 1
    block_m, block_n, block_k, *_ = kernels._tiles(4096, dtype, 0, cuda)
    assert kernels._plan(4096, 4096, 4096, block_m, block_n, block_k, cuda)[0] == 1
    # wrap_out blocks widen the N tile to hold whole blocks
    assert kernels._tiles(1, dtype, 128, cuda)[1] == 128


def triton_cdiv(a, b):
    return -(-a // b)


# ---- the bridge to PyTorch's semi-structured tensor (no GPU needed: the tensor is built on CPU) ----

TORCH_SHAPES = [(32, 64), (64, 128), (96, 192)]


@pytest.mark.filterwarnings(PROTOTYPE)
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=lambda s: f"N{s[0]}K{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_meta_reordering_matches_torch_cutlass(dtype, shape):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    n, k = shape
    weight = torch.randn(n, k).to(dtype)
    weight[weight == 0] = 1.0  # torch derives the pattern from nonzeros: give it exactly the kept ones
    mask = dllm_kernels.prune_24(weight)
    values, meta = dllm_kernels.compress_24(weight, mask)
    torch_values, torch_meta = sparse_semi_structured_from_dense_cutlass(weight * mask)
    tensor = s24.to_torch_semi_structured(values, meta)
    assert isinstance(tensor, torch.sparse.SparseSemiStructuredTensorCUTLASS)
    assert tensor.shape == (n, k) and tensor.dtype == dtype and tensor.device.type == "cpu"
    assert torch.equal(tensor.packed, torch_values) and torch.equal(tensor.packed, values)
    assert tensor.meta.dtype == torch.int16 and torch.equal(tensor.meta, torch_meta)
    assert tensor.packed.data_ptr() == values.data_ptr()  # no copy of the values
    back_values, back_meta = s24.from_torch_semi_structured(tensor)
    assert torch.equal(back_values, values) and torch.equal(back_meta, meta)


@pytest.mark.filterwarnings(PROTOTYPE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_round_trip_keeps_kept_zeros(dtype):
    """The pattern travels in meta, never through nonzeros: kept exact zeros (and -0.0) stay kept."""
    n, k = 64, 128
    weight = torch.randn(n, k).to(dtype)
    mask = dllm_kernels.prune_24(weight)
    weight[mask & (torch.rand(n, k) < 0.2)] = 0.0
    weight[0, :4] = torch.tensor([-0.0, 0.0, 1.0, 2.0]).to(dtype)
    mask[0, :4] = torch.tensor([True, True, False, False])
    values, meta = dllm_kernels.compress_24(weight, mask)
    tensor = s24.to_torch_semi_structured(values, meta)
    back_values, back_meta = s24.from_torch_semi_structured(tensor)
    assert torch.equal(back_meta, meta)
    assert torch.equal(back_values.view(torch.int16), values.view(torch.int16))  # bitwise, -0.0 included
    assert torch.equal(tensor.to_dense(), weight * mask)  # torch's own decompression of our meta


def test_public_module_reexports_the_ops():
    for name in ("prune_24", "compress_24", "decompress_24", "sparse24_mm", "armor_linear"):
        assert getattr(s24, name) is getattr(dllm_kernels, name)


@pytest.mark.filterwarnings(PROTOTYPE)
def test_bridge_errors():
    def raises(exc, op, fragment):
        return pytest.raises(exc, match=f"^dllm::{op}: .*{fragment}")

    to, back = "to_torch_semi_structured", "from_torch_semi_structured"
    values, meta = pruned(64, 128, torch.float32, "cpu")
    with raises(TypeError, to, "float16 / bfloat16; got float32 \\(its float32 is 1:2\\)"):
        s24.to_torch_semi_structured(values, meta)
    values, meta = pruned(48, 128, torch.float16, "cpu")
    with raises(RuntimeError, to, "N a multiple of 32 and K a multiple of 64; got a \\[48, 128\\] weight"):
        s24.to_torch_semi_structured(values, meta)
    values, meta = pruned(64, 32, torch.float16, "cpu")
    with raises(RuntimeError, to, "got a \\[64, 32\\] weight"):
        s24.to_torch_semi_structured(values, meta)
    with raises(TypeError, to, "meta must be int16; got int32"):
        s24.to_torch_semi_structured(values, meta.int())
    with raises(RuntimeError, to, "meta must have shape \\[64, 2\\]"):
        s24.to_torch_semi_structured(values, meta[:, :1])
    with raises(RuntimeError, to, "values must be a 2-dim tensor; got list"):
        s24.to_torch_semi_structured([1.0], meta)
    with raises(TypeError, back, "SparseSemiStructuredTensorCUTLASS; got Tensor"):
        s24.from_torch_semi_structured(torch.randn(32, 64))
    values, meta = pruned(64, 128, torch.float16, "cpu")
    with raises(ValueError, to, "row 0, group 0 \\(columns 0..3\\) has code 0x0"):
        s24.to_torch_semi_structured(values, torch.zeros_like(meta))
    tensor = s24.to_torch_semi_structured(values, meta)
    tensor.meta.zero_()  # a corrupted CUTLASS tensor
    with raises(ValueError, back, "has code 0x0 \\(i0 = 0, i1 = 0\\)"):
        s24.from_torch_semi_structured(tensor)


@pytest.mark.gpu
@pytest.mark.filterwarnings(PROTOTYPE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_semi_structured_on_gpu(dtype):
    values, meta = pruned(128, 256, dtype, "cuda")
    weight = dllm_kernels.decompress_24(values, meta)
    tensor = s24.to_torch_semi_structured(values, meta)
    assert tensor.is_cuda and torch.equal(tensor.to_dense(), weight)
    # torch's own CUTLASS compression of the same weight reads back to ours (when no kept value is 0)
    if (weight.view(128, -1, 4) != 0).sum(-1).eq(2).all():
        from_torch = torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(weight)
        back_values, back_meta = s24.from_torch_semi_structured(from_torch)
        assert torch.equal(back_values, values) and torch.equal(back_meta, meta)
    if torch.cuda.get_device_capability()[0] == 8:  # PyTorch's CUTLASS 2:4 GEMM: sm8x only
        x = torch.randn(16, 256, device="cuda", dtype=dtype)
        assert_close(torch.nn.functional.linear(x, tensor), reference.sparse24_mm(x, values, meta))
