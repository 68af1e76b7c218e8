"""``dllm::credit_confidence``: CreditDecoding's trace credits in sparse slots, fused into each masked
position's (token, score); contract in docs/ops.md."""

import math

import torch

from .. import _extension
from .._backends import DEBUG_CHECKS, define_op
from ..reference import credit_confidence as reference
from ._common import OpError, describe, may_overlap, op_call, rows_view
from .logits_to_confidence import MAX_VOCAB, _check_rows

OP = "credit_confidence"
# alpha * log(C + 1) <= 1e6 * 89 for any fp32 credit: fused logits stay finite wherever logits are.
ALPHA_MAX = 1e6
_err = OpError(OP)


def credit_confidence(
    logits: torch.Tensor,
    eligible: torch.Tensor,
    credit_token: torch.Tensor,
    credit_value: torch.Tensor,
    *,
    alpha: float = 0.7,
    beta: float = 0.8,
    gamma: float = 0.2,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of CreditDecoding's trace credits (dInfer's CreditThresholdParallelDecoder): the
    credit state is updated in place and the (token, score) of every eligible position is read from the
    credit-fused logits, in one read of each eligible row.

    The credit ``C[..., V]`` that upstream keeps dense (fp32, zero at a block's start) is kept as ``S``
    slots per position: slot ``s`` credits token ``credit_token[..., s]`` with ``credit_value[..., s]``;
    a slot is empty when its token is -1 (its value is then 0). Per call:

    1. every slot of every position decays, ``value *= beta`` (fp32);
    2. an eligible position credits its raw argmax ``lidx`` (first index) with ``pmax ** gamma``,
       ``pmax = max softmax(l)`` (fp32): into the slot holding ``lidx``, else the first empty slot, else
       the slot of smallest value (lowest slot on ties), whose token is **evicted** and loses its credit
       (its fused logit drops by ``alpha * log(1 + C_evicted)``, small since credit decays geometrically);
    3. ``f = l + alpha * log(C + 1)`` (fp32, 0 off the slots), ``token = argmax f`` (lowest id on ties),
       ``score = softmax(f)[token]``, from the slots alone: no second pass over ``V``.

    This step's credit is in this step's fused logits, as upstream. With ``S`` at least the number of
    distinct raw argmaxes a position sees in a block nothing is evicted and the result is upstream's dense
    one (tokens exact, scores within fp32 rounding). Greedy only: there is no temperature (dInfer's
    callers decode greedily). The commit rule is ``select_unmask``'s.

    Args:
        logits: ``[..., V]`` bf16 / fp16 / fp32, unit last stride, any other strides; ``V < 2^31``.
        eligible: bool ``logits.shape[:-1]``: the positions still masked at the start of this step. The
            others are not read, get no credit (but decay) and give ``(-1, -inf)``.
        credit_token: int64 ``[*logits.shape[:-1], S]``, ``S >= 1``, unit last stride; updated in place.
            Holds -1 or ids in ``[0, V)`` (checked on CPU tensors, and with ``DLLM_DEBUG_CHECKS=1``).
        credit_value: fp32, ``credit_token``'s shape, unit last stride; updated in place. The two must not
            overlap each other or themselves. ``credit_state`` makes (and resets) a state.
        alpha: in ``[0, ALPHA_MAX]``; beta: in ``[0, 1]``; gamma: finite, ``>= 0`` (else ``ValueError``,
            raised before anything is written).
        banned: int64 ``[K]`` ids read as ``-inf`` (ids outside ``[0, V)`` are ignored), as
            ``logits_to_confidence``'s.

    Returns:
        ``token`` int64 and ``score`` fp32, both ``logits.shape[:-1]``. A row holding NaN or ``+inf`` gives
        ``(-1, NaN)``, a row with every logit ``-inf`` or banned ``(-1, -inf)``; neither gets credit.
    """
    return _call(logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned)


def credit_state(
    shape: int | tuple[int, ...] | torch.Size, slots: int = 8, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty credit state for positions of ``shape`` (``logits.shape[:-1]``): ``(credit_token,
    credit_value)``, int64 filled with -1 and fp32 zeros, both ``[*shape, slots]``. Make a new one (or
    ``credit_token.fill_(-1); credit_value.zero_()`` in place, inside a CUDA graph) at each block's start."""
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        OpError("credit_state")(f"slots must be an int >= 1; got {slots!r}", ValueError)
    full = (*((shape,) if isinstance(shape, int) else shape), slots)
    return (
        torch.full(full, -1, dtype=torch.int64, device=device),
        torch.zeros(full, dtype=torch.float32, device=device),
    )


def _check_slots(name, t, dtype, logits):
    """A slot tensor [*logits.shape[:-1], S]: dtype, shape, device, unit last stride, no self-overlap."""
    _err.dtype(name, t, (dtype,))
    leading = list(logits.shape[:-1])
    if t.dim() != logits.dim() or list(t.shape[:-1]) != leading or t.shape[-1] < 1:
        expected = ", ".join([*map(str, leading), "S"])
        _err(f"{name} must have shape [{expected}] (logits.shape[:-1], then S >= 1 slots); got {describe(t)}")
    _err.same_device(name, t, "logits", logits)
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        _err(f"{name} must be contiguous along S (stride(-1) == 1); got strides {list(t.stride())}")
    _err.no_internal_overlap(name, t)


def checked_args(
    logits, eligible, credit_token, credit_value, *, alpha=0.7, beta=0.8, gamma=0.2, banned=None
):
    """The schema's arguments, checked, in schema order."""
    _err.tensor("eligible", eligible)  # required here (logits_to_confidence's may be None)
    _check_rows(_err, logits, eligible, banned)
    if logits.shape[-1] > MAX_VOCAB:
        _err(f"logits must have V <= 2^31 - 1 (token ids fit an int32); got V = {logits.shape[-1]}")
    _check_slots("credit_token", credit_token, torch.int64, logits)
    _check_slots("credit_value", credit_value, torch.float32, logits)
    if credit_value.shape != credit_token.shape:
        _err(
            f"credit_value must have credit_token's shape {list(credit_token.shape)} (the same S); "
            f"got {list(credit_value.shape)}"
        )
    if not 0 <= alpha <= ALPHA_MAX:
        _err(f"alpha must be in [0, {ALPHA_MAX:g}]; got {alpha}", ValueError)
    if not 0 <= beta <= 1:
        _err(f"beta must be in [0, 1]; got {beta}", ValueError)
    if not 0 <= gamma < math.inf:
        _err(f"gamma must be finite and >= 0; got {gamma}", ValueError)
    return logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned


def _prepare(logits, eligible, credit_token, credit_value, *options):
    """Checks of real tensors, before anything is written: the two slot tensors share no byte of memory
    (conservative: their byte ranges); on CPU (free) or with DLLM_DEBUG_CHECKS (a sync on a GPU), every
    slot token is -1 or an id in [0, V)."""
    if may_overlap(credit_token, credit_value):
        _err(
            "credit_token and credit_value are both written in place, so they must not share memory; got "
            f"views of one storage (strides {list(credit_token.stride())} and {list(credit_value.stride())})"
        )
    if credit_token.numel() and (credit_token.device.type == "cpu" or DEBUG_CHECKS):
        vocab = logits.shape[-1]
        bad = (credit_token < -1) | (credit_token >= vocab)
        if bad.any():
            _err(
                f"credit_token must hold -1 (an empty slot) or token ids in [0, {vocab}); "
                f"got {credit_token[bad][0].item()}",
                ValueError,
            )
    return logits, eligible, credit_token, credit_value, *options


def _fake(logits, *_):
    shape = logits.shape[:-1]
    return logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float32)


dispatcher = define_op(OP, checked_args, _fake, _prepare)
_call = op_call(OP, credit_confidence)
if _extension._C is not None:
    _extension._C.set_credit_alpha_max(ALPHA_MAX)
# The reference takes the schema's arguments in order.
dispatcher.register("reference")(reference.credit_confidence)


def _compiled(logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned):
    """The cpu and cuda providers: logits_to_confidence's scan and the slot epilogue, on logits' device."""
    run = _extension._C.credit_confidence_run
    return run(logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned)


for _backend in ("cpu", "cuda"):
    dispatcher.register(_backend)(_compiled)


@dispatcher.register("triton")
def _triton(logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned):
    from ..triton_kernels.credit_confidence import credit_confidence as launch

    rows = rows_view(logits)
    token, score = launch(
        rows, eligible.reshape(rows.shape[:2]), credit_token, credit_value, alpha, beta, gamma, banned
    )
    shape = logits.shape[:-1]
    return token.view(shape), score.view(shape)
