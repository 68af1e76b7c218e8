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

import inspect

import torch

from . import distributed
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


def _step(logits, x, eligible, *, shift=False, **options):
    if shift:  # position j is predicted by the logits of position j - 1 (Dream, Fast-dLLM v2)
        logits, x_view, eligible = logits[:, :-1], x[:, 1:], eligible[:, 1:]
    else:
        x_view = x
    confidence_options = {name: options.pop(name) for name in _CONFIDENCE_OPTIONS if name in options}
    token, confidence = _confidence(logits, eligible, **confidence_options)
    selected, count = select_unmask(confidence, eligible, token=token, x=x_view, **options)
    if shift:
        selected = torch.nn.functional.pad(selected, (1, 0))
    return x, selected, count


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


RECIPES = {
    "llada": llada,
    "fast_dllm": fast_dllm,
    "fast_dllm_v2": fast_dllm_v2,
    "dream": dream,
    "sdar": sdar,
    "dparallel": dparallel,
    "prophet": prophet,
}


# Recipes whose position j is predicted by the logits of position j - 1 (their step shifts the logits).
SHIFTED_RECIPES = ("fast_dllm_v2", "dream")

# Options every recipe passes through to logits_to_confidence (group and vocab_start: tensor-parallel).
_PASS_THROUGH = ("banned", "seed", "offset", "group", "vocab_start")


def _recipe_options(recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every option name, the required ones) of a recipe function."""
    keyword = [
        p for p in inspect.signature(recipe).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    required = tuple(p.name for p in keyword if p.default is inspect.Parameter.empty)
    return (*(p.name for p in keyword), *_PASS_THROUGH), required


# Read once: a step checks its options against these, and a signature costs tens of microseconds.
_OPTIONS = {name: _recipe_options(recipe) for name, recipe in RECIPES.items()}
_TEMPERATURE = {
    name: inspect.signature(recipe).parameters["temperature"].default for name, recipe in RECIPES.items()
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


def decode_step(logits: torch.Tensor, x: torch.Tensor, eligible: torch.Tensor, *, recipe: str, **options):
    """One decode step of ``recipe`` (one of ``RECIPES``): returns ``(x, selected, count)``, ``x`` updated
    in place. ``options`` are the recipe's keyword arguments (see each recipe's docstring) plus
    ``banned``, ``seed`` and ``offset`` for ``logits_to_confidence``.

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
    return RECIPES[recipe](logits, x, eligible, **options)
