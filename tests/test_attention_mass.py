"""attention_mass: every backend against the reference (lse from block_attention itself), the statistic's
edge cases (masks, blocks, empty rows, NaN where nothing may read, -inf lse, ties), and the CUDA kernel under
the host emulation."""

import math

import pytest
import torch
from helpers import DEVICES, KERNEL_BACKENDS, assert_close, run_cuda_emulation, run_emulated_cases_on_gpu

import dllm_kernels
from dllm_kernels import use_backend
from dllm_kernels.ops.attention_mass import dispatcher
from dllm_kernels.reference.attention_mass import attention_mass as reference
from dllm_kernels.reference.attention_mass import top_of

# The interpreter cannot do bf16 arithmetic: Triton on CPU runs fp16 and fp32.
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


def dtypes_for(backend, device):
    return [torch.float16, torch.float32] if (backend, device) == ("triton", "cpu") else DTYPES[device]


def int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def inputs(device, dtype, n_rows, n_queries, s_max, heads=(28, 4), head_dim=64, q_start=None, kv_len=None,
           block_size=0, scale=None):  # fmt: skip
    """q, k_cache, q_start, kv_len and the lse block_attention returns for them."""
    n_heads, n_kv = heads
    q = torch.randn(n_rows, n_queries, n_heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(n_rows, s_max, n_kv, head_dim, device=device).to(dtype)
    v_cache = torch.randn(n_rows, s_max, n_kv, head_dim, device=device).to(dtype)
    if q_start is None:
        q_start = torch.randint(0, max(1, s_max - n_queries + 1), (n_rows,), dtype=torch.int32).tolist()
    if kv_len is None:
        kv_len = [min(s_max, s + n_queries + int(torch.randint(0, s_max + 1, ()))) for s in q_start]
    q_start, kv_len = int32(q_start, device), int32(kv_len, device)
    _, lse = dllm_kernels.block_attention(
        q, k_cache, v_cache, q_start, kv_len, block_size=block_size, scale=scale, return_lse=True
    )
    return q, k_cache, lse, q_start, kv_len


def run(backend, *args, **kwargs):
    reason = dispatcher.why_not(backend, args[0].device, *args, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        return dllm_kernels.attention_mass(*args, **kwargs)


def check(backend, q, k_cache, lse, q_start, kv_len, **kwargs):
    """mass within tolerance of the reference, top exactly the rule applied to the backend's own masses."""
    mass, top = run(backend, q, k_cache, lse, q_start, kv_len, **kwargs)
    ref_mass, _ = reference(q, k_cache, lse, q_start, kv_len, **kwargs)
    what = f"{backend} q {list(q.shape)} {q.dtype} cache {list(k_cache.shape)} {kwargs}"
    assert mass.shape == (q.shape[0], k_cache.shape[1]) and mass.dtype == torch.float32, what
    assert top.shape == (q.shape[0],) and top.dtype == torch.int64, what
    assert_close(mass, ref_mass, what, reduction=q.shape[1] * q.shape[2])
    assert torch.equal(top, top_of(mass)), what
    return mass, top


# (label, B, Sq, S_max, heads, D, block_size): odd sizes, GQA 28/4 and MHA 4/4, D 64 / 128.
SHAPES = [
    ("decode-1q", 1, 1, 99, (28, 4), 64, 0),
    ("block-19q-prefix", 2, 19, 989, (4, 4), 128, 0),
    ("block-32q-gqa", 1, 32, 99, (28, 4), 128, 0),
    ("sub-block-causal", 2, 19, 99, (28, 4), 64, 32),
    ("block-causal-prefill", 1, 99, 99, (4, 4), 64, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_against_reference(backend, device, shape):
    _, n_rows, n_queries, s_max, heads, head_dim, block_size = shape
    for dtype in dtypes_for(backend, device):
        q_start = [0] * n_rows if n_queries == s_max else None
        args = inputs(
            device, dtype, n_rows, n_queries, s_max, heads, head_dim, q_start, block_size=block_size
        )
        check(backend, *args, block_size=block_size)
        query_mask = torch.rand(n_rows, n_queries, device=device) < 0.6
        key_mask = torch.rand(n_rows, s_max, device=device) < 0.4
        check(backend, *args, block_size=block_size, query_mask=query_mask, key_mask=key_mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_scale_and_mqa(backend, device):
    dtype = dtypes_for(backend, device)[0]
    args = inputs(device, dtype, 3, 8, 77, (8, 1), 64, [0, 29, 58], [77, 48, 70], block_size=16, scale=0.3)
    check(backend, *args, block_size=16, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_inputs(backend, device):
    """Slices of fused buffers for q / k_cache, a transposed lse, masks that are column slices."""
    dtype = dtypes_for(backend, device)[0]
    wide = torch.randn(2, 40, 4, 2, 64, device=device).to(dtype)
    q = wide[:, 4:36, :, 0]  # strides on every dim but the last
    k_cache = (
        torch.randn(2, 2, 80, 64, device=device).to(dtype).transpose(1, 2)
    )  # [B, S, Hkv, D], heads-major
    v_cache = torch.randn(2, 80, 2, 64, device=device).to(dtype)
    q_start, kv_len = int32([16, 48], device), int32([48, 80], device)
    _, lse = dllm_kernels.block_attention(q, k_cache, v_cache, q_start, kv_len, return_lse=True)
    lse = lse.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Sq] with stride(-1) = Hq
    query_mask = (torch.rand(2, 64, device=device) < 0.5)[:, ::2]
    key_mask = (torch.rand(2, 160, device=device) < 0.3)[:, 80:]
    check(backend, q, k_cache, lse, q_start, kv_len, query_mask=query_mask, key_mask=key_mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_empty_rows_and_shapes(backend, device):
    """kv_len 0 gives mass 0 and top -1 beside a normal row; B = 0, Sq = 0 and S_max = 0 give empty or zero
    results."""
    dtype = dtypes_for(backend, device)[0]
    q, k_cache, lse, q_start, kv_len = inputs(device, dtype, 2, 4, 16, (4, 2), 64, [0, 4], [0, 8])
    assert (lse[0] == -math.inf).all()
    mass, top = run(backend, q, k_cache, lse, q_start, kv_len)
    assert (mass[0] == 0).all() and top[0] == -1
    assert (mass[1, 8:] == 0).all() and (mass[1, :8] > 0).all() and 0 <= top[1] < 8
    assert_close(mass[1].sum(), torch.tensor(4.0 * 4), reduction=16)  # every query's probabilities sum to 1
    with use_backend(backend):
        mass, top = dllm_kernels.attention_mass(q[:0], k_cache[:0], lse[:0], q_start[:0], kv_len[:0])
        assert mass.shape == (0, 16) and top.shape == (0,)
        mass, top = dllm_kernels.attention_mass(q[:, :0], k_cache, lse[:, :, :0], q_start, kv_len)
        assert (mass == 0).all() and (top == -1).all()
        zero = int32([0, 0], device)
        mass, top = dllm_kernels.attention_mass(q, k_cache[:, :0], lse, zero, zero)
        assert mass.shape == (2, 0) and (top == -1).all()


def test_reference_by_hand():
    """The reference against softmax over each query's visible keys, summed over heads and counted queries."""
    q, k_cache, lse, q_start, kv_len = inputs(
        "cpu", torch.float32, 2, 6, 20, (4, 2), 16, [3, 10], [20, 16], 8
    )
    query_mask = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    key_mask = torch.zeros(2, 20, dtype=torch.bool)
    key_mask[1, 12] = True
    mass, top = reference(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, 8)
    want = torch.zeros(2, 20, dtype=torch.float64)
    for b in range(2):
        for i in range(6):
            if not query_mask[b, i]:
                continue
            p = int(q_start[b]) + i
            visible = [j for j in range(int(kv_len[b])) if j // 8 <= p // 8]
            for h in range(4):
                scores = torch.stack([q[b, i, h].double() @ k_cache[b, j, h // 2].double() for j in visible])
                want[b, visible] += torch.softmax(scores / 4.0, 0)
    want[1, 12] = 0
    assert_close(mass, want.float())
    assert top.tolist() == [int(want[0].argmax()), int(want[1].argmax())]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_what_is_not_read_never_matters(backend, device):
    """NaN / inf in keys no counted query sees (past kv_len, later blocks), in uncounted queries, in excluded
    keys, and an lse of -inf: the masses are unchanged (bitwise) and finite."""
    dtype = dtypes_for(backend, device)[0]
    q, k_cache, lse, q_start, kv_len = inputs(device, dtype, 2, 8, 96, (4, 2), 64, [16, 40], [64, 80], 16)
    query_mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    query_mask[1, 5] = False
    key_mask = torch.zeros(2, 96, dtype=torch.bool, device=device)
    key_mask[0, 3] = True
    want = run(
        backend, q, k_cache, lse, q_start, kv_len, query_mask=query_mask, key_mask=key_mask, block_size=16
    )
    k_cache, q = k_cache.clone(), q.clone()
    k_cache[0, 32:] = math.nan  # queries 16..23 see blocks 0 and 1 only
    k_cache[1, 48:, 0], k_cache[1, 48:, 1] = math.nan, math.inf  # queries 40..47: blocks 0..2
    k_cache[0, 3] = math.nan  # excluded
    q[1, 5] = math.nan  # not counted
    got = run(
        backend, q, k_cache, lse, q_start, kv_len, query_mask=query_mask, key_mask=key_mask, block_size=16
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), backend
    assert torch.isfinite(got[0]).all() and got[0][0, 3] == 0
    lse = lse.clone()
    lse[0, 1, 2] = -math.inf  # that (query, head) adds nothing
    mass, _ = run(
        backend, q, k_cache, lse, q_start, kv_len, query_mask=query_mask, key_mask=key_mask, block_size=16
    )
    ref_mass, _ = reference(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, 16)
    assert torch.isfinite(mass).all()
    assert_close(mass, ref_mass, reduction=32)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_ties_agree_on_every_backend(device):
    """A NaN in a visible key makes its mass NaN and top its index (NaN counts as largest, first NaN wins);
    a NaN in a counted query makes every key it sees NaN; two identical keys tie and top takes the lower."""
    results = {}
    for backend in [*KERNEL_BACKENDS, "reference"]:
        dtype = torch.float16 if device == "cpu" else torch.bfloat16
        gen = torch.Generator().manual_seed(7)
        q = torch.randn(3, 4, 4, 64, generator=gen).to(device, dtype)
        k_cache = torch.randn(3, 40, 2, 64, generator=gen).to(device, dtype)
        v_cache = torch.randn(3, 40, 2, 64, generator=gen).to(device, dtype)
        # Row 2: keys 9 and 30 equal and aligned with every query, so they get the largest mass.
        k_cache[2, 9] = (q[2].float().mean(0).view(2, 2, 64).mean(1) * 4).to(dtype)
        k_cache[2, 30] = k_cache[2, 9]
        q_start, kv_len = int32([0, 0, 0], device), int32([24, 40, 40], device)
        if dispatcher.why_not(backend, q.device, q, k_cache, explicit=True):
            continue
        _, lse = dllm_kernels.block_attention(q, k_cache, v_cache, q_start, kv_len, return_lse=True)
        k_cache[0, 17, 1, 3] = math.nan
        k_cache[0, 21, 0, 0] = math.nan
        q[1, 2, 3, 0] = math.nan
        with use_backend(backend):
            results[backend] = dllm_kernels.attention_mass(q, k_cache, lse, q_start, kv_len)
    assert len(results) >= 2
    for backend, (mass, top) in results.items():
        assert torch.isnan(mass[0]).nonzero().flatten().tolist() == [17, 21], backend
        assert torch.isnan(mass[1]).all(), backend
        assert mass[2, 9] == mass[2, 30] and mass[2].argmax() == 9, backend
        assert top.tolist() == [17, 0, 9], backend


def test_opcheck_and_compile():
    q, k_cache, lse, q_start, kv_len = inputs("cpu", torch.float32, 2, 16, 48, (4, 2), 32, [0, 16], [16, 48])
    query_mask, key_mask = torch.rand(2, 16) < 0.5, torch.rand(2, 48) < 0.5
    for kwargs in (
        dict(),
        dict(block_size=8, query_mask=query_mask),
        dict(key_mask=key_mask, scale=0.2),
    ):
        torch.library.opcheck(
            torch.ops.dllm.attention_mass.default, (q, k_cache, lse, q_start, kv_len), kwargs
        )

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k_cache, lse, key_mask):
        mass, top = dllm_kernels.attention_mass(q, k_cache, lse, q_start, kv_len, key_mask=key_mask)
        return mass * 2, top + 1

    mass, top = step(q, k_cache, lse, key_mask)
    ref_mass, _ = reference(q, k_cache, lse, q_start, kv_len, key_mask=key_mask)
    assert_close(mass, ref_mass * 2, reduction=64)
    assert torch.equal(top, top_of(mass) + 1)


def _bad_calls():
    q = torch.randn(2, 8, 4, 16)
    kc = torch.randn(2, 32, 2, 16)
    lse = torch.randn(2, 4, 8)
    qs, kl = torch.tensor([0, 8], dtype=torch.int32), torch.tensor([8, 16], dtype=torch.int32)
    return {
        "q dtype": (
            (q.double(), kc, lse, qs, kl),
            {},
            TypeError,
            "q must be bfloat16, float16, float32; got float64",
        ),
        "dtypes differ": ((q, kc.half(), lse, qs, kl), {}, TypeError, "k_cache must have q's dtype"),
        "q ndim": ((q[0], kc, lse, qs, kl), {}, RuntimeError, "q must be a 4-dim tensor; got [8, 4, 16]"),
        "None q": ((None, kc, lse, qs, kl), {}, TypeError, "q must be a Tensor; got NoneType"),
        "q last stride": (
            (q.transpose(2, 3).contiguous().transpose(2, 3), kc, lse, qs, kl),
            {},
            RuntimeError,
            "q must be contiguous along D (stride(-1) == 1)",
        ),
        "Hq % Hkv": (
            (q, kc[:, :, :1].expand(2, 32, 3, 16), lse, qs, kl),
            {},
            RuntimeError,
            "Hq must be a positive multiple of Hkv >= 1; got Hq = 4, Hkv = 3",
        ),
        "batch differs": (
            (q, kc[:1], lse, qs, kl),
            {},
            RuntimeError,
            "k_cache must have q's batch size 2; got 1",
        ),
        "head dims differ": (
            (q, kc[..., :8], lse, qs, kl),
            {},
            RuntimeError,
            "k_cache must have q's head dim 16",
        ),
        "lse dtype": ((q, kc, lse.double(), qs, kl), {}, TypeError, "lse must be float32; got float64"),
        "lse shape": (
            (q, kc, lse.transpose(1, 2), qs, kl),
            {},
            RuntimeError,
            "lse must have shape [2, 4, 8] ([B, Hq, Sq]); got [2, 8, 4]",
        ),
        "q_start length": (
            (q, kc, lse, qs[:1], kl),
            {},
            RuntimeError,
            "q_start must have shape [2] ([B]); got [1]",
        ),
        "kv_len dtype": ((q, kc, lse, qs, kl.long()), {}, TypeError, "kv_len must be int32; got int64"),
        "device mismatch": (
            (q, kc, lse, qs.to("meta"), kl),
            {},
            RuntimeError,
            "q_start must be on q's device cpu",
        ),
        "query_mask dtype": (
            (q, kc, lse, qs, kl),
            dict(query_mask=torch.ones(2, 8)),
            TypeError,
            "query_mask must be bool; got float32",
        ),
        "query_mask shape": (
            (q, kc, lse, qs, kl),
            dict(query_mask=torch.ones(2, 9, dtype=torch.bool)),
            RuntimeError,
            "query_mask must have shape [2, 8] ([B, Sq]); got [2, 9]",
        ),
        "key_mask shape": (
            (q, kc, lse, qs, kl),
            dict(key_mask=torch.ones(2, 31, dtype=torch.bool)),
            RuntimeError,
            "key_mask must have shape [2, 32] ([B, S_max]); got [2, 31]",
        ),
        "negative block_size": (
            (q, kc, lse, qs, kl),
            dict(block_size=-1),
            ValueError,
            "block_size must be >= 0; got -1",
        ),
        "infinite scale": (
            (q, kc, lse, qs, kl),
            dict(scale=math.inf),
            ValueError,
            "scale must be finite; got inf",
        ),
        "kv_len past the cache": (
            (q, kc, lse, qs, torch.tensor([8, 33], dtype=torch.int32)),
            {},
            ValueError,
            "q_start must be >= 0 and kv_len in [0, S_max = 32]",
        ),
        "negative q_start": (
            (q, kc, lse, torch.tensor([-1, 0], dtype=torch.int32), kl),
            {},
            ValueError,
            "q_start must be >= 0 and kv_len in [0, S_max = 32]",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
@pytest.mark.parametrize("backend", [None, *KERNEL_BACKENDS, "reference"])
def test_bad_input_messages(case, backend):
    """Every backend refuses the call with the same message, before anything is computed."""
    args, kwargs, exc, fragment = _bad_calls()[case]
    with pytest.raises(exc) as info, use_backend(backend):
        dllm_kernels.attention_mass(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("dllm::attention_mass: "), message
    assert fragment in message, message


@pytest.mark.gpu
def test_cuda_decode_shape_and_graph_replay():
    """The CUDA kernel on a 32-token block over a 2k cache (GQA 32/8, D 128), then captured in a CUDA graph
    (no host sync in the call) and replayed on new queries."""
    q, k_cache, lse, q_start, kv_len = inputs("cuda", torch.bfloat16, 8, 32, 2048, (32, 8), 128, [1024] * 8,
                                              [2048] * 8)  # fmt: skip
    key_mask = torch.rand(8, 2048, device="cuda") < 0.5
    check("cuda", q, k_cache, lse, q_start, kv_len, key_mask=key_mask)
    static_q = q.clone()
    with use_backend("cuda"):
        dllm_kernels.attention_mass(static_q, k_cache, lse, q_start, kv_len)  # warm-up off the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mass, top = dllm_kernels.attention_mass(static_q, k_cache, lse, q_start, kv_len)
    static_q.copy_(torch.randn_like(static_q))
    graph.replay()
    ref_mass, _ = reference(static_q, k_cache, lse, q_start, kv_len)
    assert_close(mass, ref_mass, reduction=32 * 32)
    assert torch.equal(top, top_of(mass))


@pytest.mark.parametrize("part", range(2))
def test_cuda_kernel_under_host_emulation(part, summary):
    """csrc/cuda/attention_mass.cu, compiled for the host with its PTX emulated (tests/cuda_emulation): every
    visibility regime, head dim, dtype, GQA group, mask and strided layout against the reference."""
    code, report = run_cuda_emulation("attention_mass", part, 2)
    assert code == 0, report
    summary(f"attention_mass CUDA emulation, part {part}", report.splitlines()[-1])


@pytest.mark.gpu
def test_cuda_kernel_on_the_emulated_cases():
    """The real kernels on every case the host emulation runs."""
    run_emulated_cases_on_gpu("attention_mass")
