"""``dllm::logits_to_confidence``: fused masked-position logits -> (token, score). SPEC.md section 1."""

import math

import torch

from .. import _extension, _registry
from .._backends import Dispatcher
from ..reference import logits_to_confidence as reference
from ._common import FLOAT_DTYPES, OpError, rows_view

OP = "logits_to_confidence"
SCORES = ("prob", "margin", "neg_entropy", "logit_margin", "random")
_err = OpError(OP)
dispatcher = Dispatcher(OP)


def logits_to_confidence(
    logits: torch.Tensor,
    eligible: torch.Tensor | None = None,
    *,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    banned: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence score for every eligible row of ``logits[..., V]``, in one read.

    Args:
        logits: ``[..., V]`` bf16 / fp16 / fp32 with unit stride on the vocabulary; any other strides
            (``logits[:, s - 1 : e - 1]`` for a one-position shift needs no copy).
        eligible: bool, ``logits.shape[:-1]``; ``None`` = every row. Ineligible rows are not read and
            give ``token = -1``, ``score = -inf``.
        temperature: 0 = argmax (lowest index on ties); > 0 = Gumbel-max sample of ``softmax(l / T)``
            with noise keyed by ``(seed, offset, row, v)`` (``row`` = flat row-major row index), so the
            same call gives the same tokens on every backend. Advance ``offset`` for fresh noise.
        score: "prob" (``p[token]``), "margin" (``p_top1 - p_top2``), "neg_entropy" (``sum p log p``),
            "logit_margin" (raw ``l_top1 - l_top2``, ``+inf`` if one token is left) or "random"
            (uniform (0, 1) keyed by ``(seed, offset, row, V)``).
        tempered_score: with ``T > 0``, ``p = softmax(l / T)`` (Dream, SDAR); else ``p = softmax(l)``.
        banned: int64 ``[K]`` token ids whose logit is treated as ``-inf`` before anything else (the mask
            id, EOS). Ids outside ``[0, V)`` are ignored. A NaN at a banned id is never seen.

    Returns:
        ``token`` int64 and ``score`` float32, both ``logits.shape[:-1]``. A row holding NaN or ``+inf``
        gives ``(-1, NaN)``; a row with every logit ``-inf`` or banned gives ``(-1, -inf)``.

    Scores are accumulated in fp32 (the reference in fp64); tokens at ``temperature == 0`` are exact on
    every backend, sampled tokens agree across backends up to fp32 rounding of ``l / T + g``.
    """
    return torch.ops.dllm.logits_to_confidence(
        logits,
        eligible,
        temperature=temperature,
        score=score,
        tempered_score=tempered_score,
        banned=banned,
        seed=seed,
        offset=offset,
    )


def checked_args(
    logits,
    eligible=None,
    *,
    temperature=0.0,
    score="prob",
    tempered_score=False,
    banned=None,
    seed=0,
    offset=0,
):
    """The schema's arguments, checked, in schema order (the fake kernel and _impl take them as given)."""
    if not isinstance(logits, torch.Tensor):
        _err(f"logits must be a Tensor; got {type(logits).__name__}", TypeError)
    _err.dtype("logits", logits, FLOAT_DTYPES)
    if logits.dim() == 0:
        _err("logits must have shape [..., V] (at least 1 dim); got a 0-dim tensor")
    if logits.shape[-1] == 0:
        _err(f"logits must have V >= 1; got shape {list(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        _err(f"logits must be contiguous along V (stride(-1) == 1); got strides {list(logits.stride())}")
    if eligible is not None:
        _err.dtype("eligible", eligible, (torch.bool,))
        _err.shape("eligible", eligible, logits.shape[:-1], " (logits.shape[:-1])")
        _err.same_device("eligible", eligible, "logits", logits)
    if banned is not None:
        _err.dtype("banned", banned, (torch.int64,))
        if banned.dim() != 1:
            _err(f"banned must be a 1-dim tensor of token ids; got shape {list(banned.shape)}")
        _err.same_device("banned", banned, "logits", logits)
    if score not in SCORES:
        _err(f"score must be one of {', '.join(SCORES)}; got {score!r}", ValueError)
    if not (math.isfinite(temperature) and temperature >= 0):
        _err(f"temperature must be finite and >= 0; got {temperature}", ValueError)
    return logits, eligible, temperature, score, tempered_score, banned, seed, offset


@torch.library.register_fake(f"dllm::{OP}")
def _fake(*args, **kwargs):
    logits = checked_args(*args, **kwargs)[0]
    shape = logits.shape[:-1]
    return logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float32)


def _impl(*args, **kwargs):
    logits, eligible, *options = checked_args(*args, **kwargs)
    rows = rows_view(logits)
    rows_eligible = None if eligible is None else eligible.reshape(rows.shape[:2])
    token, value = dispatcher.select(logits.device, rows).run(rows, rows_eligible, *options)
    shape = logits.shape[:-1]
    return token.view(shape), value.view(shape)


# CompositeExplicitAutograd: every device reaches _impl, which picks the provider.
_registry.lib.impl(OP, _impl, "CompositeExplicitAutograd")


@dispatcher.register("reference")
def _reference(rows, eligible, temperature, score, tempered_score, banned, seed, offset):
    return reference.logits_to_confidence(
        rows,
        eligible,
        temperature=temperature,
        score=score,
        tempered_score=tempered_score,
        banned=banned,
        seed=seed,
        offset=offset,
    )


def _compiled(backend):
    def run(rows, eligible, temperature, score, tempered_score, banned, seed, offset):
        kernel = getattr(_extension._C, f"{OP}_{backend}")
        return kernel(rows, eligible, banned, temperature, SCORES.index(score), tempered_score, seed, offset)

    return run


for _backend in ("cpu", "cuda"):
    dispatcher.register(_backend)(_compiled(_backend))


@dispatcher.register("triton")
def _triton(rows, eligible, temperature, score, tempered_score, banned, seed, offset):
    from ..triton_kernels.logits_to_confidence import logits_to_confidence as launch

    return launch(rows, eligible, banned, temperature, score, tempered_score, seed, offset)
