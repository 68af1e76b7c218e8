"""logits_to_confidence: every backend against the reference, edge rows, layouts, sampling, errors."""

import math

import pytest
import torch
from helpers import (
    DEVICES,
    KERNEL_BACKENDS,
    assert_close,
    assert_mostly_equal,
    edge_logit_rows,
    python,
    skip_rows_the_interpreter_repeats,
)

import dllm_kernels
from dllm_kernels import use_backend
from dllm_kernels.ops._common import rows_view
from dllm_kernels.ops.logits_to_confidence import SCORES, dispatcher
from dllm_kernels.reference.logits_to_confidence import logits_to_confidence as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Sampled tokens may differ from the fp64 reference where two Gumbel keys tie to fp32 rounding.
SAMPLE_DISAGREE = 1e-3


def run(backend, logits, eligible=None, **kwargs):
    reason = dispatcher.why_not(backend, logits.device, logits, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        return dllm_kernels.logits_to_confidence(logits, eligible, **kwargs)


def check(backend, logits, eligible=None, **kwargs):
    token, score = run(backend, logits, eligible, **kwargs)
    ref_token, ref_score = reference(logits, eligible, **kwargs)
    what = f"{backend} {list(logits.shape)} {logits.dtype} {kwargs}"
    assert token.dtype == torch.int64 and score.dtype == torch.float32, what
    assert token.shape == score.shape == logits.shape[:-1], what
    assert token.device == score.device == logits.device, what
    if kwargs.get("temperature", 0.0) > 0:
        assert_mostly_equal(token, ref_token, SAMPLE_DISAGREE, what)
        same = token == ref_token
        assert_close(score[same], ref_score[same], what)
    else:
        assert torch.equal(token, ref_token), what
        assert_close(score, ref_score, what)
    return token, score


def random_logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("shape", [(1, 1), (19,), (99, 989), (2, 19, 1531)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_matches_reference(backend, device, dtype, shape, score):
    skip_rows_the_interpreter_repeats(backend, device, math.prod(shape[:-1]))
    logits = random_logits(shape, dtype, device)
    vocab = shape[-1]
    eligible = torch.rand(shape[:-1], device=device) < 0.7
    banned = torch.tensor([vocab // 2, vocab + 3, -1, vocab // 2], device=device)
    check(backend, logits, score=score)
    check(backend, logits, eligible, score=score, banned=banned)
    check(backend, logits, eligible, score=score, temperature=0.7, seed=11, offset=3)
    check(
        backend,
        logits,
        score=score,
        temperature=1.3,
        tempered_score=True,
        banned=banned,
        seed=-5,
        offset=2**40 + 7,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_edge_rows(backend, device, dtype):
    vocab = 37
    logits = random_logits((7, vocab), dtype, device)
    banned = edge_logit_rows(logits)
    logits[5, ::2] = -math.inf
    logits[6, 30] = logits[6, 9] = logits[6].max() + 1  # tie: the lower index wins
    for score in SCORES:
        for temperature in (0.0, 0.9):
            token, value = check(backend, logits, score=score, temperature=temperature, banned=banned)
            assert token[:4].tolist() == [-1, -1, -1, -1]
            assert math.isnan(value[0]) and math.isnan(value[1])
            assert value[2] == value[3] == -math.inf
            assert token[4] >= 0 and not math.isnan(value[4])
            if temperature == 0:
                assert token[6] == 9


def test_reference_by_hand():
    # p = softmax([0, log 3, -inf]) = [1/4, 3/4, 0]
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf], [1.0, 1.0, 0.5]])
    by_score = {s: reference(logits, score=s) for s in SCORES}
    assert by_score["prob"][0].tolist() == [1, 0]
    assert by_score["prob"][1][0].item() == pytest.approx(0.75)
    assert by_score["margin"][1][0].item() == pytest.approx(0.5)
    assert by_score["neg_entropy"][1][0].item() == pytest.approx(
        0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    )
    assert by_score["logit_margin"][1].tolist() == pytest.approx([math.log(3.0), 0.0])
    assert by_score["margin"][1][1].item() == 0.0  # tied top two
    only_one = reference(torch.tensor([[2.0, 7.0]]), banned=torch.tensor([1]), score="logit_margin")
    assert only_one[0].item() == 0 and only_one[1].item() == math.inf
    # tempered: p = softmax([0, 2 log 3]) = [1/10, 9/10] at the sampled token
    token, tempered = reference(logits[:1], score="prob", temperature=0.5, tempered_score=True, seed=7)
    assert tempered.item() == pytest.approx([0.1, 0.9][token.item()])
    random_score = reference(logits, score="random", seed=1)[1]
    assert ((random_score > 0) & (random_score < 1)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_views(backend, device):
    base = random_logits((3, 12, 523), torch.bfloat16, device)
    shifted = base[:, 1:-1]  # Dream / Fast-dLLM v2's one-position shift
    transposed = random_logits((10, 3, 523), torch.float32, device).transpose(0, 1)
    broadcast = random_logits((523,), torch.float16, device).expand(4, 5, 523)
    gathered = random_logits((2, 5, 7, 523), torch.float32, device)[:, :4, :6]  # three unmergeable dims
    for logits in (shifted, transposed, broadcast, gathered):
        eligible = (torch.rand(logits.shape[:-1][::-1], device=device) < 0.6).transpose(0, -1)
        check(backend, logits, eligible, score="margin")
        check(backend, logits, score="prob", temperature=0.8, seed=3)
    for view in (shifted, transposed, broadcast):
        rows = rows_view(view)
        assert rows.untyped_storage().data_ptr() == view.untyped_storage().data_ptr(), "rows were copied"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_few_rows_large_vocab(backend, device, dtype):
    """One or two rows: the vocabulary is split across threads / programs and merged."""
    vocab = 70001
    logits = random_logits((2, vocab), dtype, device)
    top = logits.float().max() + 2
    logits[0, 40000] = logits[0, 60000] = top  # the maximum sits in later chunks, tied across them
    logits[1, 5] = logits[1, vocab - 1] = top
    for score in SCORES:
        check(backend, logits, score=score)
        check(backend, logits[:1], score=score, temperature=0.5, seed=9)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_triton_forced_splits(splits):
    """The Triton split-vocabulary path with a chosen number of chunks, merged exactly."""
    if dispatcher.why_not("triton", torch.device("cpu"), None, explicit=True) is not None:
        pytest.skip("triton cannot run here")
    from dllm_kernels.triton_kernels.logits_to_confidence import logits_to_confidence as launch

    logits = random_logits((2, 3, 2999), torch.bfloat16, "cpu")
    eligible = torch.rand(2, 3) < 0.7
    banned = torch.tensor([7, 2998])
    for score in SCORES:
        for temperature in (0.0, 0.6):
            kwargs = dict(temperature=temperature, score=score, banned=banned, seed=5, offset=1)
            token, value = launch(
                logits, eligible, banned, temperature, score, False, 5, 1, num_splits=splits
            )
            ref_token, ref_value = reference(logits, eligible, **kwargs)
            assert torch.equal(token, ref_token)
            assert_close(value, ref_value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sample_frequencies(backend, device):
    """Sampled tokens follow softmax(logits / T) (the same row repeated under different counters)."""
    n_rows = 2000 if backend == "triton" and device == "cpu" else 20000
    temperature = 0.8
    row = torch.tensor([1.0, 0.0, 2.5, -1.0, 2.0, 0.5, 1.7], device=device)
    token, _ = run(backend, row.expand(n_rows, -1), temperature=temperature, seed=123)
    freq = torch.bincount(token, minlength=row.numel()).double() / n_rows
    p = torch.softmax(row.double() / temperature, 0)
    sigma = (p * (1 - p) / n_rows).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), f"frequencies {freq.tolist()} vs p {p.tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sampling_agreement_and_determinism(backend, device):
    interpreted = backend == "triton" and device == "cpu"  # the interpreter runs one program at a time
    logits = random_logits((700 if interpreted else 4000, 1000), torch.bfloat16, device, scale=2.0)
    kwargs = dict(temperature=1.0, score="prob", seed=2024, offset=17)
    token, score = run(backend, logits, **kwargs)
    ref_token, _ = reference(logits, **kwargs)
    assert_mostly_equal(token, ref_token, SAMPLE_DISAGREE, f"{backend} vs reference")
    again = run(backend, logits, **kwargs)
    assert torch.equal(again[0], token) and torch.equal(again[1], score), "same inputs, different outputs"
    fresh, _ = run(backend, logits, **{**kwargs, "offset": 18})
    assert (fresh != token).float().mean() > 0.3, "advancing offset must give fresh noise"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits = random_logits((3, 5, 301), torch.bfloat16, device)
    eligible = torch.rand(3, 5, device=device) < 0.5
    banned = torch.tensor([0, 300], device=device)
    for kwargs in (
        {},
        dict(score="margin", banned=banned),
        dict(temperature=0.7, score="neg_entropy", tempered_score=True, seed=4, offset=9),
        dict(score="random", seed=1),
    ):
        torch.library.opcheck(torch.ops.dllm.logits_to_confidence.default, (logits, eligible), kwargs)
        torch.library.opcheck(torch.ops.dllm.logits_to_confidence.default, (logits[:, 1:],), kwargs)


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def step(logits, eligible, banned):
        token, score = dllm_kernels.logits_to_confidence(
            logits[:, 1:], eligible, score="margin", banned=banned
        )
        return torch.where(score > 0.1, token, -2), score.sum()

    logits = random_logits((2, 9, 1000), torch.bfloat16, "cpu")
    eligible = torch.rand(2, 8) < 0.5
    banned = torch.tensor([3])
    token, total = step(logits, eligible, banned)
    ref_token, ref_score = reference(logits[:, 1:], eligible, score="margin", banned=banned)
    assert torch.equal(token, torch.where(ref_score > 0.1, ref_token, -2))
    assert_close(total, ref_score.sum())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay(backend):
    """No host sync: a decode step is captured once and replayed on new inputs."""
    logits = random_logits((2, 64, 32011), torch.bfloat16, "cuda")
    eligible = torch.rand(2, 64, device="cuda") < 0.5
    if dispatcher.why_not(backend, logits.device, logits, explicit=True) is not None:
        pytest.skip(f"{backend} cannot run here")
    with use_backend(backend):
        kwargs = dict(temperature=0.7, score="prob", seed=1, offset=2)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            dllm_kernels.logits_to_confidence(logits, eligible, **kwargs)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            token, score = dllm_kernels.logits_to_confidence(logits, eligible, **kwargs)
        for _ in range(2):
            logits.copy_(random_logits(logits.shape, logits.dtype, "cuda"))
            eligible.copy_(torch.rand(2, 64, device="cuda") < 0.5)
            graph.replay()
            ref_token, ref_score = reference(logits, eligible, **kwargs)
            assert_mostly_equal(token, ref_token, SAMPLE_DISAGREE, backend)
            same = token == ref_token
            assert_close(score[same], ref_score[same])


def _bad_calls():
    x = torch.randn(4, 6, 50)
    return {
        "float64 logits": (
            (x.double(),),
            {},
            TypeError,
            "logits must be bfloat16, float16, float32; got float64",
        ),
        "integer logits": (
            (x.long(),),
            {},
            TypeError,
            "logits must be bfloat16, float16, float32; got int64",
        ),
        "0-dim logits": ((torch.tensor(1.0),), {}, RuntimeError, "at least 1 dim"),
        "empty vocabulary": ((x[..., :0],), {}, RuntimeError, "V >= 1"),
        "strided vocabulary": ((x.transpose(1, 2),), {}, RuntimeError, "stride(-1) == 1"),
        "eligible dtype": (
            (x, torch.ones(4, 6, dtype=torch.uint8)),
            {},
            TypeError,
            "eligible must be bool; got uint8",
        ),
        "eligible shape": (
            (x, torch.ones(4, 5, dtype=torch.bool)),
            {},
            RuntimeError,
            "eligible must have shape [4, 6] (logits.shape[:-1]); got [4, 5]",
        ),
        "eligible device": (
            (x, torch.ones(4, 6, dtype=torch.bool, device="meta")),
            {},
            RuntimeError,
            "eligible must be on logits's device cpu; got meta",
        ),
        "banned dtype": (
            (x,),
            dict(banned=torch.tensor([1], dtype=torch.int32)),
            TypeError,
            "banned must be int64; got int32",
        ),
        "banned ndim": (
            (x,),
            dict(banned=torch.tensor([[1]])),
            RuntimeError,
            "banned must be a 1-dim tensor",
        ),
        "banned device": (
            (x,),
            dict(banned=torch.tensor([1], device="meta")),
            RuntimeError,
            "banned must be on logits's device cpu; got meta",
        ),
        "unknown score": ((x,), dict(score="confidence"), ValueError, "score must be one of prob, margin"),
        "negative temperature": (
            (x,),
            dict(temperature=-0.5),
            ValueError,
            "temperature must be 0 (argmax) or in [1e-30, 1e+30]; got -0.5",
        ),
        "nan temperature": ((x,), dict(temperature=math.nan), ValueError, "or in [1e-30, 1e+30]; got nan"),
        "infinite temperature": ((x,), dict(temperature=math.inf), ValueError, "got inf"),
        "temperature below the range": ((x,), dict(temperature=1e-40), ValueError, "got 1e-40"),
        "temperature above the range": ((x,), dict(temperature=1e39), ValueError, "got 1e+39"),
        "None logits": ((None,), {}, TypeError, "logits must be a Tensor; got NoneType"),
        "seed beyond int64": ((x,), dict(seed=2**64), ValueError, "seed must be an int in [-2^63, 2^63)"),
        "offset beyond int64": ((x,), dict(offset=-(2**63) - 1), ValueError, "offset must be an int"),
        "float seed": ((x,), dict(seed=1.5), TypeError, "type 'int' for argument 'seed'"),
        "int score kind": ((x,), dict(score=3), TypeError, "type 'str' for argument 'score'"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
@pytest.mark.parametrize("backend", [None, *KERNEL_BACKENDS, "reference"])
def test_bad_input_messages(case, backend):
    """The same message whichever backend runs (None: automatic choice, the compiled path)."""
    args, kwargs, exc, fragment = _bad_calls()[case]
    with pytest.raises(exc) as info, use_backend(backend):
        dllm_kernels.logits_to_confidence(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("dllm::logits_to_confidence: "), message
    assert fragment in message, message


def test_generic_cpu_sampling_path():
    """The CPU sampling path for CPUs without AVX-512 (a Philox call per 64 columns on generic vectors),
    forced with DLLM_CPU_DISABLE=avx512, against the reference."""
    code = """
        import torch, dllm_kernels
        from dllm_kernels.reference.logits_to_confidence import logits_to_confidence as reference
        torch.manual_seed(SEED)
        logits = (torch.randn(300, 4099) * 3).to(torch.bfloat16)
        options = (dict(temperature=0.8, seed=3, offset=2), dict(temperature=1.5, tempered_score=True))
        for kwargs in options:
            with dllm_kernels.use_backend("cpu"):
                token, score = dllm_kernels.logits_to_confidence(logits, **kwargs)
            ref_token, ref_score = reference(logits, **kwargs)
            same = token == ref_token
            assert (~same).sum() <= 1, int((~same).sum())
            torch.testing.assert_close(score[same], ref_score[same].float(), rtol=1e-5, atol=1e-5)
        print("ok")
    """.replace("SEED", str(torch.randint(2**31, ()).item()))
    result = python(code, DLLM_CPU_DISABLE="avx512")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("disabled", ["", "avx512"], ids=["avx512", "generic"])
def test_cpu_race_filter_changes_nothing(disabled, tmp_path):
    """The CPU sampling's race filter skips the logs of columns that cannot win: the tokens and scores
    equal those of the same path with the filter off (DLLM_CPU_DISABLE=race), bit for bit. T = 5e-5 puts
    T * 2^16 inside the logits' range, so the filter turns off part-way through rows."""
    code = """
        import torch, dllm_kernels
        torch.manual_seed(SEED)
        flat = torch.randn(64, 4099) * 3
        peaked = flat.clone()
        peaked[:, 7] += 12
        options = (
            dict(temperature=0.8, seed=3, offset=2),
            dict(temperature=1.5, tempered_score=True, score="margin"),
            dict(temperature=5e-5, seed=1),
        )
        out = []
        with dllm_kernels.use_backend("cpu"):
            for logits in (flat.bfloat16(), peaked.bfloat16(), flat):
                out += [dllm_kernels.logits_to_confidence(logits, **kwargs) for kwargs in options]
        torch.save(out, PATH)
    """.replace("SEED", str(torch.randint(2**31, ()).item()))
    results = []
    for name, flags in (("on", disabled), ("off", ",".join(filter(None, (disabled, "race"))))):
        path = tmp_path / f"{name}.pt"
        result = python(code.replace("PATH", repr(str(path))), DLLM_CPU_DISABLE=flags)
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(torch.load(path))
    for (token, score), (token_off, score_off) in zip(*results, strict=True):
        assert torch.equal(token, token_off)
        torch.testing.assert_close(score, score_off, rtol=0, atol=0, equal_nan=True)


def scores_in_range(token, score, kind):
    """token == -1 exactly where the score is -inf or NaN; prob / margin in [0, 1], neg_entropy <= 0."""
    undefined = torch.isnan(score) | (score == -math.inf)
    assert torch.equal(token == -1, undefined), (token, score)
    defined = score[~undefined]
    if kind in ("prob", "margin", "random"):
        assert ((defined >= 0) & (defined <= 1)).all(), defined
    if kind == "neg_entropy":
        assert (defined <= 0).all(), defined


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_scores_stay_valid_at_extremes(backend, device, dtype):
    """Large logits (a top logit of 40-60), logits near the dtype's range, the temperature range's ends:
    every score stays a valid probability / entropy and -1 tokens go with -inf / NaN scores only."""
    vocab = 517
    finfo = torch.finfo(dtype)
    logits = random_logits((6, vocab), torch.float32, device)
    logits[0] += 50 + 10 * torch.rand((), device=device)  # large, ordinary
    logits[1, 7] = 60.0
    logits[2] = finfo.max * (0.5 + 0.5 * torch.rand(vocab, device=device))  # near the range, all close
    logits[3] = -finfo.max * torch.rand(vocab, device=device)  # spread over the negative range
    logits[4, ::3] = finfo.max
    logits[5] = -finfo.max * (0.99 + 0.01 * torch.rand(vocab, device=device))  # all near -max
    logits = logits.to(dtype)
    for score in SCORES:
        for options in (
            {},
            dict(temperature=1e-30, tempered_score=True),
            dict(temperature=0.05, tempered_score=True),
            dict(temperature=1e30, tempered_score=True),
            dict(temperature=1e30),
        ):
            token, value = run(backend, logits, score=score, seed=3, **options)
            scores_in_range(token, value, score)
            ref_token, ref_value = reference(logits, score=score, seed=3, **options)
            scores_in_range(ref_token, ref_value, score)
            if not options:
                assert torch.equal(token, ref_token), (backend, score)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_threshold_one_decides_as_the_reference(backend, device):
    """Rows whose top probability rounds to 1 in fp32 and rows clearly below it: a threshold of 1.0
    (exclusive and inclusive) selects the same positions from the kernel's score and the reference's."""
    logits = random_logits((64, 301), torch.float32, device)
    certain = torch.rand(64, device=device) < 0.5
    logits[certain, 5] += 60 + 40 * torch.rand(int(certain.sum()), device=device)  # p rounds to 1
    token, value = run(backend, logits)
    ref_token, ref_value = reference(logits)
    assert torch.equal(token, ref_token)
    assert (value <= 1).all()
    for inclusive in (False, True):
        ours = value >= 1.0 if inclusive else value > 1.0
        theirs = ref_value >= 1.0 if inclusive else ref_value > 1.0
        assert torch.equal(ours, theirs), (inclusive, value[ours != theirs], ref_value[ours != theirs])
    assert torch.equal(value == 1.0, certain)


def test_ineligible_rows_are_not_read():
    """Rows outside `eligible` may hold anything (here NaN) without changing the other rows."""
    logits = random_logits((6, 300), torch.float32, "cpu")
    eligible = torch.tensor([True, False, True, False, False, True])
    poisoned = logits.clone()
    poisoned[~eligible] = math.nan
    for backend in KERNEL_BACKENDS:
        if dispatcher.why_not(backend, logits.device, logits, explicit=True) is None:
            with use_backend(backend):
                a = dllm_kernels.logits_to_confidence(logits, eligible)
                b = dllm_kernels.logits_to_confidence(poisoned, eligible)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), backend
            assert (a[0][~eligible] == -1).all() and (a[1][~eligible] == -math.inf).all(), backend
