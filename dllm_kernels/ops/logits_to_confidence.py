"""``dllm::logits_to_confidence``: fused masked-position logits -> (token, score); contract in docs/ops.md."""

import torch

from .. import _extension
from .._backends import define_op
from ..reference import logits_to_confidence as reference
from ._common import FLOAT_DTYPES, OpError, op_call, rows_view

OP = "logits_to_confidence"
SCORES = ("prob", "margin", "neg_entropy", "logit_margin", "random")
# A sampling temperature is 0 or inside this range, where l + T * g and log2(e) / T stay finite in fp32.
TEMPERATURE_RANGE = (1e-30, 1e30)
_err = OpError(OP)


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
        temperature: 0 = argmax (lowest index on ties); in ``TEMPERATURE_RANGE`` = Gumbel-max sample of
            ``softmax(l / T)`` with noise keyed by ``(seed, offset, row, v)`` (``row`` = flat row-major row
            index), so the same call gives the same tokens on every backend. Advance ``offset`` for fresh
            noise. Other values are an error.
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
    every backend, sampled tokens agree across backends up to the fp32 rounding of their keys (the kernels
    compare ``l + T * g``, the same order as ``l / T + g``). Scores are
    valid: ``prob`` and ``margin`` in [0, 1], ``neg_entropy <= 0``; ``token == -1`` exactly where the score
    is ``-inf`` or NaN.
    """
    return _call(logits, eligible, temperature, score, tempered_score, banned, seed, offset)


def _check_rows(err, logits, eligible, banned):
    """The logits / eligible / banned checks of logits_to_confidence and its partial-state half."""
    err.dtype("logits", logits, FLOAT_DTYPES)
    if logits.dim() == 0:
        err("logits must have shape [..., V] (at least 1 dim); got a 0-dim tensor")
    if logits.shape[-1] == 0:
        err(f"logits must have V >= 1; got shape {list(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        err(f"logits must be contiguous along V (stride(-1) == 1); got strides {list(logits.stride())}")
    if eligible is not None:
        err.dtype("eligible", eligible, (torch.bool,))
        err.shape("eligible", eligible, logits.shape[:-1], " (logits.shape[:-1])")
        err.same_device("eligible", eligible, "logits", logits)
    if banned is not None:
        err.dtype("banned", banned, (torch.int64,))
        if banned.dim() != 1:
            err(f"banned must be a 1-dim tensor of token ids; got shape {list(banned.shape)}")
        err.same_device("banned", banned, "logits", logits)


def _check_options(err, temperature, score):
    if score not in SCORES:
        err(f"score must be one of {', '.join(SCORES)}; got {score!r}", ValueError)
    low, high = TEMPERATURE_RANGE
    if not (temperature == 0 or low <= temperature <= high):
        err(f"temperature must be 0 (argmax) or in [{low:g}, {high:g}]; got {temperature}", ValueError)


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
    """The schema's arguments, checked, in schema order."""
    _check_rows(_err, logits, eligible, banned)
    _check_options(_err, temperature, score)
    return logits, eligible, temperature, score, tempered_score, banned, seed, offset


def _fake(logits, *_):
    shape = logits.shape[:-1]
    return logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float32)


dispatcher = define_op(OP, checked_args, _fake, choices=SCORES)
_call = op_call(OP, logits_to_confidence)
if _extension._C is not None:
    _extension._C.set_temperature_range(*TEMPERATURE_RANGE)
# The reference takes the schema's arguments in order.
dispatcher.register("reference")(reference.logits_to_confidence)


def _compiled(logits, eligible, temperature, score, tempered_score, banned, seed, offset):
    """The cpu and cuda providers: the compiled kernel on logits' device."""
    run = _extension._C.logits_to_confidence_run
    return run(logits, eligible, banned, temperature, SCORES.index(score), tempered_score, seed, offset)


for _backend in ("cpu", "cuda"):
    dispatcher.register(_backend)(_compiled)


def _triton_launch(logits, eligible, *options, vocab_start=None):
    """The Triton kernel on logits' rows view: (token, score) [O, I], or with vocab_start the states."""
    from ..triton_kernels.logits_to_confidence import logits_to_confidence as launch

    rows = rows_view(logits)
    rows_eligible = None if eligible is None else eligible.reshape(rows.shape[:2])
    return launch(rows, rows_eligible, *options, vocab_start=vocab_start)


@dispatcher.register("triton")
def _triton(logits, eligible, temperature, score, tempered_score, banned, seed, offset):
    token, value = _triton_launch(logits, eligible, banned, temperature, score, tempered_score, seed, offset)
    shape = logits.shape[:-1]
    return token.view(shape), value.view(shape)


# Tensor-parallel halves (dllm_kernels.distributed is the collective between them): every rank's
# vocabulary shard -> a small state per row; the states of every shard -> (token, score) of the whole rows.
PARTIAL, MERGE = "logits_to_confidence_partial", "logits_to_confidence_merge"
STATE_FIELDS = reference.STATE_FIELDS
# Global token ids fit an int32 (the Triton kernels' indices).
MAX_VOCAB = 2**31 - 1
_partial_err, _merge_err = OpError(PARTIAL), OpError(MERGE)


