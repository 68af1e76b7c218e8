"""dllm-kernels: fused decode-step kernels for diffusion LLMs, as ``torch.ops.dllm.*`` custom ops.

Every op has a plain-PyTorch reference and, where built, ``cuda``, ``triton`` and ``cpu`` backends;
``available_backends()`` says which this install runs, ``use_backend(name)`` pins one.
"""

from . import (
    _backends,
    _registry,  # noqa: F401  (defines the schemas before any op registers kernels)
    distributed,
    nn,
    schedules,
)
from ._backends import BACKENDS, available_backends, use_backend
from .decode import RECIPES, decode_step
from .ops.attention_mass import attention_mass
from .ops.block_attention import block_attention
from .ops.credit_confidence import credit_confidence, credit_state
from .ops.logits_to_confidence import (
    logits_to_confidence,
    logits_to_confidence_merge,
    logits_to_confidence_partial,
)
from .ops.select_unmask import select_unmask
from .ops.sparse24 import armor_linear, compress_24, decompress_24, prune_24, sparse24_mm

__all__ = [
    "BACKENDS",
    "RECIPES",
    "armor_linear",
    "attention_mass",
    "available_backends",
    "block_attention",
    "compress_24",
    "credit_confidence",
    "credit_state",
    "decode_step",
    "decompress_24",
    "distributed",
    "logits_to_confidence",
    "logits_to_confidence_merge",
    "logits_to_confidence_partial",
    "nn",
    "prune_24",
    "schedules",
    "select_unmask",
    "sparse24_mm",
    "use_backend",
]
__version__ = "0.1.0"

_backends.enable_compiled_dispatch()
