"""Helpers shared by the Triton kernels: the SM count the launchers plan against, and the store cast."""

import functools

import torch
import triton
import triton.language as tl

_INTERPRETER_SMS = 132  # notional GPU size for the interpreter on CPU tensors


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def to_output(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x in the output dtype. Under the interpreter (UPCAST) bf16 is rounded to nearest even on the
    bits: the interpreter's own conversion truncates. NaN stays a quiet NaN."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
