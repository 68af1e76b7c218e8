"""select_unmask: every backend against the reference (exactly), tie order, bounds, commit, errors."""

import math

import pytest
import torch
from helpers import DEVICES, KERNEL_BACKENDS

import dllm_kernels
from dllm_kernels import schedules, use_backend
from dllm_kernels.ops._common import rows_view
from dllm_kernels.ops.select_unmask import POLICIES, dispatcher
from dllm_kernels.reference.select_unmask import select_unmask as reference

SHAPES = [(1, 1), (1, 19), (7, 99), (3, 989), (2, 2048)]


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


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference(backend, device, shape, policy):
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
    all_in = torch.ones(shape, dtype=torch.bool, device=device)
    check(
        backend,
        torch.rand(shape, device=device),
        all_in,
        policy=policy,
        k=torch.full((n_rows,), 5, device=device),
        min_per_row=1000,
    )
    check(
        backend,
        torch.rand(shape, device=device),
        ~all_in,
        policy=policy,
        k=torch.full((n_rows,), 5, device=device),
    )


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_rows_and_commit_through_views(backend, device):
    wide = torch.rand(5, 300, device=device)
    score = wide[:, 20:120]  # row stride 300
    eligible = (torch.rand(5, 200, device=device) < 0.5)[:, ::1][:, 50:150]
    token = torch.randint(0, 9, (5, 400), device=device)[:, :100]
    x_full = torch.full((5, 101), -1, device=device)
    k = torch.randint(0, 30, (10,), device=device)[::2]  # non-contiguous k
    check(backend, score, eligible, policy="topk", k=k, token=token, x=x_full[:, 1:])
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
