"""One decode step of each framework in one call: logits -> (token, score) -> selection -> commit.

``decode_step(logits, x, eligible, recipe=..., **options)`` runs ``logits_to_confidence`` then
``select_unmask`` with the fused commit, and returns ``(x, selected, count)``; ``x`` is updated in place.
``eligible`` marks the positions the framework may unmask this step (still masked and inside the
active block / sub-block); schedules come from ``dllm_kernels.schedules``. Every row of a batch gets
the answer it would get alone (the frameworks' own loops are B = 1, or share one count per batch).
Nothing syncs with the host, so a step can be captured in a CUDA graph.

Each recipe reproduces its framework's released step code by default (docs/recipes.md lists the
sources and every difference). Where a framework samples (temperature > 0) the tokens follow the same
distribution but come from this library's counter-based generator (``seed``, ``offset``), not from
``torch.rand``. Probabilities are exact (fp32 accumulation of the softmax) where some frameworks run
the softmax in the model's dtype, and entropies have no epsilon inside the log.
"""

import dataclasses
import inspect
import math
from typing import NamedTuple

import torch

from . import distributed
from .ops._common import OpError, describe
from .ops.credit_confidence import credit_confidence
from .ops.logits_to_confidence import logits_to_confidence
from .ops.select_unmask import select_unmask

# The keyword options of logits_to_confidence; every other option of a step goes to select_unmask.
_CONFIDENCE_OPTIONS = (
    *(
        name
        for name, parameter in inspect.signature(logits_to_confidence).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ),
    "group",
    "vocab_start",
)


def _confidence(logits, eligible, *, group=None, vocab_start=None, **options):
    """logits_to_confidence, tensor-parallel when the logits are a vocabulary shard (vocab_start given)."""
    if vocab_start is None:
        if group is not None:
            raise TypeError("dllm::decode_step: group is for vocabulary-sharded logits and needs vocab_start")
        return logits_to_confidence(logits, eligible, **options)
    return distributed.logits_to_confidence(logits, eligible, vocab_start=vocab_start, group=group, **options)


class Step(NamedTuple):
    """What a recipe's step computed: ``x`` (updated in place), the positions it wrote, how many per row,
    and every position's token and score (``-1`` / ``-inf`` where it was not scored)."""

    x: torch.Tensor
    selected: torch.Tensor
    count: torch.Tensor
    token: torch.Tensor
    score: torch.Tensor


def _unshift(token, score):
    """Position j's token and score of a shifted step (computed on [1, L)) moved to j; position 0: none."""
    pad = torch.nn.functional.pad
    return pad(token, (1, 0), value=-1), pad(score, (1, 0), value=-math.inf)


def _scored(logits, eligible, shift, **options):
    """(token, score, eligible) of the positions a step scores, shifted when the recipe reads position j's
    prediction from the logits of j - 1 (Dream, Fast-dLLM v2)."""
    if shift:
        logits, eligible = logits[:, :-1], eligible[:, 1:]
    token, score = _confidence(logits, eligible, **options)
    return token, score, eligible


def _step(logits, x, eligible, *, shift=False, **options):
    confidence_options = {name: options.pop(name) for name in _CONFIDENCE_OPTIONS if name in options}
    token, score, eligible = _scored(logits, eligible, shift, **confidence_options)
    selected, count = select_unmask(score, eligible, token=token, x=x[:, 1:] if shift else x, **options)
    if shift:
        token, score = _unshift(token, score)
        selected = torch.nn.functional.pad(selected, (1, 0))
    return Step(x, selected, count, token, score)


def _check_state(option: str, value, expected: str, ok: bool):
    """A tensor option a recipe keeps between steps (its state, a mask, a length), checked before writing."""
    if not ok:
        got = (
            f"{type(value).__name__} of shape {list(value.shape)}" if torch.is_tensor(value) else repr(value)
        )
        raise TypeError(f"dllm::decode_step: {option} must be {expected}; got {got}")


