"""Tensor-parallel logits_to_confidence: the partial-state and merge ops on every backend, and
dllm_kernels.distributed on local gloo worlds of 2 and 3 ranks, all against the single-device op on the
whole logits: tokens exactly, scores within fp32 rounding, every rank the same.

Each world is spawned once per test session (module fixture) and runs every scenario; the tests then
check its answers. Shards are uneven and rarely multiples of 4 (the Philox word of a column depends on
col % 4), banned ids sit on the shard borders, and rows with NaN, with nothing finite, and with equal
maxima in two shards are in every batch.
"""

import itertools

import pytest
import torch
from helpers import DEVICES, KERNEL_BACKENDS, assert_close

import dllm_kernels
from dllm_kernels import _local_world, distributed, use_backend
from dllm_kernels.ops import logits_to_confidence as l2c
from dllm_kernels.ops.logits_to_confidence import logits_to_confidence_merge, logits_to_confidence_partial

SCORES = l2c.SCORES
# Triton runs under the interpreter here: its cases stay small.
SHAPE = {"triton": (2, 3, 301)}
DEFAULT_SHAPE = (2, 5, 989)
NEG_INF = float("-inf")


def uneven_cuts(vocab, world, generator, min_width=3):
    """Shard borders [0, c_1, ..., vocab] at random, every shard at least min_width wide."""
    while True:
        inner = sorted(torch.randperm(vocab - 1, generator=generator)[: world - 1].add(1).tolist())
        cuts = [0, *inner, vocab]
        if all(b - a >= min_width for a, b in itertools.pairwise(cuts)):
            return cuts


