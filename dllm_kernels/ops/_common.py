"""Argument checks and layout helpers that every op module shares."""

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def describe(value) -> str:
    """A tensor's shape, or a non-tensor's type, for error messages."""
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class OpError:
    """Raises errors that start with ``dllm::<op>:`` and say what was expected and what was given."""

    def __init__(self, op: str):
        self.op = op

    def __call__(self, message: str, exc: type[Exception] = RuntimeError):
        raise exc(f"dllm::{self.op}: {message}")

    def dtype(self, name: str, t: torch.Tensor, allowed):
        if t.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            self(f"{name} must be {names}; got {str(t.dtype).removeprefix('torch.')}", TypeError)

    def same_dtype(self, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
        if t.dtype != ref.dtype:
            self(f"{name} must have {ref_name}'s dtype {ref.dtype}; got {t.dtype}", TypeError)

    def same_device(self, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
        if t.device != ref.device:
            self(f"{name} must be on {ref_name}'s device {ref.device}; got {t.device}")

    def shape(self, name: str, t: torch.Tensor, expected: tuple, what: str = ""):
        if tuple(t.shape) != tuple(expected):
            self(f"{name} must have shape {list(expected)}{what}; got {list(t.shape)}")


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x[..., N]`` (unit last stride) as an ``[outer, inner, N]`` view with any outer/inner strides.

    Kernels address a row by two strides, which covers every slice of a contiguous tensor that
    callers pass (``logits[:, s - 1 : e - 1]``, a transposed batch). Leading dims that cannot be
    merged into two are gathered with one copy.
    """
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1], strict=True) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return x.reshape(1, -1, x.shape[-1])
    merged = [(1, 0)] * (2 - len(merged)) + merged
    (n_outer, s_outer), (n_inner, s_inner) = merged
    return x.as_strided((n_outer, n_inner, x.shape[-1]), (s_outer, s_inner, 1))
