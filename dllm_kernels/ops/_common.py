"""Argument checks and layout helpers that every op module shares."""

import inspect
import operator

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT64_RANGE = (-(2**63), 2**63 - 1)
_REQUIRED = object()


def _same(value, default) -> bool:
    return type(value) is type(default) and value == default


def op_call(op: str, public):
    """``torch.ops.dllm.<op>.default`` for a public function, which passes its tensors and then its keyword
    options positionally, in the schema's order (the public function's own options are checked against the
    schema here; tests check what each call passes). Only options that differ from their schema defaults
    reach torch.ops, which parses every keyword it is given (about 0.4 us each); an option left at the
    public function's own default (when that equals the schema's) is the same object, so the common
    all-default call costs one identity pass. An argument torch.ops cannot parse becomes a ``dllm::`` error
    naming it (an int beyond int64 says so; torch's own message for it is opaque)."""
    overload = getattr(torch.ops.dllm, op).default
    err = OpError(op)
    options = [a for a in overload._schema.arguments if a.kwarg_only]
    names = tuple(a.name for a in options)
    own = inspect.signature(public).parameters
    keyword = tuple(n for n, p in own.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    if keyword != names:
        raise TypeError(f"dllm::{op}: keyword options {keyword} are not the schema's {names}")

    def default(a):
        if not a.has_default_value():
            return _REQUIRED  # never the value given: always passed on
        mine = own[a.name].default
        return mine if _same(mine, a.default_value) else a.default_value

    defaults = tuple(map(default, options))
    int_options = {a.name for a in options if str(a.type) in ("int", "Optional[int]")}
    n_options = len(names)
    parse_failure = f"dllm::{op}() "

    def call(*args):
        split = len(args) - n_options  # tensors, then options (an op may have none: args[-0:] is all)
        values = args[split:]
        try:
            if all(map(operator.is_, values, defaults)):
                return overload(*args[:split])
            changed = {
                name: value
                for name, value, default in zip(names, values, defaults, strict=True)
                if value is not default and not _same(value, default)
            }
            return overload(*args[:split], **changed)
        except RuntimeError as e:
            message = str(e).split("\n", 1)[0]  # the rest is torch's schema dump
            if not message.startswith(parse_failure + "Expected a value of type"):
                raise
        # Outside the except block: the dllm:: error is not chained to torch's.
        for name, value in zip(names, values, strict=True):
            if name in int_options:
                err.int64(name, value)
        err(message[len(parse_failure) :], TypeError)

    call.dllm_op = op  # tests find every public function that goes through here

    return call


def describe(value) -> str:
    """A tensor's shape, or a non-tensor's type, for error messages."""
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class OpError:
    """Raises errors that start with ``dllm::<op>:`` and say what was expected and what was given."""

    def __init__(self, op: str):
        self.op = op

    def __call__(self, message: str, exc: type[Exception] = RuntimeError):
        raise exc(f"dllm::{self.op}: {message}")

    def tensor(self, name: str, t):
        if not isinstance(t, torch.Tensor):
            self(f"{name} must be a Tensor; got {type(t).__name__}", TypeError)

    def int64(self, name: str, value):
        """A Python int argument that the schema carries as int64 (other types are torch's to convert)."""
        if type(value) is int and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            self(f"{name} must be an int in [-2^63, 2^63); got {value!r}", ValueError)

    def no_internal_overlap(self, name: str, t: torch.Tensor):
        """An output written in place must not alias itself (an ``expand()``ed view, overlapping strides)."""
        if has_internal_overlap(t):
            self(
                f"{name} is written in place, so its elements must not overlap in memory; got shape "
                f"{list(t.shape)} with strides {list(t.stride())} (an expand()ed view? pass a copy)"
            )

    def dtype(self, name: str, t: torch.Tensor, allowed):
        self.tensor(name, t)
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


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of t may address the same element (metadata only). Dims of size 1 never move;
    the others, by increasing stride, must each step past everything the smaller ones span."""
    if t.numel() == 0:
        return False
    span = 0
    for stride, size in sorted((abs(st), s) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two real tensors may address a common byte. Exact for views of one dtype with equal shapes
    and strides (a fused KV buffer's K and V halves), conservative (byte ranges) otherwise."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t):
        """[first, last] byte of t's storage that t may address."""
        low = sum(min(0, (n - 1) * st) for n, st in zip(t.shape, t.stride(), strict=True))
        high = sum(max(0, (n - 1) * st) for n, st in zip(t.shape, t.stride(), strict=True))
        size = t.element_size()
        return (t.storage_offset() + low) * size, (t.storage_offset() + high + 1) * size - 1

    (a_low, a_high), (b_low, b_high) = extent(a), extent(b)
    if a_high < b_low or b_high < a_low:
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return True
    dims = sorted(((abs(st), n) for n, st in zip(a.shape, a.stride(), strict=True) if n > 1), reverse=True)

    def reachable(offset, dims):
        """offset = sum c_i * stride_i for some integers |c_i| < size_i?"""
        if not dims:
            return offset == 0
        (stride, size), rest = dims[0], dims[1:]
        span = sum((n - 1) * st for st, n in rest)
        low = max(-(size - 1), -((span - offset) // stride))  # ceil((offset - span) / stride)
        high = min(size - 1, (offset + span) // stride)
        return any(reachable(offset - c * stride, rest) for c in range(low, high + 1))

    return reachable(b.storage_offset() - a.storage_offset(), dims)


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
