"""dllm-kernels: fused decode-step kernels for diffusion LLMs, as ``torch.ops.dllm.*`` custom ops.

Every op has a plain-PyTorch reference and, where built, ``cuda``, ``triton`` and ``cpu`` backends;
``available_backends()`` says which this install runs, ``use_backend(name)`` pins one.
"""

from . import (
    _registry,  # noqa: F401  (defines the schemas before any op registers kernels)
    schedules,
)
from ._backends import BACKENDS, available_backends, use_backend
from .decode import RECIPES, decode_step
from .ops.block_attention import block_attention
from .ops.logits_to_confidence import logits_to_confidence
from .ops.select_unmask import select_unmask

__all__ = [
    "BACKENDS",
    "RECIPES",
    "available_backends",
    "block_attention",
    "decode_step",
    "logits_to_confidence",
    "schedules",
    "select_unmask",
    "use_backend",
]
__version__ = "0.1.0"
