"""The counter-based random numbers every backend shares, in plain PyTorch.

The random word of ``(seed, offset, row, col)`` is word ``col % 4`` of Philox4x32-10 (Salmon et al.,
SC'11; the generator of Random123, cuRAND and Triton's ``tl.philox``) with key
``(seed mod 2^32, seed >> 32 mod 2^32)`` and counter ``(col // 4, row, offset mod 2^32, offset >> 32 mod
2^32)``: one evaluation serves four consecutive columns. Its uniform is ``((x >> 9) + 0.5) / 2^23``:
strictly inside (0, 1), so ``-log(-log u)`` is always finite, and exact in fp32 on every backend.
"""

import torch

_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` < 2^32,
    in 16-bit halves so that no int64 product overflows."""
    low_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (low_part >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_part & 0xFFFF)


def random_word(seed: int, offset: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The random word of every (row, col) pair (broadcast), as int64 values in [0, 2^32)."""
    row, col = torch.broadcast_tensors(row.to(torch.int64), col.to(torch.int64))
    c0, c1 = (col >> 2) & _MASK32, row & _MASK32
    c2 = torch.full_like(c0, offset & _MASK32)
    c3 = torch.full_like(c0, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3], -1).gather(-1, (col & 3)[..., None])[..., 0]


def uniform(seed: int, offset: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float64 for every (row, col) pair; exactly representable in fp32."""
    return ((random_word(seed, offset, row, col) >> 9).double() + 0.5) * 2.0**-23


def gumbel(seed: int, offset: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)`` in float64."""
    return -torch.log(-torch.log(uniform(seed, offset, row, col)))
