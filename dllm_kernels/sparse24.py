"""2:4 semi-structured sparsity: the ops (docs/ops.md) and a bridge to PyTorch's semi-structured tensor.

``prune_24``, ``compress_24``, ``decompress_24``, ``sparse24_mm`` and ``armor_linear`` are the ops of
``dllm_kernels.ops.sparse24``. ``to_torch_semi_structured(values, meta)`` hands a compressed weight to
PyTorch's ``SparseSemiStructuredTensorCUTLASS`` (``F.linear(x, tensor)`` then runs PyTorch's CUTLASS
2:4 GEMM, on the GPUs PyTorch supports it on: sm8x) and ``from_torch_semi_structured(tensor)`` reads such
a tensor back.

The two formats. PyTorch's CUTLASS layout (``torch/sparse/_semi_structured_conversions.py``) keeps, for
fp16 / bf16, exactly our ``values [N, K/2]`` (the kept elements of each group of 4, in order) and the
same 4-bit codes ``i0 | i1 << 2`` packed four to an int16 in the same bit order: our ``meta [N, K/16]``
is the matrix it builds before its last step, which scatters the int16s to the positions CUTLASS's
interleaved column-major metadata layout reads them from. The conversion is that scatter (and its
inverse a gather) on the int16s; the kept pattern is never re-derived from nonzeros, so kept exact zeros
stay kept (PyTorch's ``from_dense`` would choose other positions for them). fp32 is excluded: PyTorch's
fp32 CUTLASS format is 1:2 on pairs, not 2:4.
"""

import torch

from .ops._common import OpError, describe
from .ops.sparse24 import (
    armor_linear,
    check_meta_values,
    compress_24,
    decompress_24,
    prune_24,
    sparse24_mm,
)

__all__ = [
    "armor_linear",
    "compress_24",
    "decompress_24",
    "from_torch_semi_structured",
    "prune_24",
    "sparse24_mm",
    "to_torch_semi_structured",
]

_TORCH_DTYPES = (torch.float16, torch.bfloat16)
_to_err = OpError("to_torch_semi_structured")
_from_err = OpError("from_torch_semi_structured")


def _cutlass_class():
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUTLASS


def _scatter_offsets(n: int, meta_cols: int, device: torch.device) -> torch.Tensor:
    """Flat position in PyTorch's reordered meta of each element of our ``[N, K/16]`` meta (row major).

    PyTorch's private helper is reused on purpose: it *defines* the target layout (CUTLASS's
    ColumnMajorInterleaved<2> metadata with its row interleave and 2x2 swizzle, for int16 meta), so a
    re-derivation here could only drift from what ``torch._sparse_semi_structured_linear`` reads."""
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    return _calculate_meta_reordering_scatter_offsets(n, meta_cols, torch.int16, device)


def _check_shape(err: OpError, n: int, k: int, dtype: torch.dtype):
    if dtype not in _TORCH_DTYPES:
        name = str(dtype).removeprefix("torch.")
        err(
            f"PyTorch's CUTLASS 2:4 format takes float16 / bfloat16; got {name} (its float32 is 1:2)",
            TypeError,
        )
    limits = _cutlass_class()._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    if n < rows or n % rows or k < cols or k % cols:
        err(
            f"PyTorch's CUTLASS 2:4 format needs N a multiple of {rows} and K a multiple of {cols}; "
            f"got a [{n}, {k}] weight"
        )


def to_torch_semi_structured(values: torch.Tensor, meta: torch.Tensor, *, requires_grad: bool = False):
    """A ``torch.sparse.SparseSemiStructuredTensorCUTLASS`` of shape ``[N, K]`` holding the weight of
    ``(values [N, K/2], meta int16 [N, K/16])`` (fp16 / bf16; N a multiple of 32, K of 64, as PyTorch
    requires). Its ``packed`` is ``values`` itself (no copy when contiguous), its ``meta`` our meta in
    CUTLASS's order. The tensor can be built on any device; PyTorch's sparse GEMM runs it on CUDA sm8x."""
    for name, t in (("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            _to_err(f"{name} must be a 2-dim tensor; got {describe(t)}")
    _to_err.dtype("meta", meta, (torch.int16,))
    n, half = values.shape
    _to_err.shape("meta", meta, (n, half // 8), " ([N, K/16] for values [N, K/2])")
    _to_err.same_device("meta", meta, "values", values)
    k = 2 * half
    _check_shape(_to_err, n, k, values.dtype)
    check_meta_values(_to_err, meta)  # an offline conversion: the codes are read
    reordered = meta.new_empty(n * (k // 16))
    reordered.scatter_(0, _scatter_offsets(n, k // 16, meta.device), meta.reshape(-1))
    return _cutlass_class()(
        torch.Size((n, k)),
        packed=values.contiguous(),
        meta=reordered.view(n, k // 16),
        packed_t=None,
        meta_t=None,
        compressed_swizzled_bitmask=None,
        requires_grad=requires_grad,
    )


def from_torch_semi_structured(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, K/2], meta int16 [N, K/16])`` of a PyTorch CUTLASS semi-structured tensor (fp16 /
    bf16): its ``packed`` values and its ``meta`` gathered back from CUTLASS's order into ours. A
    cuSPARSELt tensor keeps an opaque buffer and cannot be read back."""
    if not isinstance(tensor, _cutlass_class()):
        _from_err(
            f"expected a SparseSemiStructuredTensorCUTLASS; got {type(tensor).__name__} (cuSPARSELt tensors "
            "hold an opaque buffer; build with SparseSemiStructuredTensor._FORCE_CUTLASS = True)",
            TypeError,
        )
    packed, meta = tensor.packed, tensor.meta
    n, k = tensor.shape
    _check_shape(_from_err, n, k, tensor.dtype)
    if packed is None or meta is None or meta.dtype != torch.int16 or tuple(meta.shape) != (n, k // 16):
        _from_err(
            "the tensor holds no int16 [N, K/16] meta of the weight itself (a transposed-only or "
            f"tile-pruned tensor); got meta {describe(meta)} for shape {list(tensor.shape)}"
        )
    offsets = _scatter_offsets(n, k // 16, meta.device)
    ours = meta.reshape(-1).gather(0, offsets).view(n, k // 16)
    check_meta_values(_from_err, ours)
    return packed.contiguous(), ours
