"""The 2:4 semi-structured ops (docs/ops.md#24-semi-structured-sparsity): ``dllm::prune_24``, ``compress_24``,
``decompress_24``, ``sparse24_mm``, ``armor_linear``, for decode-time linear layers. The format is described
in ``dllm_kernels/reference/sparse24.py``."""

import torch

from .. import _extension
from .._backends import DEBUG_CHECKS, define_op
from ..reference import sparse24 as reference
from ._common import FLOAT_DTYPES, OpError, describe

OPS = ("prune_24", "compress_24", "decompress_24", "sparse24_mm", "armor_linear")
_err = {name: OpError(name) for name in OPS}


def prune_24(weight: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[N, K]`` mask keeping, in every group of 4 along K, the 2 largest ``|weight|`` (or ``score``);
    ties keep the lower index. ``weight`` fp16 / bf16 / fp32 ``[N, K]``, ``K % 16 == 0``."""
    return torch.ops.dllm.prune_24(weight, score)


def compress_24(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, K/2], meta int16 [N, K/16])`` of ``weight`` under ``mask`` (default: ``prune_24``).
    The pattern comes from the mask, never from the values: kept exact zeros (and ``-0.0``) stay kept. A mask
    that does not keep exactly 2 of every 4 is an error."""
    return torch.ops.dllm.compress_24(weight, mask)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense ``[N, K]`` weight: the kept elements in place, zeros elsewhere, so that
    ``decompress_24(*compress_24(w, m))`` equals ``w`` where ``m`` and 0 elsewhere, bit for bit."""
    return torch.ops.dllm.decompress_24(values, meta)


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ decompress_24(values, meta).T + bias`` for ``x [..., K]``: fp32 accumulation, x's dtype out.
    At small M (decode) it reads 9/16 of the dense weight's bytes."""
    return torch.ops.dllm.sparse24_mm(x, values, meta, bias)


def armor_linear(x, wrap_in, values, meta, wrap_out, bias=None):
    """ARMOR's factorised layer ``y = blockdiag(wrap_out) . S . blockdiag(wrap_in) . x (+ bias)`` per row
    of x: ``S`` the 2:4 core (values, meta), ``wrap_in [K/bs, bs, bs]`` applied first, ``wrap_out
    [N/bs', bs', bs']`` last."""
    return torch.ops.dllm.armor_linear(x, wrap_in, values, meta, wrap_out, bias)


def _weight_like(err, name, t, dtypes=FLOAT_DTYPES):
    err.tensor(name, t)
    if t.dim() != 2:
        err(f"{name} must be a 2-dim tensor; got {describe(t)}")
    err.dtype(name, t, dtypes)


def _check_k(err, k):
    if k % 16:
        err(f"K must be a multiple of 16; got K = {k}")


def _check_format(err, values, meta):
    """values [N, K/2] float, meta int16 [N, K/16] on the same device; returns (N, K)."""
    _weight_like(err, "values", values)
    _weight_like(err, "meta", meta, (torch.int16,))
    n, half = values.shape
    if half % 8:
        err(f"values must have K/2 columns with K a multiple of 16; got {half} columns")
    err.shape("meta", meta, (n, half // 8), " ([N, K/16] for values [N, K/2])")
    err.same_device("meta", meta, "values", values)
    return n, 2 * half


def _check_bias(err, bias, n, x):
    if bias is not None:
        err.tensor("bias", bias)
        err.shape("bias", bias, (n,), " ([N])")
        err.same_dtype("bias", bias, "x", x)
        err.same_device("bias", bias, "x", x)


def _check_x(err, x, values, k):
    err.tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != k:
        err(f"x must have shape [..., K] with K = {k}; got {describe(x)}")
    err.same_dtype("x", x, "the weight", values)
    err.same_device("x", x, "values", values)


def _prune_args(weight, score=None):
    err = _err["prune_24"]
    _weight_like(err, "weight", weight)
    _check_k(err, weight.shape[1])
    if score is not None:
        err.dtype("score", score, FLOAT_DTYPES)
        err.shape("score", score, weight.shape, " (the shape of weight)")
        err.same_device("score", score, "weight", weight)
    return weight, score


def _compress_args(weight, mask=None):
    err = _err["compress_24"]
    _weight_like(err, "weight", weight)
    _check_k(err, weight.shape[1])
    if mask is not None:
        err.dtype("mask", mask, (torch.bool,))
        err.shape("mask", mask, weight.shape, " (the shape of weight)")
        err.same_device("mask", mask, "weight", weight)
    return weight, mask


def _decompress_args(values, meta):
    _check_format(_err["decompress_24"], values, meta)
    return values, meta


def _mm_args(x, values, meta, bias=None):
    err = _err["sparse24_mm"]
    n, k = _check_format(err, values, meta)
    _check_x(err, x, values, k)
    _check_bias(err, bias, n, x)
    return x, values, meta, bias


def _wrap(err, name, blocks, size, x):
    err.tensor(name, blocks)
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        err(f"{name} must be [n_blocks, bs, bs]; got {describe(blocks)}")
    n_blocks, bs = blocks.shape[0], blocks.shape[1]
    if bs == 0 or n_blocks * bs != size:
        err(f"{name}'s blocks must tile {size} exactly ([{size} / bs, bs, bs]); got {list(blocks.shape)}")
    err.same_dtype(name, blocks, "x", x)


def _armor_args(x, wrap_in, values, meta, wrap_out, bias=None):
    err = _err["armor_linear"]
    n, k = _check_format(err, values, meta)
    _check_x(err, x, values, k)
    _wrap(err, "wrap_in", wrap_in, k, x)
    _wrap(err, "wrap_out", wrap_out, n, x)
    for name, t in (("wrap_in", wrap_in), ("wrap_out", wrap_out)):
        err.same_device(name, t, "x", x)
    _check_bias(err, bias, n, x)
    return x, wrap_in, values, meta, wrap_out, bias


def _check_mask_values(mask):
    """compress_24's mask must keep exactly 2 of every 4 (read in the real kernel only; an offline op)."""
    per_group = mask.reshape(mask.shape[0], mask.shape[1] // 4, 4).sum(-1)
    bad = (per_group != 2).nonzero()
    if bad.numel():
        row, group = bad[0].tolist()
        _err["compress_24"](
            f"mask must keep exactly 2 of every 4 consecutive elements along K; row {row}, group {group} "
            f"(columns {4 * group}..{4 * group + 3}) keeps {int(per_group[row, group])}",
            ValueError,
        )


def check_meta_values(err, meta):
    """Every 4-bit code of meta must name two distinct kept positions ``i0 < i1`` (a host sync on a GPU)."""
    codes = reference.nibbles(meta)
    bad = (codes & 3 >= codes >> 2).nonzero()
    if bad.numel():
        row, group = bad[0].tolist()
        code = int(codes[row, group])
        err(
            f"meta must hold, for every group of 4, the code i0 | i1 << 2 of two kept positions i0 < i1; "
            f"row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has code {code:#x} "
            f"(i0 = {code & 3}, i1 = {code >> 2})",
            ValueError,
        )


def _out_rows(x, values):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _compress_prepare(weight, mask):
    if mask is None:
        mask = reference.prune_24(weight)
    else:
        _check_mask_values(mask)
    return weight, mask


def _decompress_prepare(values, meta):
    check_meta_values(_err["decompress_24"], meta)
    return values, meta


def _debug_meta_check(name):
    """prepare for a product: meta's values checked only under DLLM_DEBUG_CHECKS=1 (a full read of meta and
    a host sync on a GPU; decompress_24, an offline op, always checks)."""

    def prepare(*arguments):
        if DEBUG_CHECKS:
            check_meta_values(_err[name], arguments[3 if name == "armor_linear" else 2])
        return arguments

    return prepare


dispatchers = {
    "prune_24": define_op("prune_24", _prune_args, lambda w, s: w.new_empty(w.shape, dtype=torch.bool)),
    "compress_24": define_op(
        "compress_24",
        _compress_args,
        lambda w, m: (
            w.new_empty((w.shape[0], w.shape[1] // 2)),
            w.new_empty((w.shape[0], w.shape[1] // 16), dtype=torch.int16),
        ),
        _compress_prepare,
    ),
    "decompress_24": define_op(
        "decompress_24",
        _decompress_args,
        lambda v, m: v.new_empty((v.shape[0], 2 * v.shape[1])),
        _decompress_prepare,
    ),
    "sparse24_mm": define_op(
        "sparse24_mm", _mm_args, lambda x, v, m, b: _out_rows(x, v), _debug_meta_check("sparse24_mm")
    ),
    "armor_linear": define_op(
        "armor_linear",
        _armor_args,
        lambda x, wi, v, m, wo, b: _out_rows(x, v),
        _debug_meta_check("armor_linear"),
    ),
}

dispatchers["prune_24"].register("reference")(reference.prune_24)
dispatchers["compress_24"].register("reference")(reference.compress_24)
dispatchers["decompress_24"].register("reference")(reference.decompress_24)
dispatchers["sparse24_mm"].register("reference")(reference.sparse24_mm)
dispatchers["armor_linear"].register("reference")(reference.armor_linear)


def _rows_2d(x):
    """x ``[..., K]`` as ``[M, K]`` with unit last stride (a view where it can be)."""
    x2d = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not -1: K may be 0
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _compiled_mm(x, values, meta, bias=None):
    """The cpu and cuda providers: the compiled kernel on x's device."""
    return _extension._C.sparse24_mm_run(x, values, meta, bias)


for _backend in ("cpu", "cuda"):
    dispatchers["sparse24_mm"].register(_backend)(_compiled_mm)


@dispatchers["armor_linear"].register("cpu")
def _cpu_armor(x, wrap_in, values, meta, wrap_out, bias=None):
    """The reference's composition in C++ (csrc/torch/sparse24_mm.cpp), the sparse product in the CPU kernel
    on the fp32 inner product: nothing is rounded between the three products."""
    return _extension._C.armor_linear_run(x, wrap_in, values, meta, wrap_out, bias)


def _cuda_armor_supports(x, wrap_in, values, meta, wrap_out, bias=None):
    block = wrap_out.shape[1]
    if block & (block - 1) or block > 256:
        return f"cuda takes wrap_out blocks of a power of two up to 256; got {block}"
    return None


@dispatchers["armor_linear"].register("cuda", supports=_cuda_armor_supports)
def _cuda_armor(x, wrap_in, values, meta, wrap_out, bias=None):
    """csrc/cuda/sparse24_mm.cu: blockdiag(wrap_in) as hi + lo 16-bit rows, the mma.sp product with
    blockdiag(wrap_out) and bias in its epilogue (after the split-K reduction when K is split)."""
    return _extension._C.armor_linear_cuda_run(x, wrap_in, values, meta, wrap_out, bias)


def _triton_armor_supports(x, wrap_in, values, meta, wrap_out, bias=None):
    from ..triton_kernels.sparse24_mm import fused_wrap_supported

    return fused_wrap_supported(wrap_out.shape[1])


@dispatchers["sparse24_mm"].register("triton")
def _triton_mm(x, values, meta, bias=None):
    from ..triton_kernels.sparse24_mm import sparse24_mm as launch

    return launch(_rows_2d(x), values, meta, bias).reshape(*x.shape[:-1], values.shape[0])


@dispatchers["armor_linear"].register("triton", supports=_triton_armor_supports)
def _triton_armor(x, wrap_in, values, meta, wrap_out, bias=None):
    from ..triton_kernels.sparse24_mm import armor_linear as launch

    out = launch(_rows_2d(x), wrap_in, values, meta, wrap_out, bias)
    return out.reshape(*x.shape[:-1], values.shape[0])