def _is_matrix(t, x, dtype) -> bool:
    return torch.is_tensor(t) and t.dtype == dtype and t.shape == x.shape and t.device == x.device


def _is_row_counts(t, x) -> bool:
    """An integer ``[B]`` tensor on x's device (a count or a length per row)."""
    return (
        torch.is_tensor(t)
        and not t.is_floating_point()
        and t.dtype != torch.bool
        and t.shape == x.shape[:1]
        and t.device == x.device
    )


def _choice(option, value, choices: dict):
    if value not in choices:
        raise ValueError(
            f"dllm::decode_step: {option} must be one of {', '.join(map(repr, choices))}; got {value!r}"
        )
    return choices[value]


def llada(logits, x, eligible, *, k, remasking="low_confidence", temperature=0.0, **options):
    """LLaDA ``generate.py``: Gumbel-max token at ``temperature``, confidence ``softmax(l)[token]``
    (``remasking="low_confidence"``) or uniform noise (``"random"``); unmask the ``k[b]`` most confident
    (``k`` from ``schedules.llada_transfer_counts``)."""
    score = _choice("remasking", remasking, {"low_confidence": "prob", "random": "random"})
    return _step(
        logits,
        x,
        eligible,
        temperature=temperature,
        score=score,
        policy="topk",
        k=k,
        min_per_row=0,
        **options,
    )


def fast_dllm(
    logits, x, eligible, *, threshold=0.9, factor=None, factor_rule="upstream", temperature=0.0, **options
):
    """Fast-dLLM v1 (``llada/generate.py``): LLaDA's token and ``softmax(l)[token]`` (Fast-dLLM computes it
    in fp64; here fp32 accumulation, see the module docstring); unmask every
    position with ``confidence >= threshold`` and always the best one, or, with ``factor``, the
    ``c_i >= 1 - factor / (i + 1)`` prefix. ``factor_rule="upstream"`` (default) is the released loop,
    which also commits the last rank when that is the first to fail (policy ``factor_upstream``);
    ``"as_written"`` is the paper's rule (policy ``factor``)."""
    if factor is None:
        selection = dict(policy="threshold", threshold=threshold, inclusive=True)
    else:
        policy = _choice("factor_rule", factor_rule, {"upstream": "factor_upstream", "as_written": "factor"})
        selection = dict(policy=policy, factor=factor)
    return _step(logits, x, eligible, temperature=temperature, min_per_row=1, **selection, **options)


def fast_dllm_v2(logits, x, eligible, *, threshold=0.95, temperature=0.0, **options):
    """Fast-dLLM v2 (``batch_sample``): logits shifted by one; ``p = softmax(l / T)``; unmask
    ``p[token] > threshold`` inside the sub-block (``eligible``), always the best one. Every row is
    sampled (v2 samples only row 0; no top-p here). Upstream's softmax runs in the logits' dtype, so with
    bf16 logits it compares bf16 probabilities (0.95 acts as 0.9492); this compares exact ones."""
    return _step(
        logits,
        x,
        eligible,
        shift=True,
        temperature=temperature,
        tempered_score=True,
        policy="threshold",
        threshold=threshold,
        inclusive=False,
        min_per_row=1,
        **options,
    )