def logits_to_confidence_partial(
    logits: torch.Tensor,
    eligible: torch.Tensor | None = None,
    *,
    vocab_start: int = 0,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    banned: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Per-row state ``[..., 8]`` float64 of a vocabulary shard ``logits[..., W]`` holding global token ids
    ``[vocab_start, vocab_start + W)``, for ``logits_to_confidence_merge``; one read of each eligible row.

    The options are ``logits_to_confidence``'s and must be the same on every shard; ``banned`` holds global
    ids (each shard applies those in its range), and the sampling noise is keyed by the global id, so the
    merged result is the single-device op's on the concatenated rows. The layout of a state is in
    docs/ops.md; an ineligible row is not read and has the empty state.
    """
    return _partial_call(
        logits, eligible, vocab_start, temperature, score, tempered_score, banned, seed, offset
    )


def logits_to_confidence_merge(
    states: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, score)`` from ``states[P, ..., 8]``: the ``logits_to_confidence_partial`` states of P shards
    (in any order) that together cover the vocabulary ``[0, vocab_size)``, with the options they were made
    with. Equal to ``logits_to_confidence`` on the whole rows: tokens exactly, scores within fp32 rounding.
    """
    return _merge_call(states, vocab_size, temperature, score, tempered_score, seed, offset)


def checked_partial_args(
    logits,
    eligible=None,
    *,
    vocab_start=0,
    temperature=0.0,
    score="prob",
    tempered_score=False,
    banned=None,
    seed=0,
    offset=0,
):
    _check_rows(_partial_err, logits, eligible, banned)
    if not isinstance(vocab_start, int) or isinstance(vocab_start, bool):
        _partial_err(f"vocab_start must be an int; got {type(vocab_start).__name__}", TypeError)
    if not 0 <= vocab_start <= MAX_VOCAB - logits.shape[-1]:
        _partial_err(
            f"vocab_start must be in [0, 2^31 - 1 - W] (W = {logits.shape[-1]}: global ids fit an int32); "
            f"got {vocab_start}",
            ValueError,
        )
    _check_options(_partial_err, temperature, score)
    return logits, eligible, vocab_start, temperature, score, tempered_score, banned, seed, offset


def checked_merge_args(
    states, *, vocab_size, temperature=0.0, score="prob", tempered_score=False, seed=0, offset=0
):
    _merge_err.dtype("states", states, (torch.float64,))
    if states.dim() < 2 or states.shape[0] < 1 or states.shape[-1] != STATE_FIELDS:
        _merge_err(
            f"states must have shape [P >= 1, ..., {STATE_FIELDS}] (logits_to_confidence_partial's states of "
            f"P shards, stacked); got {list(states.shape)}"
        )
    if not 1 <= vocab_size <= MAX_VOCAB:
        _merge_err(f"vocab_size must be in [1, 2^31 - 1]; got {vocab_size}", ValueError)
    _check_options(_merge_err, temperature, score)
    return states, vocab_size, temperature, score, tempered_score, seed, offset


def _partial_fake(logits, *_):
    return logits.new_empty((*logits.shape[:-1], STATE_FIELDS), dtype=torch.float64)


def _merge_fake(states, *_):
    shape = states.shape[1:-1]
    return states.new_empty(shape, dtype=torch.int64), states.new_empty(shape, dtype=torch.float32)


partial_dispatcher = define_op(PARTIAL, checked_partial_args, _partial_fake, choices=SCORES)
merge_dispatcher = define_op(MERGE, checked_merge_args, _merge_fake, choices=SCORES)
_partial_call = op_call(PARTIAL, logits_to_confidence_partial)
_merge_call = op_call(MERGE, logits_to_confidence_merge)
partial_dispatcher.register("reference")(reference.logits_to_confidence_partial)
merge_dispatcher.register("reference")(reference.logits_to_confidence_merge)


def _compiled_partial(
    logits, eligible, vocab_start, temperature, score, tempered_score, banned, seed, offset
):
    run = _extension._C.logits_to_confidence_partial_run
    return run(
        logits, eligible, vocab_start, temperature, SCORES.index(score), tempered_score, banned, seed, offset
    )


def _compiled_merge(states, vocab_size, temperature, score, tempered_score, seed, offset):
    run = _extension._C.logits_to_confidence_merge_run
    return run(states, vocab_size, temperature, SCORES.index(score), tempered_score, seed, offset)


for _backend in ("cpu", "cuda"):
    partial_dispatcher.register(_backend)(_compiled_partial)
    merge_dispatcher.register(_backend)(_compiled_merge)


@partial_dispatcher.register("triton")
def _triton_partial(logits, eligible, vocab_start, temperature, score, tempered_score, banned, seed, offset):
    options = (banned, temperature, score, tempered_score, seed, offset)
    return _triton_launch(logits, eligible, *options, vocab_start=vocab_start).view(
        *logits.shape[:-1], STATE_FIELDS
    )


@merge_dispatcher.register("triton")
def _triton_merge(states, vocab_size, temperature, score, tempered_score, seed, offset):
    from ..triton_kernels.logits_to_confidence import merge

    rows = states.reshape(states.shape[0], -1, STATE_FIELDS).contiguous()
    token, value = merge(rows, vocab_size, temperature, score, tempered_score, seed, offset)
    shape = states.shape[1:-1]
    return token.view(shape), value.view(shape)
