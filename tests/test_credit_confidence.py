"""credit_confidence: every backend against the reference and against a dense transcription of dInfer's
upstream steps; slots, eviction, edge rows, layouts, compilation, errors."""

import math

import pytest
import torch
from helpers import (
    DEVICES,
    KERNEL_BACKENDS,
    assert_close,
    edge_logit_rows,
    emulation_suite,
    run_cuda_emulation,
    run_emulated_cases_on_gpu,
)

import dllm_kernels
from dllm_kernels import credit_state, use_backend
from dllm_kernels.ops.credit_confidence import dispatcher
from dllm_kernels.reference.credit_confidence import credit_confidence as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The emulation suite's random states and its comparison with the reference (near ties of the fused row).
SUITE = emulation_suite("credit_confidence")


def random_logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def skip_unless_runs(backend, logits):
    reason = dispatcher.why_not(backend, logits.device, logits, explicit=True)
    if reason is not None:
        pytest.skip(reason)


def call(backend, logits, eligible, state, **options):
    with use_backend(backend):
        return dllm_kernels.credit_confidence(logits, eligible, *state, **options)


def step(backend, logits, eligible, state, **options):
    """One call on backend (state updated in place), checked against the reference from the same state."""
    skip_unless_runs(backend, logits)
    ref_state = [t.clone() for t in state]
    ref_token, ref_score = reference(logits, eligible, *ref_state, **options)
    token, score = call(backend, logits, eligible, state, **options)
    what = f"{backend} {list(logits.shape)} {logits.dtype} S={state[0].shape[-1]} {options}"
    assert token.dtype == torch.int64 and score.dtype == torch.float32, what
    assert token.shape == score.shape == logits.shape[:-1], what
    assert token.device == score.device == logits.device, what
    got, want = (token, score, *state), (ref_token, ref_score, *ref_state)
    SUITE.check_outputs(logits, options.get("banned"), options.get("alpha", 0.7), got, want, what)
    return token, score


def random_state(shape, slots, vocab, device):
    return [t.to(device) for t in SUITE.random_state(shape, slots, vocab)]


# (logits shape, S): rows 1, 19, 99; V 1, 19, 989 (126464 in test_large_vocabulary).
SHAPES = [
    ((1, 1), 1),
    ((1, 1), 8),
    ((19, 19), 1),
    ((19, 19), 3),
    ((19, 19), 8),
    ((1, 989), 3),
    ((3, 33, 989), 8),
]