def dream(logits, x, eligible, *, k, alg="maskgit_plus", temperature=0.0, **options):
    """Dream ``_sample`` with ``alg_temp=None`` and no top-p / top-k: logits shifted by one,
    ``p = softmax(l / T)``, confidence ``p[token]`` ("maskgit_plus"), ``p_top1 - p_top2``
    ("topk_margin") or ``sum p log p`` ("entropy"; Dream adds 1e-10 inside the log, this is exact);
    unmask the ``k[b]`` most confident (``k`` from ``schedules.dream_transfer_count``, per row)."""
    score = _choice("alg", alg, {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"})
    return _step(
        logits,
        x,
        eligible,
        shift=True,
        temperature=temperature,
        score=score,
        tempered_score=True,
        policy="topk",
        k=k,
        min_per_row=0,
        **options,
    )


def sdar(logits, x, eligible, *, k, threshold=0.85, temperature=1.0, **options):
    """SDAR ``low_confidence_dynamic``: ``p = softmax(l / T)``, sampled token; if at least ``k[b]``
    positions have ``p[token] > threshold`` unmask all of them, else the top ``k[b]``."""
    return _step(
        logits,
        x,
        eligible,
        temperature=temperature,
        tempered_score=True,
        policy="topk_or_threshold",
        k=k,
        threshold=threshold,
        inclusive=False,
        min_per_row=0,
        **options,
    )


def dparallel(logits, x, eligible, *, threshold=0.5, temperature=0.0, **options):
    """dParallel (LLaDA version): unmask every position whose entropy of ``softmax(l)`` is
    ``<= threshold``, and always the lowest-entropy one (dParallel adds 1e-12 inside the log; this is
    exact)."""
    return _step(
        logits,
        x,
        eligible,
        temperature=temperature,
        score="neg_entropy",
        policy="threshold",
        threshold=-threshold,
        inclusive=True,
        min_per_row=1,
        **options,
    )


def prophet(
    logits,
    x,
    eligible,
    *,
    k,
    mask_id,
    gap_threshold,
    answer_start=0,
    gap_positions=5,
    temperature=0.0,
    **options,
):
    """Prophet: the mean raw top-1 / top-2 logit gap over ``gap_positions`` positions from
    ``answer_start``; a row whose gap reaches ``gap_threshold`` (7.5 / 5.0 / 2.5 by progress in the
    paper) commits every masked position at once, the others take a LLaDA step of ``k[b]``. The decision
    is per row and stays on the device."""
    window = logits[:, answer_start : answer_start + gap_positions]
    sharding = {name: options[name] for name in ("group", "vocab_start") if name in options}
    gap = _confidence(window, None, score="logit_margin", **sharding)[1].mean(-1)
    commit_all = gap >= gap_threshold
    masked = x == mask_id
    every = torch.full_like(k, x.shape[1])
    return _step(
        logits,
        x,
        torch.where(commit_all[:, None], masked, eligible),
        temperature=temperature,
        policy="topk",
        k=torch.where(commit_all, every, k),
        min_per_row=0,
        **options,
    )


def local_leap(
    logits, x, eligible, *, threshold=0.9, relaxed_threshold=0.75, radius=4, temperature=0.0, **options
):
    """LocalLeap (anchor-neighbourhood decoding, LLaDA ``get_transfer_index``): confidence
    ``softmax(l)[token]``; anchors are eligible positions with ``confidence >= threshold``; commit every
    position with ``confidence >= relaxed_threshold`` within ``radius`` positions of an anchor, every
    other one with ``confidence >= threshold``, and always the most confident one."""
    return _step(
        logits,
        x,
        eligible,
        temperature=temperature,
        policy="local_leap",
        threshold=threshold,
        low_threshold=relaxed_threshold,
        radius=radius,
        inclusive=True,
        min_per_row=1,
        **options,
    )


def hierarchy(logits, x, eligible, *, threshold=None, low_threshold=0.4, temperature=0.0, **options):
    """dInfer ``HierarchyDecoder``: confidence ``softmax(l)[token]``; in each run of consecutive eligible
    positions commit its most confident position(s) when ``> low_threshold``, plus every position
    ``> threshold`` (``None``, upstream's default: none) and always the row's most confident one."""
    return _step(
        logits,
        x,
        eligible,
        temperature=temperature,
        policy="hierarchy",
        threshold=1.0 if threshold is None else threshold,  # a probability is never > 1
        low_threshold=low_threshold,
        inclusive=False,
        min_per_row=1,
        **options,
    )


def credit(
    logits,
    x,
    eligible,
    *,
    credit,
    mask_id,
    threshold=0.9,
    alpha=0.7,
    beta=0.8,
    gamma=0.2,
    margin=1e-5,
    banned=None,
):
    """dInfer ``CreditThresholdParallelDecoder`` (CreditDecoding): ``credit = (credit_token,
    credit_value)`` from ``credit_state``, reset at each block's start, updated in place
    (``credit_confidence``: decay by ``beta``, ``p_top1 ** gamma`` to each eligible position's raw argmax,
    token and score from the fused logits ``l + alpha * log(C + 1)``). dInfer's threshold rule then
    commits the eligible positions whose token is not ``mask_id`` with ``score >= min(threshold,
    best - margin)`` (``near_best``): everything at or above the threshold, else the best and its near
    ties."""
    _check_state(
        "credit",
        credit,
        "the (credit_token, credit_value) pair of credit_state",
        isinstance(credit, tuple) and len(credit) == 2,
    )
    token, score = credit_confidence(
        logits, eligible, *credit, alpha=alpha, beta=beta, gamma=gamma, banned=banned
    )
    candidates = eligible & (token != mask_id)
    selected, count = select_unmask(
        score,
        candidates,
        policy="near_best",
        threshold=threshold,
        margin=margin,
        inclusive=True,
        min_per_row=1,
        token=token,
        x=x,
    )
    return Step(x, selected, count, token, score)


def joint_threshold(
    logits, x, eligible, *, editable, threshold=0.5, edit_threshold=0.0, temperature=0.0, **options
):
    """SGLang ``JointThreshold`` (LLaDA 2.x editing): confidence ``softmax(l)[token]`` over the eligible
    (masked) and ``editable`` positions (decoded, non-prompt, inside the block; bool ``[B, L]``, disjoint
    from ``eligible``). Unmask every eligible position ``> threshold``, at least the most confident one,
    and rewrite every editable position whose token differs from ``x`` with ``confidence >
    edit_threshold``. The loop bounds the steps after the block is full (docs/recipes.md)."""
    _check_state("editable", editable, "bool [B, L] on x's device", _is_matrix(editable, x, torch.bool))
    token, score, _ = _scored(logits, eligible | editable, False, temperature=temperature, **options)
    unmask, _ = select_unmask(score, eligible, policy="threshold", threshold=threshold, min_per_row=1)
    edit = editable & ~eligible & (token != x) & (score.double() > edit_threshold)
    selected = unmask | edit
    x.copy_(torch.where(selected, token, x))
    return Step(x, selected, selected.sum(-1, dtype=torch.int32), token, score)


@dataclasses.dataclass
class CCDState:
    """Coherent Contextual Decoding's state per row, on the device: steps taken, the verification buffer's
    size ``n_v``, the argmax of every position at the previous step and the buffer's positions. Make one
    with ``ccd_state(x)`` when a generation starts; the step updates it in place."""

    step: torch.Tensor  # int64 [B]
    buffer_size: torch.Tensor  # int64 [B]
    previous_token: torch.Tensor  # int64 [B, L]
    buffer: torch.Tensor  # bool [B, L]


def ccd_state(x: torch.Tensor) -> CCDState:
    """A fresh ``CCDState`` for the sequences ``x`` (int64 ``[B, L]``)."""
    rows = x.shape[0]
    return CCDState(
        step=torch.zeros(rows, dtype=torch.int64, device=x.device),
        buffer_size=torch.ones(rows, dtype=torch.int64, device=x.device),
        previous_token=torch.full_like(x, -1),
        buffer=torch.zeros(x.shape, dtype=torch.bool, device=x.device),
    )


def _first_in_order(chosen, order, n):
    """The first ``n[b]`` positions of ``chosen`` (bool ``[B, L]``) in the ranking ``order``."""
    in_order = chosen.gather(1, order)
    keep = in_order & (in_order.cumsum(-1) <= n[:, None])
    return torch.zeros_like(chosen).scatter(1, order, keep)


def ccd(
    logits,
    x,
    eligible,
    *,
    k,
    state,
    gen_length,
    steps,
    expand_ratio=4.0,
    warmup=5,
    seek_mode=True,
    **options,
):
    """CCD, Coherent Contextual Decoding (released Dream code, ``_sample_inference_lookahead``): logits
    shifted by one; score ``sum p log p``; ``k[b]`` tokens a step (upstream ``int(gen_length / steps)``).
    From step ``warmup`` until the last of ``steps``, accept the current top-``n_v`` positions that were in
    the previous step's buffer and whose argmax did not change, when at least ``k`` do and a top-``k``
    position was buffered; else commit the top ``k``. ``n_v`` grows by one a step up to ``k + int(k *
    expand_ratio)`` (1 during the warm-up, 2 once at most a tenth of ``gen_length`` is masked). ``state``
    from ``ccd_state``."""
    _check_state(
        "state",
        state,
        "the CCDState of ccd_state(x)",
        isinstance(state, CCDState) and _is_matrix(state.buffer, x, torch.bool),
    )
    _check_state("k", k, "an integer [B] tensor on x's device", _is_row_counts(k, x))
    token, score = _unshift(*_scored(logits, eligible, True, score="neg_entropy", **options)[:2])
    i, k = state.step, k.long()
    n_mask = eligible.sum(-1)
    n_v = torch.where(n_mask <= 0.1 * gen_length, 1, state.buffer_size)
    n_v = torch.where((i < warmup - 1) | (i == 0), 1, torch.minimum(n_v + 1, k + (k * expand_ratio).long()))
    n_d = 2 * n_v

    # One ranking serves every top-n below: score descending, lower position first, scored positions only.
    selectable = eligible & (score > -math.inf)
    order = torch.sort(
        torch.where(selectable, score, -math.inf), dim=-1, descending=True, stable=True
    ).indices
    positions = torch.arange(x.shape[1], device=x.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    rank = torch.where(selectable, rank, x.shape[1])
    top_k = rank < k[:, None]

    verify = (i >= warmup) & (i < steps - 1)
    buffered = state.buffer
    agree = (rank < n_v[:, None]) & buffered & (token == state.previous_token)
    n_agree = agree.sum(-1)
    accept = verify & (top_k & buffered).any(-1) & (n_agree >= k)
    accepted = agree if seek_mode else _first_in_order(agree, order, k)
    selected = torch.where(accept[:, None], accepted, top_k)

    # The next buffer: after a fallback the n_v positions ranked after the top k; after an acceptance the
    # best of the top n_d + m that were not accepted; during the warm-up as after a fallback.
    left = (eligible & ~selected).sum(-1)
    after_top_k = (rank >= k[:, None]) & (rank < (k + torch.minimum(n_v, n_mask - k))[:, None])
    pool_size = torch.minimum(n_d + n_agree, n_mask)
    pool_take = torch.where(n_d + n_agree > n_mask, torch.minimum(n_v, left), n_v)
    after_accept = _first_in_order((rank < pool_size[:, None]) & ~agree, order, pool_take)
    warming = (i == warmup - 1) | (i == warmup - 2)
    rebuilt = torch.where((verify & accept)[:, None], after_accept, after_top_k)
    rebuild = (verify & torch.where(accept, left > 0, n_mask > k)) | (~verify & warming)
    state.buffer.copy_(torch.where(rebuild[:, None], rebuilt, buffered))
    state.previous_token.copy_(torch.where((i >= warmup - 1)[:, None], token, state.previous_token))
    state.buffer_size.copy_(n_v)
    state.step.add_(1)

    x.copy_(torch.where(selected, token, x))
    return Step(x, selected, selected.sum(-1, dtype=torch.int32), token, score)


RECIPES = {
    "llada": llada,
    "fast_dllm": fast_dllm,
    "fast_dllm_v2": fast_dllm_v2,
    "dream": dream,
    "sdar": sdar,
    "dparallel": dparallel,
    "prophet": prophet,
    "local_leap": local_leap,
    "hierarchy": hierarchy,
    "credit": credit,
    "joint_threshold": joint_threshold,
    "ccd": ccd,
}


# Recipes whose position j is predicted by the logits of position j - 1 (their step shifts the logits).
SHIFTED_RECIPES = ("fast_dllm_v2", "dream", "ccd")

# Options every recipe passes through to logits_to_confidence (group and vocab_start: tensor-parallel).
_PASS_THROUGH = ("banned", "seed", "offset", "group", "vocab_start")


# Options decode_step itself takes for every recipe: Learn2PD's end-of-text stop (end_of_text).
_STOP_OPTIONS = ("eot_id", "length")


def _recipe_options(recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every option name, the required ones) of a recipe function; a recipe built on logits_to_confidence
    (it takes ``**options``) also passes _PASS_THROUGH on."""
    parameters = inspect.signature(recipe).parameters.values()
    keyword = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    required = tuple(p.name for p in keyword if p.default is inspect.Parameter.empty)
    passed = _PASS_THROUGH if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) else ()
    return (*(p.name for p in keyword), *passed, *_STOP_OPTIONS), required


# Read once: a step checks its options against these, and a signature costs tens of microseconds.
_OPTIONS = {name: _recipe_options(recipe) for name, recipe in RECIPES.items()}
_TEMPERATURE = {
    name: getattr(inspect.signature(recipe).parameters.get("temperature"), "default", 0.0)
    for name, recipe in RECIPES.items()
}


def _check_recipe(name: str):
    if name not in RECIPES:
        raise ValueError(f"dllm::decode_step: recipe must be one of {', '.join(RECIPES)}; got {name!r}")


def requires_k(recipe: str) -> bool:
    """Whether ``recipe`` takes a per-step count ``k`` (a fixed number of steps per block) or decides its
    count from the scores (threshold rules: a block ends when its last position is committed)."""
    _check_recipe(recipe)
    return "k" in _OPTIONS[recipe][1]


def draws_random(recipe: str, **options) -> bool:
    """Whether a step of ``recipe`` with ``options`` reads the random numbers of ``(seed, offset)``: a
    temperature above 0 (the option, else the recipe's default: ``sdar`` samples) or random remasking."""
    _check_recipe(recipe)
    return options.get("temperature", _TEMPERATURE[recipe]) > 0 or options.get("remasking") == "random"


def end_of_text(x, token, score, eligible, selected, *, eot_id: int, length: torch.Tensor) -> torch.Tensor:
    """Learn2PD's End-of-Text Prediction as a per-row stop, in place and without a host sync.

    A row stops at ``p``: its leftmost position committed this step (``selected``) as ``eot_id``, else its
    eligible position predicted as ``eot_id`` with the highest ``score`` (lowest position on ties), else
    nowhere. Every position after ``p`` becomes ``eot_id`` (upstream cuts the sequence there; ``p`` itself
    keeps what it holds) and ``length[b]`` (int ``[B]``, the row's valid length, ``L`` at the start) drops
    to ``p + 1`` if that is shorter. Returns ``length``."""
    positions = torch.arange(x.shape[1], device=x.device)
    committed = selected & (token == eot_id)
    predicted = eligible & (token == eot_id)
    best = torch.where(predicted, score, -math.inf).argmax(-1)  # NaN never predicts: its token is -1
    first = torch.where(committed, positions, x.shape[1]).amin(-1)
    stop = torch.where(committed.any(-1), first, torch.where(predicted.any(-1), best, x.shape[1]))
    x.masked_fill_(positions > stop[:, None], eot_id)
    length.copy_(torch.minimum(length, (stop + 1).to(length.dtype)))
    return length


def _check_jacobi(logits, draft, start):
    err = OpError("jacobi_accept")
    err.dtype("draft", draft, (torch.int64,))
    if draft.dim() != 2 or draft.shape[1] < 1:
        err(f"draft must be [B, n] with n >= 1 (column 0 the last committed token); got {describe(draft)}")
    err.tensor("logits", logits)
    rows, n = draft.shape
    if logits.dim() != 3 or logits.shape[0] != rows or logits.shape[1] < n - 1:
        err(f"logits must be [{rows}, >= {n - 1}, V] (draft is [{rows}, {n}]); got {describe(logits)}")
    err.tensor("start", start)
    if start.shape != (rows,) or start.is_floating_point() or start.dtype == torch.bool:
        err(f"start must be an integer [{rows}] tensor; got {start.dtype} {describe(start)}")
    for name, t in (("logits", logits), ("start", start)):
        err.same_device(name, t, "draft", draft)


def jacobi_accept(
    logits: torch.Tensor, draft: torch.Tensor, start: torch.Tensor, *, eos_id: int | None = None
):
    """Jacobi Forcing's greedy prefix acceptance of the drafts ``draft`` (int64 ``[B, n]``, column 0 the
    last committed token, at position ``start[b]``), verified by causal ``logits[:, i]`` (``[B, >= n - 1,
    V]``) predicting ``draft[:, i + 1]``.

    Returns ``(accepted, kv_len, eos, token)``: ``accepted`` int64 ``[B]`` = 1 + the longest prefix of
    ``draft[:, 1:]`` equal to the argmax ``token`` (int64 ``[B, n - 1]``), cut just after the first
    ``eos_id`` in it (``eos`` bool ``[B]`` says so); ``kv_len`` int32 ``[B]`` = ``start + accepted``, the
    valid length of each row's KV cache for ``block_attention`` (the rejected tail is dropped by reading
    no further). ``token[b, accepted[b] - 1]`` (when ``accepted < n``) is the next token to draft from."""
    _check_jacobi(logits, draft, start)
    n = draft.shape[1]
    token, _ = logits_to_confidence(logits[:, : n - 1])
    matched = (draft[:, 1:] == token).long().cumprod(-1).sum(-1)
    accepted = matched + 1
    if eos_id is None:
        eos = torch.zeros_like(accepted, dtype=torch.bool)
    else:
        is_eos = (draft[:, 1:] == eos_id) & (torch.arange(n - 1, device=draft.device) < matched[:, None])
        eos = is_eos.any(-1)
        accepted = torch.where(eos, is_eos.int().argmax(-1) + 2, accepted)
    return accepted, (start + accepted).to(torch.int32), eos, token


def decode_step(logits: torch.Tensor, x: torch.Tensor, eligible: torch.Tensor, *, recipe: str, **options):
    """One decode step of ``recipe`` (one of ``RECIPES``): returns ``(x, selected, count)``, ``x`` updated
    in place. ``options`` are the recipe's keyword arguments (see each recipe's docstring) plus
    ``banned``, ``seed`` and ``offset`` for ``logits_to_confidence``, and for every recipe the end-of-text
    stop: ``eot_id`` and ``length`` (``end_of_text`` after the step).

    Tensor-parallel: with ``vocab_start`` (and ``group``, default the whole world) ``logits`` is this rank's
    vocabulary shard (``dllm_kernels.distributed``); every rank passes the same ``x`` and ``eligible`` and
    ends with the same ``x``, with no broadcast."""
    _check_recipe(recipe)
    names, required = _OPTIONS[recipe]
    unknown = [name for name in options if name not in names]
    if unknown:
        raise TypeError(
            f"dllm::decode_step: recipe {recipe!r} takes the options {', '.join(names)}; "
            f"got unknown {', '.join(map(repr, unknown))}"
        )
    missing = [name for name in required if name not in options]
    if missing:
        raise TypeError(f"dllm::decode_step: recipe {recipe!r} needs {', '.join(missing)}; got none")
    eot_id, length = options.pop("eot_id", None), options.pop("length", None)
    if (eot_id is None) != (length is None):
        raise TypeError("dllm::decode_step: eot_id and length go together (the end-of-text stop); got one")
    if length is not None:
        _check_state("length", length, "an integer [B] tensor on x's device", _is_row_counts(length, x))
    step = RECIPES[recipe](logits, x, eligible, **options)
    if eot_id is not None:
        end_of_text(x, step.token, step.score, eligible, step.selected, eot_id=eot_id, length=length)
    return step.x, step.selected, step.count
