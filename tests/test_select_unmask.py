"""select_unmask: every backend against the reference (exactly), tie order, bounds, commit, errors."""

import math

import pytest
import torch
from helpers import (
    DEVICES,
    KERNEL_BACKENDS,
    run_cuda_emulation,
    run_emulated_cases_on_gpu,
    skip_rows_the_interpreter_repeats,
)

import dllm_kernels
from dllm_kernels import schedules, use_backend
from dllm_kernels.ops._common import rows_view
from dllm_kernels.ops.select_unmask import POLICIES, dispatcher
from dllm_kernels.reference.select_unmask import select_unmask as reference

SHAPES = [(1, 1), (1, 19), (7, 99), (3, 989), (2, 2048)]
SET_RULES = ("local_leap", "hierarchy")
NEW_POLICIES = (*SET_RULES, "near_best")
NEW_SHAPES = [(1, 1), (19, 99), (99, 19), (19, 989), (3, 5000)]
THRESHOLD, LOW = 0.75, 0.5  # fp32 values, so that scores can sit exactly on them


def run(backend, score, eligible, **kwargs):
    reason = dispatcher.why_not(backend, score.device, score, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        return dllm_kernels.select_unmask(score, eligible, **kwargs)


def check(backend, score, eligible, **kwargs):
    """The backend's selection, count and commit equal the reference's exactly."""
    x = kwargs.pop("x", None)
    x_ref = None if x is None else x.clone()
    selected, count = run(backend, score, eligible, x=x, **kwargs)
    ref_selected, ref_count = reference(score, eligible, x=x_ref, **kwargs)
    what = f"{backend} {list(score.shape)} {kwargs.get('policy')} {kwargs}"
    assert selected.dtype == torch.bool and count.dtype == torch.int32, what
    assert selected.shape == score.shape and count.shape == score.shape[:1], what
    assert torch.equal(selected, ref_selected), what
    assert torch.equal(count, ref_count), what
    assert torch.equal(count, selected.sum(-1).int()), what
    if x is not None:
        assert torch.equal(x, x_ref), what
    return selected, count


def random_scores(shape, device, ties=False):
    """Probabilities, a few NaN and -inf; with ties, drawn from a handful of values."""
    score = torch.rand(shape, device=device)
    if ties:
        score = torch.tensor([0.2, 0.5, 0.9, 0.95, 1.0], device=device)[
            torch.randint(0, 5, shape, device=device)
        ]
    score[torch.rand(shape, device=device) < 0.03] = math.nan
    score[torch.rand(shape, device=device) < 0.03] = -math.inf
    return score


def check_all_or_none_eligible(backend, shape, device, **kwargs):
    """Every position eligible with a floor above the row length, then none eligible (two rows say it)."""
    shape = (min(shape[0], 2), shape[1])
    all_in = torch.ones(shape, dtype=torch.bool, device=device)
    k = torch.full((shape[0],), 5, device=device)
    check(backend, torch.rand(shape, device=device), all_in, k=k, min_per_row=1000, **kwargs)
    check(backend, torch.rand(shape, device=device), ~all_in, k=k, **kwargs)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in NEW_POLICIES])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference(backend, device, shape, policy):
    """The count and threshold policies (the set rules have their own arguments: the test below)."""
    n_rows, length = shape
    for ties in (False, True):
        for min_per_row in (0, 1, 3):
            score = random_scores(shape, device, ties)
            eligible = torch.rand(shape, device=device) < 0.6
            k = torch.randint(
                -2, length + 3, (n_rows,), device=device, dtype=torch.int32 if ties else torch.int64
            )
            token = torch.randint(0, 1000, shape, device=device)
            x = torch.full(shape, -7, device=device)
            check(
                backend,
                score,
                eligible,
                policy=policy,
                k=k,
                threshold=0.7,
                inclusive=ties,
                factor=0.6,
                min_per_row=min_per_row,
                token=token,
                x=x,
            )
    check_all_or_none_eligible(backend, shape, device, policy=policy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_boundaries_compare_in_double(backend, device):
    """A score exactly at the threshold or at a factor bound (both sides of fp32 rounding)."""
    threshold = 0.9  # not an fp32 value: float32(0.9) < 0.9 < nextafter
    at32 = torch.tensor(threshold, dtype=torch.float32)
    at, above = at32.item(), torch.nextafter(at32, torch.tensor(2.0)).item()
    score = torch.tensor([[at, above, 0.5, at], [0.5, 0.5, 0.5, 0.5]], device=device)
    eligible = torch.ones_like(score, dtype=torch.bool)
    for inclusive in (False, True):
        selected, _ = check(
            backend,
            score,
            eligible,
            policy="threshold",
            threshold=threshold,
            inclusive=inclusive,
            min_per_row=0,
        )
        assert selected[0].tolist() == [False, True, False, False]  # float32(0.9) < 0.9 in double
    # factor 1: bounds 1 - 1/(i+1) = 2/3, 3/4 (exact), 4/5 at ranks 2, 3, 4
    exact = torch.tensor([[1.0, 0.8, 0.75, 0.7]], device=device)
    selected, count = check(backend, exact, eligible[:1], policy="factor", factor=1.0, min_per_row=0)
    assert count.item() == 3  # c_3 = 0.75 >= 3/4 exactly; c_4 = 0.7 < 4/5
    check(backend, score, eligible, policy="threshold", threshold=at, inclusive=True, min_per_row=0)
    check(backend, score, eligible, policy="threshold", threshold=at, inclusive=False, min_per_row=0)


def test_reference_by_hand():
    score = torch.tensor([[0.5, 0.9, 0.9, math.nan, 0.2, -math.inf, 0.9]])
    eligible = torch.tensor([[True, True, True, True, True, True, False]])
    topk = lambda n, **kw: reference(score, eligible, policy="topk", k=torch.tensor([n]), **kw)[0][0].tolist()
    assert topk(1) == [False, True, False, False, False, False, False]  # tie: lower position first
    assert topk(3) == [True, True, True, False, False, False, False]
    assert topk(9)[:5] == [True] * 3 + [False, True]  # clamped to the 4 selectable; NaN, -inf never
    assert topk(0, min_per_row=0) == [False] * 7
    assert reference(score, eligible, policy="all")[1].item() == 4
    th = reference(score, eligible, policy="threshold", threshold=0.95, min_per_row=2)
    assert th[0][0].tolist() == [False, True, True, False, False, False, False]
    sdar = lambda n: reference(
        score, eligible, policy="topk_or_threshold", k=torch.tensor([n]), threshold=0.6
    )[1]
    assert sdar(2).item() == 2 and sdar(3).item() == 3  # 2 pass: enough for k=2, else the top 3
    # factor 1.0: bounds 1 - 1/3, 1 - 1/4, ... -> 0.9 (rank 1, always), 0.9 >= 0.667, 0.5 < 0.75
    assert reference(score, eligible, policy="factor", factor=1.0)[1].item() == 2
    token = torch.arange(7)[None] + 100
    x = torch.zeros(1, 7, dtype=torch.int64)
    reference(score, eligible, policy="topk", k=torch.tensor([2]), token=token, x=x)
    assert x.tolist() == [[0, 101, 102, 0, 0, 0, 0]]


def rule_inputs(shape, device, ties):
    """Scores and eligibility for the new policies: with ties, a handful of values with THRESHOLD, LOW and
    both zeros among them; NaN and -inf inside runs; runs of a few eligible positions split by gaps, the
    first row one run, the last of several rows nothing eligible."""
    if ties:
        values = torch.tensor([0.2, LOW, 0.6, THRESHOLD, 0.9, 1.0, -0.0, 0.0], device=device)
        score = values[torch.randint(0, len(values), shape, device=device)]
    else:
        score = torch.rand(shape, device=device)
    score[torch.rand(shape, device=device) < 0.05] = math.nan
    score[torch.rand(shape, device=device) < 0.05] = -math.inf
    eligible = torch.rand(shape, device=device) < 0.75
    eligible[0] = True
    if shape[0] > 2:
        eligible[-1] = False
    return score, eligible


@pytest.mark.parametrize("policy", NEW_POLICIES)
@pytest.mark.parametrize("shape", NEW_SHAPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_new_policies_match_reference(backend, device, shape, policy):
    """Scores at the thresholds (inclusive and not), ties, radii past the row, every floor, the commit."""
    skip_rows_the_interpreter_repeats(backend, device, shape[0])
    length = shape[1]
    radii, margins = (0, 1, 4, length + 3), (0.0, 1e-5, 0.1, -0.05)
    combos = [(t, c, m) for t in (False, True) for c in (False, True) for m in (0, 1, 3)]
    if backend == "triton" and device == "cpu":
        combos = [combos[j] for j in (0, 4, 8, 9)]  # the interpreter is slow: each option value once
    for i, (ties, inclusive, min_per_row) in enumerate(combos):
        score, eligible = rule_inputs(shape, device, ties)
        check(
            backend,
            score,
            eligible,
            policy=policy,
            threshold=THRESHOLD,
            inclusive=inclusive,
            min_per_row=min_per_row,
            low_threshold=LOW,
            radius=radii[i % 4],
            margin=margins[i % 4],
            token=torch.randint(0, 1000, shape, device=device),
            x=torch.full(shape, -7, device=device),
        )
    check_all_or_none_eligible(backend, shape, device, policy=policy, threshold=THRESHOLD, low_threshold=LOW)


def test_new_policies_by_hand():
    nan = math.nan
    score = torch.tensor([[0.95, 0.3, 0.6, 0.55, nan, 0.7, 0.2, 0.8, 0.6]])
    eligible = torch.tensor([[True] * 5 + [False] + [True] * 3])

    def chosen(policy, min_per_row=0, **kwargs):
        selected = reference(
            score, eligible, policy=policy, threshold=0.9, min_per_row=min_per_row, **kwargs
        )[0]
        return selected[0].nonzero()[:, 0].tolist()

    # anchor 0.95 at 0; within 2 of it only position 2 passes 0.5 (0.55 at 3 is 3 away)
    assert chosen("local_leap", low_threshold=0.5, radius=2) == [0, 2]
    assert chosen("local_leap", low_threshold=0.5, radius=3) == [0, 2, 3]
    assert chosen("local_leap", low_threshold=0.5, radius=0) == [0]
    # runs [0, 4] (NaN at 4) and [6, 8]: their maxima 0.95 and 0.8
    assert chosen("hierarchy", low_threshold=0.5) == [0, 7]
    assert chosen("hierarchy", low_threshold=0.85) == [0]
    assert chosen("hierarchy", low_threshold=0.85, min_per_row=3) == [0, 2, 7]  # 0.6 tie: lower position
    tied = reference(torch.tensor([[0.6, 0.6, 0.1]]), torch.ones(1, 3, dtype=torch.bool), policy="hierarchy")
    assert tied[0].tolist() == [[True, True, False]] and tied[1].item() == 2  # every tied maximum
    # best 0.95: bound min(0.9, 0.95 - margin)
    assert chosen("near_best", margin=0.2) == [0, 7]
    assert chosen("near_best", margin=0.01) == [0]
    assert chosen("near_best", margin=-0.1, min_per_row=1) == [0]  # nothing passes: the floor
    nothing = torch.zeros(1, 9, dtype=torch.bool)
    for policy in NEW_POLICIES:
        assert reference(score, nothing, policy=policy, min_per_row=3)[1].item() == 0


def local_leap_upstream(p, active, threshold, relaxed, radius):
    """LocalLeap's greedy get_transfer_index, restated: anchors pass the threshold; positions within
    radius of an anchor need only the relaxed bound; the best active position of each row always goes."""
    conf = torch.where(active, p, -torch.inf)
    anchors = active & (conf >= threshold)
    pooled = torch.nn.functional.max_pool1d(anchors.float()[:, None], 2 * radius + 1, 1, radius)[:, 0]
    bound = torch.where(pooled > 0, torch.full_like(conf, relaxed), torch.full_like(conf, threshold))
    keep = active & ~(conf < bound)
    rows = torch.arange(p.shape[0])
    best = conf.argmax(-1)  # the first maximum
    keep[rows[active.any(-1)], best[active.any(-1)]] = True
    return keep


def hierarchy_upstream(conf, masked, tau, low):
    """dInfer's hierarchy step for one row: each run of masked positions keeps its maximum if above low,
    anything above tau goes, and so does the row's argmax; only masked positions."""
    starts = masked & ~torch.cat([torch.zeros(1, dtype=torch.bool), masked[:-1]])
    seg = torch.cumsum(starts.long(), 0) - 1
    seg_max = torch.full((int(starts.sum()),), -torch.inf).scatter_reduce(
        0, seg[masked], conf[masked], "amax"
    )
    transfer = torch.zeros_like(masked)
    transfer[masked] = conf[masked] == seg_max[seg[masked]]
    transfer &= conf > low
    transfer |= conf > tau
    transfer[conf.argmax()] = True
    return transfer & masked


def grid_scores(shape, steps=64):
    """Multiples of 1/steps: many ties, exact in fp32, so fp32 and fp64 comparisons agree."""
    return torch.randint(0, steps + 1, shape) / steps


@pytest.mark.parametrize("radius", [0, 1, 2, 4])
def test_local_leap_equals_upstream(radius):
    for _ in range(5):
        p, active = grid_scores((6, 97)), torch.rand(6, 97) < 0.7
        active[-1] = False
        expected = local_leap_upstream(p, active, THRESHOLD, LOW, radius)
        selected, count = dllm_kernels.select_unmask(
            p,
            active,
            policy="local_leap",
            threshold=THRESHOLD,
            low_threshold=LOW,
            radius=radius,
            inclusive=True,
        )
        assert torch.equal(selected, expected) and torch.equal(count, expected.sum(-1).int())


def test_hierarchy_equals_upstream_row_by_row():
    for _ in range(5):
        p, masked = grid_scores((7, 113)), torch.rand(7, 113) < 0.8
        masked[-1] = False
        conf = torch.where(masked, p, -torch.inf)
        selected, count = dllm_kernels.select_unmask(
            conf,
            masked,
            policy="hierarchy",
            threshold=THRESHOLD,
            low_threshold=LOW,
            inclusive=False,
            min_per_row=1,
        )
        for b in range(7):
            assert torch.equal(selected[b], hierarchy_upstream(conf[b], masked[b], THRESHOLD, LOW)), b
        assert torch.equal(count, selected.sum(-1).int())


def test_near_best_equals_upstream_threshold_rule():
    """dInfer's threshold decoder: conf >= clamp(max(conf) - 1e-5, -1000, tau). On a 1/1024 grid no score
    lies within fp32 rounding of max - 1e-5, nor of tau = 0.9."""
    for _ in range(5):
        p, masked = grid_scores((8, 131), 1024), torch.rand(8, 131) < 0.6
        p[:, 1::3] = p[:, ::3][:, : p[:, 1::3].shape[1]]  # repeated values, ties of the maximum too
        conf = torch.where(masked, p, -torch.inf)
        bound = torch.clamp(conf.max(-1, keepdim=True).values - 1e-5, -1000, 0.9)
        expected = (conf >= bound) & masked
        selected, _ = dllm_kernels.select_unmask(
            conf, masked, policy="near_best", threshold=0.9, margin=1e-5, inclusive=True, min_per_row=0
        )
        assert torch.equal(selected, expected)


@pytest.mark.parametrize("policy", ["topk", *NEW_POLICIES])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_rows_and_commit_through_views(backend, device, policy):
    wide = torch.rand(5, 300, device=device)
    score = wide[:, 20:120]  # row stride 300
    eligible = (torch.rand(5, 200, device=device) < 0.5)[:, ::1][:, 50:150]
    token = torch.randint(0, 9, (5, 400), device=device)[:, :100]
    x_full = torch.full((5, 101), -1, device=device)
    k = torch.randint(0, 30, (10,), device=device)[::2]  # non-contiguous k
    options = dict(threshold=0.6, low_threshold=0.3, radius=2, margin=0.05)
    check(backend, score, eligible, policy=policy, k=k, token=token, x=x_full[:, 1:], **options)
    assert (x_full[:, 0] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_shapes(backend, device):
    for shape in ((0, 5), (3, 0)):
        score = torch.rand(shape, device=device)
        check(backend, score, torch.ones(shape, dtype=torch.bool, device=device), policy="all")


def test_opcheck_and_compile():
    score = random_scores((4, 37), "cpu")
    eligible = torch.rand(4, 37) < 0.7
    k = torch.tensor([1, 0, 5, 40])
    token = torch.randint(0, 50, (4, 37))
    for kwargs in (
        dict(policy="topk", k=k),
        dict(policy="threshold", threshold=0.3, inclusive=True, min_per_row=2),
        dict(policy="factor", factor=0.5, token=token, x=torch.zeros(4, 37, dtype=torch.int64)),
        dict(policy="topk_or_threshold", k=k.int(), threshold=0.5),
        dict(policy="local_leap", threshold=0.8, low_threshold=0.4, radius=3, min_per_row=2),
        dict(policy="hierarchy", low_threshold=0.3, token=token, x=torch.zeros(4, 37, dtype=torch.int64)),
        dict(policy="near_best", threshold=0.95, margin=0.1, inclusive=True),
    ):
        torch.library.opcheck(torch.ops.dllm.select_unmask.default, (score, eligible), kwargs)

    @torch.compile(fullgraph=True)
    def step(score, eligible, k, token, x):
        selected, count = dllm_kernels.select_unmask(score, eligible, policy="topk", k=k, token=token, x=x)
        return selected, count * 2

    x = torch.zeros(4, 37, dtype=torch.int64)
    x_ref = x.clone()
    selected, doubled = step(score, eligible, k, token, x)
    ref_selected, ref_count = reference(score, eligible, policy="topk", k=k, token=token, x=x_ref)
    assert torch.equal(selected, ref_selected) and torch.equal(doubled, ref_count * 2)
    assert torch.equal(x, x_ref), "the commit into x must survive torch.compile"

    options = dict(policy="local_leap", threshold=0.8, low_threshold=0.4, radius=2, min_per_row=0)

    @torch.compile(fullgraph=True)
    def leap(score, eligible, token, x):
        return dllm_kernels.select_unmask(score, eligible, token=token, x=x, **options)

    x.zero_()
    x_ref.zero_()
    selected, count = leap(score, eligible, token, x)
    ref_selected, ref_count = reference(score, eligible, token=token, x=x_ref, **options)
    assert torch.equal(selected, ref_selected) and torch.equal(count, ref_count)
    assert torch.equal(x, x_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_decode_step(backend):
    """A whole decode step (confidence, selection, commit) captured once and replayed on new inputs."""
    device = torch.device("cuda")
    logits = torch.randn(64, 256, 4099, device=device).bfloat16()
    x = torch.full((64, 256), 7, device=device)
    eligible = torch.zeros(64, 256, dtype=torch.bool, device=device)
    eligible[:, 96:128] = True
    for op, arg in (("logits_to_confidence", rows_view(logits)), ("select_unmask", x.float())):
        if getattr(dllm_kernels.ops, op).dispatcher.why_not(backend, device, arg, explicit=True) is not None:
            pytest.skip(f"{backend} cannot run {op} here")
    kwargs = dict(recipe="fast_dllm", threshold=0.5)
    with use_backend(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dllm_kernels.decode_step(logits, x.clone(), eligible, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, selected, count = dllm_kernels.decode_step(logits, x, eligible, **kwargs)
        for _ in range(2):
            logits.copy_(torch.randn_like(logits, dtype=torch.float32))
            x.fill_(7)
            graph.replay()
            x_ref = torch.full_like(x, 7)
            with use_backend("reference"):
                _, ref_selected, ref_count = dllm_kernels.decode_step(logits, x_ref, eligible, **kwargs)
            assert torch.equal(selected, ref_selected) and torch.equal(count, ref_count)
            assert torch.equal(x, x_ref)


def _bad_calls():
    s, e = torch.rand(3, 8), torch.ones(3, 8, dtype=torch.bool)
    k = torch.ones(3, dtype=torch.int64)
    x = torch.zeros(3, 8, dtype=torch.int64)
    return {
        "score dtype": ((s.double(), e), dict(k=k), TypeError, "score must be float32; got float64"),
        "score ndim": ((s[0], e[0]), dict(k=k), RuntimeError, "score must be a [B, L] tensor; got [8]"),
        "eligible dtype": ((s, e.int()), dict(k=k), TypeError, "eligible must be bool; got int32"),
        "eligible shape": ((s, e[:, :7]), dict(k=k), RuntimeError, "eligible must have shape [3, 8]"),
        "score strided": (
            (s.t().contiguous().t(), e),
            dict(k=k),
            RuntimeError,
            "score must be contiguous along L",
        ),
        "k missing": ((s, e), dict(policy="topk"), ValueError, "policy 'topk' needs k"),
        "k length": ((s, e), dict(k=k[:2]), RuntimeError, "k must have shape [3] ([B]); got [2]"),
        "k dtype": ((s, e), dict(k=k.float()), TypeError, "k must be int32, int64; got float32"),
        "k device": ((s, e), dict(k=k.to("meta")), RuntimeError, "k must be on score's device cpu; got meta"),
        "unknown policy": (
            (s, e),
            dict(policy="greedy"),
            ValueError,
            "policy must be one of topk, threshold",
        ),
        "token without x": ((s, e), dict(k=k, token=x), ValueError, "token and x go together"),
        "x without token": ((s, e), dict(k=k, x=x), ValueError, "token and x go together"),
        "x dtype": ((s, e), dict(k=k, token=x, x=x.int()), TypeError, "x must be int64; got int32"),
        "negative min_per_row": (
            (s, e),
            dict(k=k, min_per_row=-1),
            ValueError,
            "min_per_row must be >= 0; got -1",
        ),
        "nan threshold": (
            (s, e),
            dict(policy="threshold", threshold=math.nan),
            ValueError,
            "threshold must be finite",
        ),
        "inf factor": (
            (s, e),
            dict(policy="factor", factor=math.inf),
            ValueError,
            "factor must be finite; got inf",
        ),
        "nan low_threshold": (
            (s, e),
            dict(policy="hierarchy", low_threshold=math.nan),
            ValueError,
            "low_threshold must be finite; got nan",
        ),
        "negative radius": (
            (s, e),
            dict(policy="local_leap", radius=-1),
            ValueError,
            "radius must be >= 0; got -1",
        ),
        "inf margin": (
            (s, e),
            dict(policy="near_best", margin=-math.inf),
            ValueError,
            "margin must be finite; got -inf",
        ),
        "None eligible": ((s, None), dict(k=k), TypeError, "eligible must be a Tensor; got NoneType"),
        "expanded x": (
            (s, e),
            dict(k=k, token=x, x=torch.zeros(1, 8, dtype=torch.int64).expand(3, 8)),
            RuntimeError,
            "x is written in place, so its elements must not overlap in memory; got shape [3, 8] with "
            "strides [0, 1]",
        ),
        "overlapping x rows": (
            (s, e),
            dict(k=k, token=x, x=torch.zeros(20, dtype=torch.int64).as_strided((3, 8), (4, 1))),
            RuntimeError,
            "x is written in place, so its elements must not overlap",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
@pytest.mark.parametrize("backend", [None, *KERNEL_BACKENDS, "reference"])
def test_bad_input_messages(case, backend):
    """Every backend refuses the call with the same message before writing anything."""
    args, kwargs, exc, fragment = _bad_calls()[case]
    x = kwargs.get("x")
    before = None if x is None else x.clone()
    with pytest.raises(exc) as info, use_backend(backend):
        dllm_kernels.select_unmask(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("dllm::select_unmask: "), message
    assert fragment in message, message
    if x is not None:
        assert torch.equal(x, before), "x was mutated although the call was refused"


@pytest.mark.parametrize("part", range(2))
def test_cuda_kernel_under_host_emulation(part, summary):
    """csrc/cuda/select_unmask.cu, compiled for the host (tests/cuda_emulation): every policy on every key
    path (registers, recomputed), against the reference."""
    code, report = run_cuda_emulation("select_unmask", part, 2)
    assert code == 0, report
    summary(f"select_unmask CUDA emulation, part {part}", report.splitlines()[-1])


@pytest.mark.gpu
def test_cuda_kernel_on_the_emulated_cases():
    """The real kernel on every case the host emulation runs."""
    run_emulated_cases_on_gpu("select_unmask")


def test_schedules():
    counts = schedules.llada_transfer_counts(torch.tensor([32, 7, 0, 5]), steps=4)
    assert counts.tolist() == [[8, 8, 8, 8], [2, 2, 2, 1], [0, 0, 0, 0], [2, 1, 1, 1]]
    assert torch.equal(counts.sum(-1), torch.tensor([32, 7, 0, 5]))
    # Dream: t, s from linspace(1, eps, steps + 1); int(m * (1 - s / t)); the last step takes the rest
    m = torch.tensor([100, 37])
    ts = torch.linspace(1, 1e-3, 9)
    assert schedules.dream_transfer_count(m, 0, 8).tolist() == [
        int(v * (1 - ts[1] / ts[0])) for v in (100, 37)
    ]
    assert schedules.dream_transfer_count(m, 7, 8).tolist() == [100, 37]
    with pytest.raises(ValueError, match="step must be in"):
        schedules.dream_transfer_count(m, 8, 8)