@pytest.mark.parametrize("shape, slots", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference(backend, device, dtype, shape, slots):
    logits = random_logits(shape, dtype, device)
    vocab = shape[-1]
    eligible = torch.rand(shape[:-1], device=device) < 0.7
    state = random_state(shape[:-1], slots, vocab, device)
    banned = torch.tensor([vocab // 2, vocab + 3, -1], device=device)
    step(backend, logits, eligible, state)
    step(
        backend,
        random_logits(shape, dtype, device),
        eligible,
        state,
        alpha=2.0,
        beta=1.0,
        gamma=0.0,
        banned=banned,
    )
    step(backend, logits, torch.ones_like(eligible), state, alpha=0.0, beta=0.0, gamma=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_vocabulary(backend, device):
    logits = random_logits((2, 3, 126464), torch.bfloat16, device)
    eligible = torch.tensor([[True, False, True], [True, True, True]], device=device)
    state = random_state((2, 3), 8, 126464, device)
    for _ in range(2):
        step(backend, logits, eligible, state, banned=torch.tensor([0, 126463], device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_views(backend, device):
    """Logits views that need no copy (a shifted slice, a transposed batch, an expand) and one that does;
    states sliced from wider slot buffers, transposed, or with leading dims that do not merge."""
    shifted = random_logits((3, 12, 523), torch.bfloat16, device)[:, 1:-1]
    transposed = random_logits((10, 3, 523), torch.float32, device).transpose(0, 1)
    broadcast = random_logits((523,), torch.float16, device).expand(4, 5, 523)
    gathered = random_logits((2, 5, 7, 523), torch.float32, device)[:, :4, :6]
    for logits in (shifted, transposed, broadcast, gathered):
        lead = tuple(logits.shape[:-1])
        eligible = (torch.rand(lead[::-1], device=device) < 0.7).permute(*reversed(range(len(lead))))
        flipped = random_state(lead[::-1], 3, 523, device)
        for state in (
            random_state(lead, 3, 523, device),
            [t[..., :5] for t in random_state(lead, 8, 523, device)],  # the first slots of a wider buffer
            [t.permute(*reversed(range(len(lead))), len(lead)) for t in flipped],  # rows that do not merge
        ):
            step(backend, logits, eligible, state, beta=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_state_halves_of_one_buffer(backend, device):
    """credit_token and credit_value may be views of one storage as long as they share no byte."""
    raw = torch.zeros(2 * 7 * 4 * 3, dtype=torch.float32, device=device)
    tokens = raw[: 2 * 7 * 4 * 2].view(torch.int64).view(2, 7, 4).fill_(-1)
    values = raw[2 * 7 * 4 * 2 :].view(2, 7, 4)
    logits = random_logits((2, 7, 100), torch.float32, device)
    step(backend, logits, torch.ones(2, 7, dtype=torch.bool, device=device), [tokens, values])
    assert (tokens[..., 0] >= 0).all() and (values[..., 0] > 0).all()


# dInfer's CreditThresholdParallelDecoder step, transcribed with its dense fp32 credit C [B, L, V].
ALPHA, BETA, GAMMA = 0.7, 0.8, 0.2
# Logits of each position's three candidate tokens (a, b, c) at each step: a leads and gathers credit; b
# overtakes a by 0.1 while a's credit keeps the fused argmax on a (the raw and fused argmax differ); b
# gathers credit and takes over; then c leads, then a again (3 distinct raw argmaxes per position).
SCHEDULE = [(4.0, 3.0, 2.0)] * 3 + [(4.0, 4.1, 2.0)] * 2 + [(3.0, 3.2, 4.8)] * 2 + [(4.6, 3.0, 3.5)]


def upstream_step(credit, logits, eligible):
    """One step of the upstream decoder on its dense credit (updated in place): (token, score, raw argmax,
    fused top-2 margin) of every position."""
    credit *= BETA
    p = torch.softmax(logits.float(), -1)
    pmax, raw = p.max(-1)
    add = torch.zeros_like(credit).scatter_(-1, raw[..., None], (pmax**GAMMA)[..., None])
    credit += torch.where(eligible[..., None], add, 0.0)
    fused = logits.float() + ALPHA * torch.log(credit + 1)
    token = fused.argmax(-1)
    score = torch.softmax(fused, -1).gather(-1, token[..., None])[..., 0]
    top = fused.topk(2, -1).values
    return token, score, raw, top[..., 0] - top[..., 1]


def scheduled_logits(shape, vocab, dtype, device):
    """Background logits near -3 and, at three random ids per position, SCHEDULE's candidates (+-0.01)."""
    ids = torch.rand(*shape, vocab, device=device).argsort(-1)[..., :3]
    steps = []
    for candidates in SCHEDULE:
        x = -3 + 0.5 * torch.randn(*shape, vocab, device=device).clamp(-2, 2)
        x.scatter_(
            -1, ids, torch.tensor(candidates, device=device) + 0.01 * torch.randn(*shape, 3, device=device)
        )
        steps.append(x.to(dtype))
    return steps


@pytest.mark.parametrize("slots", [3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_steps_match_the_dense_upstream(backend, device, dtype, slots):
    """8 steps of a block with the eligible set shrinking, S >= the 3 distinct raw argmaxes a position sees:
    the slots give upstream's dense result (tokens exact, scores and credit within fp32 rounding)."""
    shape, vocab = (2, 6), 989
    steps = scheduled_logits(shape, vocab, dtype, device)
    skip_unless_runs(backend, steps[0])
    commit = torch.randint(4, 10, shape, device=device)  # the step a position stops being masked
    commit[0, 0] = 9  # position (0, 0) stays masked through every step
    dense = torch.zeros(*shape, vocab, device=device)
    state = credit_state(shape, slots, device)
    flips = 0
    for k, logits in enumerate(steps):
        eligible = commit > k
        want, want_score, raw, margin = upstream_step(dense, logits, eligible)
        assert (margin[eligible] > 0.05).all(), "premise: no near tie in the fused rows"
        flips += int((want != raw)[eligible].sum())
        token, score = call(backend, logits, eligible, state, alpha=ALPHA, beta=BETA, gamma=GAMMA)
        assert torch.equal(token[eligible], want[eligible]), f"step {k}"
        assert (token[~eligible] == -1).all() and (score[~eligible] == -math.inf).all(), f"step {k}"
        assert_close(score[eligible], want_score[eligible], f"step {k}", reduction=vocab)
        from_slots = torch.zeros_like(dense).scatter_add_(-1, state[0].clamp(min=0), state[1])
        assert_close(from_slots, dense, f"step {k}: credit")
    assert flips > 0, "premise: credit moved some fused argmax off the raw argmax"


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_eviction_by_hand(backend):
    """S = 2 slots and a third raw argmax: the smallest credit is evicted (the lowest slot on ties)."""
    alpha, beta, gamma = 1.0, 0.5, 1.0
    p = math.exp(2) / (math.exp(2) + 5)  # pmax of a row with one logit 2 and five 0

    def logits_for(argmax):
        x = torch.zeros(1, 6)
        x[0, argmax] = 2.0
        return x

    skip_unless_runs(backend, logits_for(0))
    eligible = torch.ones(1, dtype=torch.bool)
    tokens, values = credit_state(1, 2)
    expected = [
        (1, [[1, -1]], [[p, 0]]),  # the first empty slot
        (2, [[1, 2]], [[p / 2, p]]),
        (3, [[3, 2]], [[p, p / 2]]),  # slot 0 (p / 4) < slot 1 (p / 2): evicted
        (4, [[3, 4]], [[p / 2, p]]),
        (3, [[3, 4]], [[p / 4 + p, p / 2]]),  # a hit
    ]
    for argmax, want_tokens, want_values in expected:
        token, _ = call(
            backend, logits_for(argmax), eligible, (tokens, values), alpha=alpha, beta=beta, gamma=gamma
        )
        assert tokens.tolist() == want_tokens, argmax
        assert_close(values, torch.tensor(want_values, dtype=torch.float64), str(argmax))
        assert token.item() == argmax  # the fresh raw argmax holds the largest credit here
    values.fill_(0.5)  # a tie: the lowest slot goes
    call(backend, logits_for(5), eligible, (tokens, values), alpha=alpha, beta=beta, gamma=gamma)
    assert tokens.tolist() == [[5, 4]]
    assert_close(values, torch.tensor([[p, 0.25]], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_rows_equal_their_single_answers(backend, device):
    logits = random_logits((3, 5, 301), torch.bfloat16, device)
    skip_unless_runs(backend, logits)
    eligible = torch.rand(3, 5, device=device) < 0.8
    state = random_state((3, 5), 4, 301, device)
    singles = [[t[b : b + 1].clone() for t in state] for b in range(3)]
    token, score = call(backend, logits, eligible, state, gamma=0.5)
    for b, single in enumerate(singles):
        one_token, one_score = call(backend, logits[b : b + 1], eligible[b : b + 1], single, gamma=0.5)
        assert torch.equal(one_token, token[b : b + 1]) and torch.equal(single[0], state[0][b : b + 1]), b
        assert_close(one_score, score[b : b + 1], str(b))
        assert_close(single[1], state[1][b : b + 1], str(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_edge_rows(backend, device, dtype):
    """NaN / +inf rows give (-1, NaN), rows with nothing finite left (-1, -inf), ineligible rows (never read)
    (-1, -inf): none of them gets credit, all decay."""
    vocab, beta = 37, 0.75
    logits = random_logits((7, vocab), dtype, device)
    banned = edge_logit_rows(logits)
    logits[5] = math.nan  # ineligible: not read
    eligible = torch.tensor([True] * 5 + [False, True], device=device)
    first = torch.tensor(
        [20, 3, 0, 3, 5, 11, 5], device=device
    )  # banned ids and the NaN's id among the slots
    tokens = (
        first[:, None] + torch.arange(3, device=device)
    ) % vocab  # full rows: an eviction where credited
    state = [tokens, torch.rand(7, 3, device=device) + 0.1]
    old = [t.clone() for t in state]
    token, score = step(backend, logits, eligible, state, beta=beta, banned=banned)
    assert token[:4].tolist() == [-1] * 4 and token[5] == -1 and token[4] >= 0 and token[6] >= 0
    assert score[:2].isnan().all() and (score[2:4] == -math.inf).all() and score[5] == -math.inf
    uncredited = torch.tensor([0, 1, 2, 3, 5], device=device)
    assert torch.equal(state[0][uncredited], old[0][uncredited])
    assert torch.equal(state[1][uncredited], old[1][uncredited] * torch.tensor(beta, dtype=torch.float32))


def test_reference_by_hand():
    # p = softmax([0, log 3, -inf]) = [1/4, 3/4, 0]: token 1 gets 3/4 (gamma 1); f = [0, log 3 + log 1.75]
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf]])
    tokens, values = credit_state(1, 2)
    eligible = torch.ones(1, dtype=torch.bool)
    token, score = reference(logits, eligible, tokens, values, 1.0, 0.5, 1.0)
    assert token.item() == 1 and score.item() == pytest.approx(5.25 / 6.25)
    assert tokens.tolist() == [[1, -1]] and values[0].tolist() == pytest.approx([0.75, 0.0])
    token, score = reference(logits, eligible, tokens, values, 1.0, 0.5, 1.0)  # C = 0.375 + 0.75
    assert values[0].tolist() == pytest.approx([1.125, 0.0])
    assert score.item() == pytest.approx(3 * 2.125 / (1 + 3 * 2.125))
    # Credit flips the argmax: C_0 = 2 (beta 1) against this step's 3/5 on the raw argmax 1:
    # f = [log 2 + log 3, log 3 + log 1.6] = [log 6, log 4.8]
    tokens, values = torch.tensor([[0, -1]]), torch.tensor([[2.0, 0.0]])
    token, score = reference(
        torch.tensor([[math.log(2.0), math.log(3.0)]]), eligible, tokens, values, 1.0, 1.0, 1.0
    )
    assert token.item() == 0 and score.item() == pytest.approx(6 / 10.8)
    assert tokens.tolist() == [[0, 1]] and values[0].tolist() == pytest.approx([2.0, 0.6])


def test_credit_state():
    tokens, values = credit_state((2, 3), 5)
    assert tokens.shape == values.shape == (2, 3, 5)
    assert tokens.dtype == torch.int64 and values.dtype == torch.float32
    assert (tokens == -1).all() and (values == 0).all()
    assert credit_state(4)[0].shape == (4, 8)
    for slots in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"^dllm::credit_state: slots must be an int >= 1"):
            credit_state((2,), slots)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits = random_logits((3, 5, 301), torch.bfloat16, device)
    eligible = torch.rand(3, 5, device=device) < 0.5
    banned = torch.tensor([0, 300], device=device)
    for kwargs in ({}, dict(alpha=1.5, beta=0.5, gamma=0.0, banned=banned)):
        state = random_state((3, 5), 4, 301, device)
        torch.library.opcheck(torch.ops.dllm.credit_confidence.default, (logits, eligible, *state), kwargs)
        state = random_state((3, 4), 2, 301, device)
        torch.library.opcheck(
            torch.ops.dllm.credit_confidence.default, (logits[:, 1:], eligible[:, 1:], *state), kwargs
        )


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(logits, eligible, tokens, values):
        token, score = dllm_kernels.credit_confidence(logits[:, 1:], eligible, tokens, values, alpha=0.5)
        return torch.where(score > 0.1, token, -2), score.sum()

    logits = random_logits((2, 9, 1000), torch.bfloat16, "cpu")
    eligible = torch.rand(2, 8) < 0.7
    state, ref_state = credit_state((2, 8), 3), credit_state((2, 8), 3)
    for _ in range(2):  # the second call reads the credit the first one wrote
        token, total = decode(logits, eligible, *state)
        ref_token, ref_score = reference(logits[:, 1:], eligible, *ref_state, alpha=0.5)
        assert torch.equal(token, torch.where(ref_score > 0.1, ref_token, -2))
        assert_close(total, ref_score.sum())
        assert torch.equal(state[0], ref_state[0]) and (state[0] >= 0).any()
        assert_close(state[1], ref_state[1])


def _bad_calls():
    x, eligible = torch.randn(4, 6, 50), torch.ones(4, 6, dtype=torch.bool)

    def state(slots=3):
        return torch.full((4, 6, slots), -1), torch.zeros(4, 6, slots)

    tokens, values = state()
    raw = torch.zeros(4 * 6 * 3 * 2)
    return {
        "float64 logits": (
            (x.double(), eligible, *state()),
            {},
            TypeError,
            "logits must be bfloat16, float16",
        ),
        "eligible None": (
            (x, None, *state()),
            {},
            TypeError,
            "eligible must be a Tensor; got NoneType",
        ),
        "eligible shape": (
            (x, eligible[:, :5], *state()),
            {},
            RuntimeError,
            "eligible must have shape [4, 6] (logits.shape[:-1]); got [4, 5]",
        ),
        "int32 credit_token": (
            (x, eligible, tokens.int(), values),
            {},
            TypeError,
            "credit_token must be int64",
        ),
        "float64 credit_value": (
            (x, eligible, tokens, values.double()),
            {},
            TypeError,
            "credit_value must be float32",
        ),
        "credit_token shape": (
            (x, eligible, tokens[:3], values),
            {},
            RuntimeError,
            "credit_token must have shape [4, 6, S] (logits.shape[:-1], then S >= 1 slots); got [3, 6, 3]",
        ),
        "no slots": ((x, eligible, *state(0)), {}, RuntimeError, "then S >= 1 slots); got [4, 6, 0]"),
        "different S": (
            (x, eligible, tokens, state(2)[1]),
            {},
            RuntimeError,
            "credit_value must have credit_token's shape [4, 6, 3] (the same S); got [4, 6, 2]",
        ),
        "credit_token device": (
            (x, eligible, tokens.to("meta"), values),
            {},
            RuntimeError,
            "credit_token must be on logits's device cpu; got meta",
        ),
        "strided slots": (
            (x, eligible, torch.full((4, 6, 6), -1)[..., ::2], values),
            {},
            RuntimeError,
            "credit_token must be contiguous along S (stride(-1) == 1); got strides [36, 6, 2]",
        ),
        "expanded credit_value": (
            (x, eligible, tokens, torch.zeros(6, 3).expand(4, 6, 3)),
            {},
            RuntimeError,
            "credit_value is written in place, so its elements must not overlap",
        ),
        "state halves overlap": (
            (x, eligible, raw.view(torch.int64).view(4, 6, 3), raw[: 4 * 6 * 3].view(4, 6, 3)),
            {},
            RuntimeError,
            "credit_token and credit_value are both written in place, so they must not share memory",
        ),
        "slot token out of range": (
            (x, eligible, tokens.clone().index_fill_(0, torch.tensor([2]), 50), values),
            {},
            ValueError,
            "credit_token must hold -1 (an empty slot) or token ids in [0, 50); got 50",
        ),
        "slot token below -1": (
            (x, eligible, tokens.clone().fill_(-2), values),
            {},
            ValueError,
            "or token ids in [0, 50); got -2",
        ),
        "negative alpha": (
            (x, eligible, *state()),
            dict(alpha=-0.1),
            ValueError,
            "alpha must be in [0, 1e+06]; got -0.1",
        ),
        "nan alpha": (
            (x, eligible, *state()),
            dict(alpha=math.nan),
            ValueError,
            "alpha must be in [0, 1e+06]; got nan",
        ),
        "huge alpha": ((x, eligible, *state()), dict(alpha=1e7), ValueError, "got 10000000.0"),
        "beta above 1": (
            (x, eligible, *state()),
            dict(beta=1.5),
            ValueError,
            "beta must be in [0, 1]; got 1.5",
        ),
        "negative beta": (
            (x, eligible, *state()),
            dict(beta=-0.5),
            ValueError,
            "beta must be in [0, 1]; got -0.5",
        ),
        "infinite gamma": (
            (x, eligible, *state()),
            dict(gamma=math.inf),
            ValueError,
            "gamma must be finite and >= 0; got inf",
        ),
        "negative gamma": (
            (x, eligible, *state()),
            dict(gamma=-1.0),
            ValueError,
            "gamma must be finite and >= 0; got -1.0",
        ),
        "banned dtype": (
            (x, eligible, *state()),
            dict(banned=torch.tensor([1], dtype=torch.int32)),
            TypeError,
            "banned must be int64; got int32",
        ),
        "string alpha": (
            (x, eligible, *state()),
            dict(alpha="0.7"),
            TypeError,
            "type 'float' for argument 'alpha'",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
@pytest.mark.parametrize("backend", [None, *KERNEL_BACKENDS, "reference"])
def test_bad_input_messages(case, backend):
    """The same message whichever backend runs (None: automatic choice, the compiled path), raised before
    anything is written: the credit state is untouched."""
    args, kwargs, exc, fragment = _bad_calls()[case]
    before = [t.clone() for t in args[2:] if t.device.type == "cpu"]
    with pytest.raises(exc) as info, use_backend(backend):
        dllm_kernels.credit_confidence(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("dllm::credit_confidence: "), message
    assert fragment in message, message
    after = [t for t in args[2:] if t.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "the state was written"


@pytest.mark.parametrize("part", range(2))
def test_cuda_kernel_under_host_emulation(part, summary):
    """csrc/cuda/credit_confidence.cu, compiled for the host (tests/cuda_emulation): every slot count, dtype,
    row layout and edge row against the reference."""
    code, report = run_cuda_emulation("credit_confidence", part, 2)
    assert code == 0, report
    summary(f"credit_confidence CUDA emulation, part {part}", report.splitlines()[-1])


@pytest.mark.gpu
def test_cuda_kernel_on_the_emulated_cases():
    """The real kernels (scan and epilogue) on every case the host emulation runs."""
    run_emulated_cases_on_gpu("credit_confidence")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay(backend):
    """No host sync: a decode step, state update included, is captured once and replayed."""
    logits = random_logits((2, 64, 32011), torch.bfloat16, "cuda")
    eligible = torch.rand(2, 64, device="cuda") < 0.5
    skip_unless_runs(backend, logits)
    state = random_state((2, 64), 8, 32011, "cuda")
    with use_backend(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dllm_kernels.credit_confidence(logits, eligible, *state)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            token, score = dllm_kernels.credit_confidence(logits, eligible, *state)
    for _ in range(2):
        logits.copy_(random_logits(logits.shape, logits.dtype, "cuda"))
        ref_state = [t.clone() for t in state]
        ref = reference(logits, eligible, *ref_state)
        graph.replay()
        SUITE.check_outputs(logits, None, 0.7, (token, score, *state), (*ref, *ref_state), backend)