def special_rows(logits, cuts):
    """Row 0: a NaN in the last shard; row 1: nothing finite; row 2: the maximum twice, in the first and
    the last shard (argmax -> the first); row 3: the maximum at a banned shard border. The banned ids are
    the borders c - 1, c and vocab - 1; shards of 3 or more keep the other positions here unbanned."""
    rows = logits.view(-1, logits.shape[-1])
    vocab = rows.shape[1]
    rows[0, cuts[-2] + (vocab - cuts[-2]) // 2] = float("nan")
    rows[1] = NEG_INF
    top = rows[2].float().abs().max() + 1
    rows[2, 0] = top
    rows[2, vocab - 2] = top
    rows[3, min(cuts[1], vocab - 1)] = rows[3].float().abs().max() + 1  # banned either way
    return logits


def make_case(shape, dtype, world, score, temperature, tempered, generator):
    vocab = shape[-1]
    cuts = uneven_cuts(vocab, world, generator)
    logits = (torch.randn(shape, generator=generator) * 3).to(dtype)
    special_rows(logits, cuts)
    borders = [c for c in cuts[1:-1] for c in (c - 1, c)]
    banned = torch.tensor([*borders, -3, vocab + 5, vocab - 1], dtype=torch.int64)
    eligible = torch.rand(shape[:-1], generator=generator) < 0.8
    eligible.view(-1)[:4] = True
    options = dict(
        temperature=temperature,
        score=score,
        tempered_score=tempered,
        banned=banned,
        seed=int(torch.randint(0, 2**40, (1,), generator=generator)),
        offset=int(torch.randint(0, 2**33, (1,), generator=generator)),
    )
    return dict(logits=logits, eligible=eligible, cuts=cuts, options=options)


def cases_for(backend, world, generator):
    shape = SHAPE.get(backend, DEFAULT_SHAPE)
    out = []
    for score, temperature in itertools.product(SCORES, (0.0, 0.7)):
        dtype = (torch.bfloat16, torch.float32)[len(out) % 2]
        tempered = bool(torch.randint(0, 2, (1,), generator=generator))
        out.append(make_case(shape, dtype, world, score, temperature, tempered, generator))
    return out


def single_device(backend, case):
    with use_backend(backend):
        return dllm_kernels.logits_to_confidence(case["logits"], case["eligible"], **case["options"])


def check_same(actual, expected, what):
    token, score = actual
    ref_token, ref_score = expected
    assert torch.equal(token, ref_token), (
        f"{what}: tokens differ at {(token != ref_token).nonzero().tolist()}"
    )
    assert_close(score, ref_score, what)


# --- the two halves as ops, in one process --------------------------------------------------------------


def partial_then_merge(case, order):
    cuts, options = case["cuts"], dict(case["options"])
    parts = [
        logits_to_confidence_partial(case["logits"][..., a:b], case["eligible"], vocab_start=a, **options)
        for a, b in itertools.pairwise(cuts)
    ]
    del options["banned"]
    states = torch.stack([parts[i] for i in order])
    return logits_to_confidence_merge(states, vocab_size=cuts[-1], **options)


def to_device(case, device):
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    options = case["options"]
    return {**moved, "options": {**options, "banned": options["banned"].to(device)}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_partial_then_merge_is_the_op(backend, world, device):
    reason = l2c.partial_dispatcher.why_not(backend, torch.device(device), explicit=True)
    if reason is not None:
        pytest.skip(reason)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for case in cases_for(backend, world, generator):
        case = to_device(case, device)
        order = torch.randperm(world, generator=generator).tolist()  # shards merge in any order
        with use_backend(backend):
            actual = partial_then_merge(case, order)
        check_same(actual, single_device(backend, case), f"{backend} {case['options']} cuts {case['cuts']}")


def test_partial_splits_a_shard_across_threads_and_programs():
    """One eligible row of a wide shard: the CPU kernel splits it across threads, Triton across programs."""
    logits = torch.randn(1, 70001) * 3
    for options in (dict(), dict(temperature=0.9, score="neg_entropy", seed=3)):
        case = dict(logits=logits, eligible=None, cuts=[0, 30003, 70001], options={**options, "banned": None})
        for backend in ("cpu", "reference"):
            with use_backend(backend):
                check_same(
                    partial_then_merge(case, [1, 0]), single_device(backend, case), f"{backend} {options}"
                )
    from dllm_kernels.triton_kernels.logits_to_confidence import logits_to_confidence as launch

    logits = torch.randn(2, 3, 701) * 3
    for options in (dict(temperature=0.0, score="margin"), dict(temperature=0.8, score="prob")):
        states = torch.stack(
            [
                launch(
                    logits[..., a:b],
                    None,
                    None,
                    options["temperature"],
                    options["score"],
                    False,
                    5,
                    7,
                    vocab_start=a,
                    num_splits=3,
                )
                for a, b in ((0, 333), (333, 701))
            ]
        )
        with use_backend("triton"):
            actual = logits_to_confidence_merge(states, vocab_size=701, seed=5, offset=7, **options)
            expected = dllm_kernels.logits_to_confidence(logits, seed=5, offset=7, **options)
        check_same(actual, expected, f"triton, 3 programs a shard, {options}")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = (torch.randn(3, 5, 301, device=device) * 3).bfloat16()
    eligible = torch.rand(3, 5, device=device) < 0.5
    banned = torch.tensor([100, 300], device=device)
    for kwargs in (
        dict(vocab_start=0),
        dict(vocab_start=101, score="margin", banned=banned),
        dict(vocab_start=7, temperature=0.7, score="neg_entropy", tempered_score=True, seed=4, offset=9),
    ):
        torch.library.opcheck(torch.ops.dllm.logits_to_confidence_partial.default, (logits, eligible), kwargs)
        states = torch.stack([logits_to_confidence_partial(logits, eligible, **kwargs)] * 2)
        merge_kwargs = {k: v for k, v in kwargs.items() if k not in ("vocab_start", "banned")}
        torch.library.opcheck(
            torch.ops.dllm.logits_to_confidence_merge.default, (states,), dict(vocab_size=602, **merge_kwargs)
        )


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def step(first, second, eligible):
        states = torch.stack(
            [
                logits_to_confidence_partial(first, eligible, score="margin"),
                logits_to_confidence_partial(second, eligible, vocab_start=first.shape[-1], score="margin"),
            ]
        )
        token, score = logits_to_confidence_merge(
            states, vocab_size=first.shape[-1] + second.shape[-1], score="margin"
        )
        return torch.where(score > 0.1, token, -2), score.sum()

    logits = (torch.randn(2, 9, 1000) * 3).bfloat16()
    eligible = torch.rand(2, 9) < 0.5
    token, total = step(logits[..., :413], logits[..., 413:], eligible)
    ref_token, ref_score = dllm_kernels.logits_to_confidence(logits, eligible, score="margin")
    assert torch.equal(token, torch.where(ref_score > 0.1, ref_token, -2))
    assert_close(total, ref_score.sum())


def test_world_of_one_is_the_plain_op():
    logits = torch.randn(3, 4, 99)
    for options in (dict(), dict(temperature=0.5, score="margin", seed=2)):
        check_same(
            distributed.logits_to_confidence(logits, vocab_start=0, **options),
            dllm_kernels.logits_to_confidence(logits, **options),
            f"{options}",
        )
    with pytest.raises(ValueError, match=r"^dllm::distributed.logits_to_confidence: .*vocab_start must be 0"):
        distributed.logits_to_confidence(logits, vocab_start=5)


def test_bad_input_errors():
    logits = torch.randn(2, 3, 50)
    states = torch.stack([logits_to_confidence_partial(logits)] * 2)
    bad_partial = (
        (dict(vocab_start=-1), ValueError, "vocab_start must be in"),
        (dict(vocab_start=2**31 - 50), ValueError, "vocab_start must be in"),
        (dict(score="best"), ValueError, "score must be one of"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(vocab_start=2**70), ValueError, "vocab_start must be an int in"),
    )
    for kwargs, exc, message in bad_partial:
        with pytest.raises(exc, match=rf"^dllm::logits_to_confidence_partial: .*{message}"):
            logits_to_confidence_partial(logits, **kwargs)
    bad_merge = (
        ((states.float(),), dict(vocab_size=100), TypeError, "states must be float64"),
        (
            (states[..., :7],),
            dict(vocab_size=100),
            RuntimeError,
            r"states must have shape \[P >= 1, \.\.\., 8\]",
        ),
        ((states[0, 0, 0],), dict(vocab_size=100), RuntimeError, "states must have shape"),
        ((states,), dict(vocab_size=0), ValueError, "vocab_size must be in"),
        ((states,), dict(vocab_size=100, score="x"), ValueError, "score must be one of"),
    )
    for args, kwargs, exc, message in bad_merge:
        with pytest.raises(exc, match=rf"^dllm::logits_to_confidence_merge: {message}"):
            logits_to_confidence_merge(*args, **kwargs)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'vocab_size'"):
        logits_to_confidence_merge(states)


# --- local gloo worlds ------------------------------------------------------------------------------------

RECIPE_OPTIONS = {
    "llada": dict(k=torch.tensor([3, 1])),
    "fast_dllm": dict(threshold=0.3),
    "fast_dllm_v2": dict(threshold=0.2, temperature=0.9, seed=11),
    "dream": dict(k=torch.tensor([2, 4]), alg="entropy"),
    "sdar": dict(k=torch.tensor([2, 2]), threshold=0.3, seed=5, offset=2),
    "dparallel": dict(threshold=3.0),
    "prophet": dict(k=torch.tensor([1, 2]), mask_id=900, gap_threshold=2.0, answer_start=2),
}
MASK = 900  # outside the 811-column vocabulary of the recipe cases


def recipe_case(world, generator):
    logits = torch.randn(2, 16, 811, generator=generator) * 3
    x = torch.randint(0, 811, (2, 16), generator=generator)
    x[torch.rand(2, 16, generator=generator) < 0.6] = MASK
    x[:, ::3] = MASK
    eligible = x == MASK
    eligible[:, 12:] = False
    cuts = uneven_cuts(811, world, generator)
    return dict(logits=logits, x=x, eligible=eligible, cuts=cuts)


TILE = "the shards must tile the vocabulary"


def bad_calls(rank, world):
    """{name: (shard, vocab_start, options, backend, culprit, message)}: calls that some rank gets wrong.
    Every rank must raise: with ``message`` when no single rank is at fault (culprit None); else the
    culprit rank with ``message`` and every other rank naming the culprit."""
    logits = torch.randn(2, 3, 10 * world)
    start = 10 * rank

    def shard(width=10, rows=2):
        return logits[:rows, :, start : start + width]

    last = world - 1
    return {
        "widths do not add up": (shard(9 if rank == 0 else 10), start, {}, None, None, TILE),
        "shards overlap": (shard(), start - (rank == last), {}, None, None, TILE),
        "vocab_start past the vocabulary": (shard(), start + 15 * (rank == last), {}, None, None, TILE),
        "vocab_start negative": (shard(), -1 if rank == 1 else start, {}, None, 1, "vocab_start must be in"),
        "vocab_start not an int": (
            shard(),
            float(start) if rank == 1 else start,
            {},
            None,
            1,
            "vocab_start must be an int",
        ),
        "ranks disagree on B": (
            shard(rows=1 if rank == 1 else 2),
            start,
            {},
            None,
            None,
            "same logits.shape",
        ),
        "ranks disagree on the options": (
            shard(),
            start,
            dict(temperature=0.5 if rank == 0 else 0.0),
            None,
            None,
            "same options",
        ),
        "a pinned backend that cannot run the call": (
            shard(),
            start,
            {},
            "cuda" if rank == 0 else None,
            0,
            "backend 'cuda' was requested but cannot run",
        ),
    }


def rank_scenarios(rank, world, cases, recipes):
    """Runs on every rank of the world: every bad call first (the world must stay in step after them),
    then every case and recipe; returns what each gave."""
    errors = {}
    for name, (logits, start, options, backend, _, _) in bad_calls(rank, world).items():
        try:
            with use_backend(backend):
                distributed.logits_to_confidence(logits, vocab_start=start, **options)
            errors[name] = None
        except Exception as e:  # any error: the test checks its message
            errors[name] = str(e)
    answers = {}
    for key, (backend, case) in cases.items():
        a, b = case["cuts"][rank], case["cuts"][rank + 1]
        with use_backend(backend):
            answers[key] = distributed.logits_to_confidence(
                case["logits"][..., a:b], case["eligible"], vocab_start=a, **case["options"]
            )
    steps = {}
    for name, options in RECIPE_OPTIONS.items():
        case = recipes[name]
        a, b = case["cuts"][rank], case["cuts"][rank + 1]
        x = case["x"].clone()
        _, selected, count = dllm_kernels.decode_step(
            case["logits"][..., a:b], x, case["eligible"], recipe=name, vocab_start=a, **options
        )
        steps[name] = (x, selected, count)
    return answers, steps, errors


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_run(request):
    world = request.param
    generator = torch.Generator().manual_seed(request.config.getoption("--seed") + world)
    backends = [
        b
        for b in ("cpu", "reference", "triton")
        if b in dllm_kernels.available_backends() and dllm_kernels.available_backends()[b].available
    ]
    cases = {(b, i): (b, c) for b in backends for i, c in enumerate(cases_for(b, world, generator))}
    recipes = {name: recipe_case(world, generator) for name in RECIPE_OPTIONS}
    results = _local_world.run(rank_scenarios, world, cases, recipes, timeout=600)
    return world, cases, recipes, results


def test_every_rank_gets_the_single_device_answer(world_run):
    world, cases, _, results = world_run
    for key, (backend, case) in cases.items():
        expected = single_device(backend, case)
        for rank, (answers, _, _) in enumerate(results):
            what = f"world {world} rank {rank} {backend} {case['options']} cuts {case['cuts']}"
            check_same(answers[key], expected, what)
            torch.testing.assert_close(answers[key], results[0][0][key], rtol=0, atol=0, equal_nan=True)


def test_every_recipe_leaves_x_identical_on_every_rank(world_run):
    world, _, recipes, results = world_run
    for name, options in RECIPE_OPTIONS.items():
        case = recipes[name]
        x = case["x"].clone()
        _, selected, count = dllm_kernels.decode_step(
            case["logits"], x, case["eligible"], recipe=name, **options
        )
        assert int(count.sum()) > 0, f"{name}: the step commits nothing; the case proves little"
        for rank, (_, steps, _) in enumerate(results):
            got = steps[name]
            for actual, expected, what in zip(
                got, (x, selected, count), ("x", "selected", "count"), strict=True
            ):
                assert torch.equal(actual, expected), f"world {world} rank {rank} {name}: {what} differs"


def test_bad_input_raises_on_every_rank(world_run):
    world, _, _, results = world_run
    for name, (_, _, _, _, culprit, message) in bad_calls(0, world).items():
        for rank, (_, _, errors) in enumerate(results):
            got = errors[name]
            assert got is not None, f"{name}: rank {rank} returned instead of raising"
            expected = message if culprit in (None, rank) else f"rank(s) [{culprit}] rejected their arguments"
            assert got.startswith("dllm::") and expected in got, f"{name}: rank {rank}: {got}"


def test_decode_step_group_without_vocab_start_is_an_error():
    logits = torch.randn(1, 4, 11)
    x = torch.full((1, 4), 11)
    with pytest.raises(TypeError, match=r"^dllm::decode_step: group is for vocabulary-sharded logits"):
        dllm_kernels.decode_step(logits, x, x == 11, recipe="fast_dllm", group=object())
    assert torch.equal(x, torch.full((1, 4), 11)), "a failed step must leave x untouched"
