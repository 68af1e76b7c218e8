"""Modules built on the dllm ops."""

import torch

from .ops._common import FLOAT_DTYPES, OpError, describe
from .ops.sparse24 import compress_24, prune_24, sparse24_mm

_err = OpError("Sparse24Linear")


class Sparse24Linear(torch.nn.Module):
    """An inference-only linear layer whose weight is stored 2:4-sparse (values + meta, docs/ops.md).

    Build it from a dense layer with ``Sparse24Linear.from_linear(linear, mask=None, score=None)``: the kept
    pattern is ``mask`` if given, else the 2 largest ``|w|`` (or ``score``) of every 4 along the input
    features. ``forward(x) = sparse24_mm(x, values, meta, bias)``. ``state_dict`` holds ``values``, ``meta``
    and ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=None, device=None):
        super().__init__()
        if in_features < 0 or in_features % 16 or out_features < 0:
            _err(
                "in_features must be a multiple of 16 and out_features >= 0; "
                f"got in_features={in_features}, out_features={out_features}",
                ValueError,
            )
        if dtype is not None and dtype not in FLOAT_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            _err(f"dtype must be {names}; got {dtype}", TypeError)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device)
        )
        self.register_buffer(
            "meta", torch.zeros(out_features, in_features // 16, dtype=torch.int16, device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # An all-zero meta is not a valid pattern (i0 < i1): start from "keep positions 0 and 1" (0b0100).
        self.meta.fill_(0x4444)

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, mask: torch.Tensor | None = None, score: torch.Tensor | None = None
    ) -> "Sparse24Linear":
        if not isinstance(linear, torch.nn.Linear):
            _err(f"from_linear takes a torch.nn.Linear; got {describe(linear)}", TypeError)
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        values, meta = compress_24(weight, prune_24(weight, score) if mask is None else mask)
        module.values.copy_(values)
        module.meta.copy_(meta)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_mm(x, self.values, self.meta, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )
