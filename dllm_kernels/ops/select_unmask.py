"""``dllm::select_unmask``: batched remask / unmask selection with a fused commit; contract in docs/ops.md."""

import math

import torch

from .. import _extension
from .._backends import define_op
from ..reference import select_unmask as reference
from ._common import OpError, describe, op_call

OP = "select_unmask"
POLICIES = (
    "topk",
    "threshold",
    "factor",
    "topk_or_threshold",
    "all",
    "factor_upstream",
    "local_leap",
    "hierarchy",
    "near_best",
)
_NEEDS_K = ("topk", "topk_or_threshold")
_err = OpError(OP)


def select_unmask(
    score: torch.Tensor,
    eligible: torch.Tensor,
    *,
    policy: str = "topk",
    k: torch.Tensor | None = None,
    threshold: float = 0.9,
    inclusive: bool = False,
    factor: float = 1.0,
    min_per_row: int = 1,
    low_threshold: float = 0.0,
    radius: int = 0,
    margin: float = 0.0,
    token: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of each row to unmask this step, and (optionally) commit them into ``x``.

    Args:
        score: fp32 ``[B, L]`` confidence (``logits_to_confidence``'s score); unit last stride.
        eligible: bool ``[B, L]``: still masked and inside the active (sub-)block. A position is
            selectable when eligible and its score is neither ``-inf`` nor NaN; nothing else is selected.
        policy: "topk" (the ``k[b]`` best; LLaDA, Dream), "threshold" (``score > threshold``, ``>=`` when
            ``inclusive``; Fast-dLLM, SGLang), "factor" (Fast-dLLM's ``c_i >= 1 - factor / (i + 1)``
            prefix, as the paper writes it), "factor_upstream" (as Fast-dLLM's released code runs it: a
            row whose first failing rank is its last commits that rank too), "topk_or_threshold" (SDAR:
            every passing position when at least ``k[b]`` pass, else the top ``k[b]``), "all" (Prophet's
            commit of everything), "near_best" (dInfer's threshold decoder: ``score`` passes
            ``min(threshold, best - margin)``, ``best`` the row's largest selectable score). Two set
            rules, not prefixes of the order: "local_leap" (LocalLeap: passing ``threshold``, or passing
            ``low_threshold`` within ``radius`` positions of a position that passes ``threshold``) and
            "hierarchy" (dInfer's HierarchyDecoder: passing ``threshold``, or passing ``low_threshold``
            and the largest score of its run of consecutive eligible positions, every tie included).
        k: int32 / int64 ``[B]`` on the score's device; needed by "topk" and "topk_or_threshold";
            clamped to the selectable count; ``k <= 0`` asks for nothing (``min_per_row`` still applies).
        threshold, inclusive, factor, low_threshold, margin: compared in fp64 with the fp32 score widened
            exactly; ``inclusive`` makes every threshold comparison ``>=``. Finite.
        min_per_row: every row selects at least ``min(min_per_row, selectable)`` positions, best first
            (the set rules: united with the first ``min(min_per_row, selectable)`` of the order).
        radius: int ``>= 0``, "local_leap"'s neighbourhood along L.
        token, x: int64 ``[B, L]``, both or neither: ``x[selected] = token[selected]`` in the same launch.

    Returns:
        ``selected`` bool ``[B, L]`` and ``count`` int32 ``[B]``. Selection is exact: but for the set rules,
        the first ``count[b]`` positions of a stable descending sort on ``(score, -position)``. No host
        sync.
    """
    return _call(
        score,
        eligible,
        policy,
        k,
        threshold,
        inclusive,
        factor,
        min_per_row,
        low_threshold,
        radius,
        margin,
        token,
        x,
    )


def _matrix(name, t, dtype, score):
    """A [B, L] tensor beside score: its dtype, score's shape and device, unit stride along L."""
    shape = score.shape
    if (
        isinstance(t, torch.Tensor)
        and t.dtype == dtype
        and t.shape == shape
        and t.device == score.device
        and (t.stride(1) == 1 or shape[1] < 2)
    ):
        return  # the common case in one test; the messages below say what is wrong otherwise
    _err.dtype(name, t, (dtype,))
    if name != "score":
        _err.shape(name, t, shape, " (the shape of score)")
        _err.same_device(name, t, "score", score)
    _err(f"{name} must be contiguous along L (stride(-1) == 1); got strides {list(t.stride())}")


def checked_args(
    score,
    eligible,
    *,
    policy="topk",
    k=None,
    threshold=0.9,
    inclusive=False,
    factor=1.0,
    min_per_row=1,
    low_threshold=0.0,
    radius=0,
    margin=0.0,
    token=None,
    x=None,
):
    """The schema's arguments, checked, in schema order."""
    if not isinstance(score, torch.Tensor) or score.dim() != 2:
        _err(f"score must be a [B, L] tensor; got {describe(score)}")
    _matrix("score", score, torch.float32, score)
    if score.shape[1] >= 2**31:
        _err(f"score rows must hold fewer than 2^31 positions; got L = {score.shape[1]}")
    _matrix("eligible", eligible, torch.bool, score)
    if policy not in POLICIES:
        _err(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}", ValueError)
    if k is None:
        if policy in _NEEDS_K:
            _err(f"policy {policy!r} needs k (int32/int64 [B]); got None", ValueError)
    else:
        _err.tensor("k", k)
        if (
            k.dtype not in (torch.int32, torch.int64)
            or k.shape != score.shape[:1]
            or k.device != score.device
        ):
            _err.dtype("k", k, (torch.int32, torch.int64))
            _err.shape("k", k, score.shape[:1], " ([B])")
            _err.same_device("k", k, "score", score)
    if (token is None) != (x is None):
        _err(
            f"token and x go together (fused commit); got token={'set' if token is not None else 'None'}, "
            f"x={'set' if x is not None else 'None'}",
            ValueError,
        )
    if x is not None:
        _matrix("x", x, torch.int64, score)
        _matrix("token", token, torch.int64, score)
        _err.no_internal_overlap("x", x)
    if min_per_row < 0:
        _err(f"min_per_row must be >= 0; got {min_per_row}", ValueError)
    finite = dict(threshold=threshold, factor=factor, low_threshold=low_threshold, margin=margin)
    for name, value in finite.items():
        if not math.isfinite(value):
            _err(f"{name} must be finite; got {value}", ValueError)
    if radius < 0:
        _err(f"radius must be >= 0; got {radius}", ValueError)
    return (
        score,
        eligible,
        policy,
        k,
        threshold,
        inclusive,
        factor,
        min_per_row,
        low_threshold,
        radius,
        margin,
        token,
        x,
    )


def _fake(score, *_):
    return score.new_empty(score.shape, dtype=torch.bool), score.new_empty(score.shape[:1], dtype=torch.int32)


dispatcher = define_op(OP, checked_args, _fake, choices=POLICIES)
_call = op_call(OP, select_unmask)
# The reference takes the schema's arguments in order.
dispatcher.register("reference")(reference.select_unmask)


def _compiled(score, eligible, policy, *options):
    """The cpu and cuda providers: the compiled kernel on score's device."""
    return _extension._C.select_unmask_run(score, eligible, POLICIES.index(policy), *options)


# The CUDA kernel's positions are ints with room for its 256 threads (kSelectCudaMaxLength).
_CUDA_MAX_LENGTH = 2**31 - 1 - 256


def _cuda_supports(score, *args):
    if score.shape[1] > _CUDA_MAX_LENGTH:
        return f"rows longer than {_CUDA_MAX_LENGTH} positions (got L = {score.shape[1]})"
    return None


dispatcher.register("cpu")(_compiled)
dispatcher.register("cuda", supports=_cuda_supports)(_compiled)


def _triton_supports(score, *args, **kwargs):
    # One program sorts a whole row in registers: beyond this it spills (rows are a few thousand).
    return None if score.shape[1] <= 8192 else f"rows longer than 8192 positions (got L = {score.shape[1]})"


@dispatcher.register("triton", supports=_triton_supports)
def _triton(*arguments):
    from ..triton_kernels.select_unmask import select_unmask as launch

    return launch(*arguments)
