"""block_attention: every backend against the reference for each way frameworks reuse KV, plus a
two-layer transformer whose dual-cache step must match a full recompute."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, KERNEL_BACKENDS, assert_close, run_cuda_emulation, run_emulated_cases_on_gpu

import dllm_kernels
from dllm_kernels import use_backend
from dllm_kernels.ops.block_attention import dispatcher
from dllm_kernels.reference.block_attention import block_attention as reference

# The interpreter cannot do bf16 arithmetic: Triton on CPU runs fp16 and fp32.
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


def dtypes_for(backend, device):
    return [torch.float16, torch.float32] if (backend, device) == ("triton", "cpu") else DTYPES[device]


def run(backend, *args, **kwargs):
    reason = dispatcher.why_not(backend, args[0].device, *args, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    with use_backend(backend):
        return dllm_kernels.block_attention(*args, **kwargs)


def check(backend, q, k_cache, v_cache, q_start, kv_len, **kwargs):
    """Output, lse and the caches after the fused write all agree with the reference."""
    caches = (k_cache.clone(), v_cache.clone())
    out, lse = run(backend, q, k_cache, v_cache, q_start, kv_len, return_lse=True, **kwargs)
    ref_out, ref_lse = reference(q, *caches, q_start, kv_len, return_lse=True, **kwargs)
    what = f"{backend} q {list(q.shape)} {q.dtype} cache {list(k_cache.shape)} {kwargs.get('block_size', 0)}"
    assert out.shape == q.shape and out.dtype == q.dtype, what
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32, what
    assert_close(out, ref_out, what)
    assert_close(lse, ref_lse, what)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1]), f"{what}: caches differ"
    no_lse = run(backend, q, k_cache, v_cache, q_start, kv_len, **kwargs)
    assert no_lse[1].numel() == 0
    return out, lse


def tensors(device, dtype, n_rows, n_queries, s_max, heads=(28, 4), head_dim=64, new=True):
    n_heads, n_kv = heads
    q = torch.randn(n_rows, n_queries, n_heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(n_rows, s_max, n_kv, head_dim, device=device).to(dtype)
    v_cache = torch.randn(n_rows, s_max, n_kv, head_dim, device=device).to(dtype)
    if not new:
        return q, k_cache, v_cache, {}
    k_new = torch.randn(n_rows, n_queries, n_kv, head_dim, device=device).to(dtype)
    v_new = torch.randn(n_rows, n_queries, n_kv, head_dim, device=device).to(dtype)
    return q, k_cache, v_cache, dict(k_new=k_new, v_new=v_new)


def int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


SCENARIOS = {
    # Fast-dLLM / SDAR prefix cache: the active block attends to the cached prefix and itself.
    "prefix cache": dict(n_queries=32, s_max=96, q_start=[32, 64], kv_len=[64, 96], block_size=0),
    # Fast-dLLM dual cache: the whole sequence, the block's K/V overwritten in the middle.
    "dual cache": dict(n_queries=32, s_max=96, q_start=[32, 0], kv_len=[96, 96], block_size=0),
    # Fast-dLLM v2: an 8-token sub-block inside a 32-token block (not block aligned).
    "sub-block": dict(n_queries=8, s_max=96, q_start=[40, 88], kv_len=[96, 96], block_size=32),
    # BD3-LM / SDAR block-causal prefill, length not a multiple of the block.
    "block-causal prefill": dict(n_queries=100, s_max=100, q_start=[0, 0], kv_len=[100, 100], block_size=32),
    # A finished row (kv_len = 0) beside a prefix-cache row.
    "empty row": dict(n_queries=16, s_max=64, q_start=[0, 16], kv_len=[0, 32], block_size=0),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_scenarios(backend, device, scenario):
    spec = SCENARIOS[scenario]
    for dtype in dtypes_for(backend, device):
        q, k_cache, v_cache, new = tensors(device, dtype, 2, spec["n_queries"], spec["s_max"])
        q_start, kv_len = int32(spec["q_start"], device), int32(spec["kv_len"], device)
        out, lse = check(backend, q, k_cache, v_cache, q_start, kv_len, block_size=spec["block_size"], **new)
        if scenario == "empty row":
            assert (out[0] == 0).all() and (lse[0] == -math.inf).all()


@pytest.mark.parametrize("heads", [(28, 4), (4, 4), (8, 1)], ids=["gqa-28/4", "mha-4/4", "mqa-8/1"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_heads_and_dims(backend, device, heads, head_dim):
    dtype = dtypes_for(backend, device)[0]
    q, k_cache, v_cache, new = tensors(device, dtype, 3, 19, 77, heads, head_dim)
    q_start, kv_len = int32([0, 29, 58], device), int32([77, 48, 70], device)
    check(backend, q, k_cache, v_cache, q_start, kv_len, block_size=16, **new)
    check(backend, q, k_cache, v_cache, q_start, kv_len, block_size=0, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_inputs(backend, device):
    dtype = dtypes_for(backend, device)[0]
    wide = torch.randn(2, 40, 4, 2, 64, device=device).to(dtype)
    q = wide[:, 4:36, :, 0]  # a slice of a fused qkv-like buffer: strides on every dim but the last
    k_cache = (
        torch.randn(2, 2, 80, 64, device=device).to(dtype).transpose(1, 2)
    )  # [B, S, Hkv, D], heads-major
    v_cache = torch.randn(2, 80, 2, 64, device=device).to(dtype)
    check(backend, q, k_cache, v_cache, int32([16, 48], device), int32([48, 80], device), block_size=0)


def test_opcheck_and_compile():
    q, k_cache, v_cache, new = tensors("cpu", torch.float32, 2, 16, 48, heads=(4, 2), head_dim=32)
    q_start, kv_len = int32([0, 16], "cpu"), int32([16, 48], "cpu")
    for kwargs in (dict(block_size=0), dict(block_size=8, return_lse=True, **new), dict(scale=0.2)):
        torch.library.opcheck(
            torch.ops.dllm.block_attention.default, (q, k_cache, v_cache, q_start, kv_len), kwargs
        )

    @torch.compile(fullgraph=True)
    def layer(q, k_cache, v_cache, k_new, v_new):
        out, _ = dllm_kernels.block_attention(q, k_cache, v_cache, q_start, kv_len, k_new=k_new, v_new=v_new)
        return out.sum(-1)

    caches = (k_cache.clone(), v_cache.clone())
    got = layer(q, k_cache, v_cache, new["k_new"], new["v_new"])
    ref_out, _ = reference(q, *caches, q_start, kv_len, **new)
    assert_close(got, ref_out.sum(-1))
    assert torch.equal(k_cache, caches[0]), "the cache write must survive torch.compile"


class TinyTransformer(torch.nn.Module):
    """Two pre-norm bidirectional layers with GQA: enough to show that partial KV reuse is exact."""

    def __init__(self, vocab=97, n_heads=4, n_kv=2, head_dim=64, n_layers=2):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        width = n_heads * head_dim
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                dict(
                    qkv=torch.nn.Linear(width, (n_heads + 2 * n_kv) * head_dim),
                    proj=torch.nn.Linear(width, width),
                    mlp=torch.nn.Sequential(
                        torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)
                    ),
                )
            )
            for _ in range(n_layers)
        )
        self.head = torch.nn.Linear(width, vocab)

    def qkv(self, layer, h):
        q, k, v = layer["qkv"](F.rms_norm(h, h.shape[-1:])).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1
        )
        shape = h.shape[:2]
        return q.view(*shape, self.n_heads, -1), k.view(*shape, self.n_kv, -1), v.view(*shape, self.n_kv, -1)

    def finish(self, layer, h, attn):
        h = h + layer["proj"](attn.flatten(2))
        return h + layer["mlp"](F.rms_norm(h, h.shape[-1:]))

    def full(self, tokens):
        """Recompute everything with plain SDPA (no dllm op); also return every layer's K and V."""
        h, caches = self.embed(tokens), []
        for layer in self.layers:
            q, k, v = self.qkv(layer, h)
            caches.append((k.clone(), v.clone()))
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
            ).transpose(1, 2)
            h = self.finish(layer, h, attn)
        return self.head(h), caches

    def block_step(self, tokens, caches, start, end):
        """Dual cache: recompute only positions [start, end); every other K/V comes from the caches."""
        h = self.embed(tokens[:, start:end])
        rows = tokens.shape[0]
        q_start = torch.full((rows,), start, dtype=torch.int32)
        kv_len = torch.full((rows,), tokens.shape[1], dtype=torch.int32)
        for layer, (k_cache, v_cache) in zip(self.layers, caches, strict=True):
            q, k, v = self.qkv(layer, h)
            attn, _ = dllm_kernels.block_attention(q, k_cache, v_cache, q_start, kv_len, k_new=k, v_new=v)
            h = self.finish(layer, h, attn)
        return self.head(h)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dual_cache_step_matches_full_recompute(backend):
    model = TinyTransformer().eval()
    tokens = torch.randint(0, 97, (2, 96))
    start, end = 32, 64
    with torch.no_grad():
        full_logits, caches = model.full(tokens)
        stale = [(k.clone(), v.clone()) for k, v in caches]
        stale[0][0][:, start:end] = 0  # the block's own entries are rewritten by the step
        reason = dispatcher.why_not(backend, tokens.device, stale[0][0], explicit=True)
        if reason is not None:
            pytest.skip(reason)
        with use_backend(backend):
            step_logits = model.block_step(tokens, stale, start, end)
    torch.testing.assert_close(step_logits, full_logits[:, start:end], rtol=1e-4, atol=1e-4)
    for (k, v), (k_ref, v_ref) in zip(stale, caches, strict=True):
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)


def _bad_calls():
    q = torch.randn(2, 8, 4, 16)
    kc, vc = torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    qs, kl = torch.tensor([0, 8], dtype=torch.int32), torch.tensor([8, 16], dtype=torch.int32)
    kn, vn = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    return {
        "dtypes differ": ((q, kc.half(), vc, qs, kl), {}, TypeError, "k_cache must have q's dtype"),
        "Hq % Hkv": (
            (q, kc[:, :, :1].expand(2, 32, 3, 16), vc[:, :, :1].expand(2, 32, 3, 16), qs, kl),
            {},
            RuntimeError,
            "Hq must be a positive multiple of Hkv >= 1; got Hq = 4, Hkv = 3",
        ),
        "head dims differ": (
            (q, kc[..., :8], vc[..., :8], qs, kl),
            {},
            RuntimeError,
            "k_cache must have q's head dim 16; got 8",
        ),
        "q_start length": (
            (q, kc, vc, qs[:1], kl),
            {},
            RuntimeError,
            "q_start must have shape [2] ([B]); got [1]",
        ),
        "kv_len dtype": ((q, kc, vc, qs, kl.long()), {}, TypeError, "kv_len must be int32; got int64"),
        "k_new without v_new": (
            (q, kc, vc, qs, kl),
            dict(k_new=kn),
            ValueError,
            "k_new and v_new go together",
        ),
        "write past the cache": (
            (q, kc, vc, torch.tensor([0, 30], dtype=torch.int32), kl),
            dict(k_new=kn, v_new=vn),
            ValueError,
            "q_start + Sq must be <= S_max = 32 when writing",
        ),
        "negative block_size": (
            (q, kc, vc, qs, kl),
            dict(block_size=-1),
            ValueError,
            "block_size must be >= 0; got -1",
        ),
        "device mismatch": (
            (q, kc, vc, qs.to("meta"), kl),
            {},
            RuntimeError,
            "q_start must be on q's device cpu; got meta",
        ),
        "q ndim": ((q[0], kc, vc, qs, kl), {}, RuntimeError, "q must be a 4-dim tensor; got [8, 4, 16]"),
        "no query heads": (
            (q[:, :, :0], kc, vc, qs, kl),
            dict(k_new=kn, v_new=vn),
            RuntimeError,
            "Hq must be a positive multiple of Hkv >= 1; got Hq = 0, Hkv = 2",
        ),
        "no KV heads": ((q, kc[:, :, :0], vc[:, :, :0], qs, kl), {}, RuntimeError, "got Hq = 4, Hkv = 0"),
        "head dim 0": (
            (q[..., :0], kc[..., :0], vc[..., :0], qs, kl),
            dict(k_new=kn[..., :0], v_new=vn[..., :0]),
            RuntimeError,
            "the head dim D must be >= 1; got q of shape [2, 8, 4, 0]",
        ),
        "None q": ((None, kc, vc, qs, kl), {}, TypeError, "q must be a Tensor; got NoneType"),
        "expanded k_cache written": (
            (q, kc[:1].expand(2, 32, 2, 16), vc, qs, kl),
            dict(k_new=kn, v_new=vn),
            RuntimeError,
            "k_cache is written in place, so its elements must not overlap in memory; got shape [2, 32, 2",
        ),
        "v_cache is k_cache": (
            (q, kc, kc, qs, kl),
            dict(k_new=kn, v_new=vn),
            RuntimeError,
            "k_cache and v_cache are written in place, so they must not share memory",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
@pytest.mark.parametrize("backend", [None, *KERNEL_BACKENDS, "reference"])
def test_bad_input_messages(case, backend):
    """Every backend refuses the call with the same message, and nothing was written into the caches."""
    args, kwargs, exc, fragment = _bad_calls()[case]
    caches = (args[1].clone(), args[2].clone())
    with pytest.raises(exc) as info, use_backend(backend):
        dllm_kernels.block_attention(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("dllm::block_attention: "), message
    assert fragment in message, message
    assert torch.equal(args[1], caches[0]) and torch.equal(args[2], caches[1]), "caches written on error"


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_split_kv_head_dim_96_and_unread_keys(splits):
    """Split-KV merged by lse, a padded head dim, and keys beyond the visible range that are never read
    (they hold NaN: one read would poison the output)."""
    if dispatcher.why_not("triton", torch.device("cpu"), torch.empty(1, 1, 1, 64), explicit=True) is not None:
        pytest.skip("triton cannot run here")
    from dllm_kernels.triton_kernels.block_attention import block_attention as launch

    q, k_cache, v_cache, _ = tensors("cpu", torch.float16, 2, 8, 160, heads=(8, 2), head_dim=96, new=False)
    q_start, kv_len = int32([40, 100], "cpu"), int32([128, 150], "cpu")
    ref_out, ref_lse = reference(q, k_cache, v_cache, q_start, kv_len, block_size=32, return_lse=True)
    k_cache[0, 128:], v_cache[0, 128:] = math.nan, math.nan  # past kv_len
    k_cache[1, 128:150], v_cache[1, 128:150] = math.nan, math.nan  # past the queries' block: invisible
    out, lse = launch(q, k_cache, v_cache, q_start, kv_len, None, None, 32, None, True, num_splits=splits)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_empty_batch_and_block(backend, device):
    """B = 0 and Sq = 0 give empty results (nothing written); an empty cache gives out 0, lse -inf."""
    dtype = dtypes_for(backend, device)[0]
    q, k_cache, v_cache, new = tensors(device, dtype, 2, 4, 16, heads=(4, 2), head_dim=64)
    q_start, kv_len = int32([0, 4], device), int32([4, 8], device)
    reason = dispatcher.why_not(backend, q.device, q, k_cache, v_cache, q_start, kv_len, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    caches = (k_cache.clone(), v_cache.clone())
    with use_backend(backend):
        out, lse = dllm_kernels.block_attention(
            q[:0], k_cache[:0], v_cache[:0], q_start[:0], kv_len[:0], return_lse=True
        )
        assert out.shape == (0, 4, 4, 64) and lse.shape == (0, 4, 4)
        empty = {name: t[:, :0] for name, t in new.items()}
        out, lse = dllm_kernels.block_attention(
            q[:, :0], k_cache, v_cache, q_start, kv_len, return_lse=True, **empty
        )
        assert out.shape == (2, 0, 4, 64) and lse.shape == (2, 4, 0)
        assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
        zero = int32([0, 0], device)
        out, lse = dllm_kernels.block_attention(
            q, k_cache[:, :0], v_cache[:, :0], zero, zero, return_lse=True
        )
        assert (out == 0).all() and (lse == -math.inf).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "reference"])
def test_invisible_keys_never_matter(backend, device):
    """NaN / inf in the cache past kv_len, and in key blocks after a query's own (block-causal), change
    nothing on any backend, the reference included; the fused K / V buffer of a real model (K and V
    interleaved in one tensor) is written without an overlap error."""
    dtype = dtypes_for(backend, device)[0]
    n_heads, n_kv, head_dim = 4, 2, 64
    kv = torch.randn(2, 96, 2, n_kv, head_dim, device=device).to(dtype)  # [B, S, K|V, Hkv, D]
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    q = torch.randn(2, 8, n_heads, head_dim, device=device).to(dtype)
    k_new = torch.randn(2, 8, n_kv, head_dim, device=device).to(dtype)
    v_new = torch.randn(2, 8, n_kv, head_dim, device=device).to(dtype)
    q_start, kv_len = int32([16, 40], device), int32([64, 80], device)
    reason = dispatcher.why_not(backend, q.device, q, k_cache, v_cache, q_start, kv_len, explicit=True)
    if reason is not None:
        pytest.skip(reason)
    for block_size in (0, 16):

        def attend(buffer, block_size=block_size):
            with use_backend(backend):
                return dllm_kernels.block_attention(
                    q,
                    buffer[:, :, 0],
                    buffer[:, :, 1],
                    q_start,
                    kv_len,
                    k_new=k_new,
                    v_new=v_new,
                    block_size=block_size,
                    return_lse=True,
                )

        want = attend(kv.clone())
        poisoned = kv.clone()
        poisoned[0, 64:] = math.nan  # past kv_len
        poisoned[1, 80:, 0], poisoned[1, 80:, 1] = math.nan, math.inf
        if block_size:  # the queries sit in blocks 1 (16..23) and 2 (40..47): later key blocks are unseen
            poisoned[0, 32:64] = math.nan
            poisoned[1, 48:80, 1] = math.inf
        got = attend(poisoned)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (backend, block_size)
        assert torch.isfinite(got[0]).all()
        assert torch.equal(poisoned[0, 16:24, 0], k_new[0]), "the fused write into the K half"


@pytest.mark.parametrize("device", DEVICES)
def test_nan_query_gives_the_same_lse_everywhere(device):
    """A NaN anywhere in a query that sees a key makes that (query, head)'s out and lse NaN on every backend;
    a query that sees no key keeps out 0, lse -inf."""
    results = {}
    for backend in [*KERNEL_BACKENDS, "reference"]:
        dtype = torch.float16 if device == "cpu" else torch.bfloat16
        q, k_cache, v_cache, _ = tensors(device, dtype, 2, 8, 40, heads=(4, 2), head_dim=64, new=False)
        q_start, kv_len = int32([8, 0], device), int32([24, 0], device)
        if dispatcher.why_not(backend, q.device, q, k_cache, v_cache, q_start, kv_len, explicit=True):
            continue
        q = q.clone()
        q[0, 2, 1, 5] = math.nan
        q[1, 3, 0, 0] = math.nan  # row 1 sees nothing
        with use_backend(backend):
            results[backend] = dllm_kernels.block_attention(
                q, k_cache, v_cache, q_start, kv_len, return_lse=True
            )
    assert len(results) >= 2
    for backend, (out, lse) in results.items():
        assert torch.isnan(lse[0, 1, 2]) and torch.isnan(out[0, 2, 1]).all(), backend
        assert torch.isnan(lse).sum() == 1 and torch.isnan(out).sum() == out.shape[-1], backend
        assert (lse[1] == -math.inf).all() and (out[1] == 0).all(), backend


@pytest.mark.gpu
def test_cuda_decode_over_a_long_cache_and_graph_replay():
    """The CUDA kernel on a 32-token block over an 8k cache (split KV, merged by lse, beside the fused write),
    then captured in a CUDA graph (no host sync in the call) and replayed on new queries."""
    q, k_cache, v_cache, new = tensors("cuda", torch.bfloat16, 2, 32, 8192, heads=(28, 4), head_dim=128)
    q_start, kv_len = int32([4096, 8160], "cuda"), int32([8192, 8192], "cuda")
    check("cuda", q, k_cache, v_cache, q_start, kv_len, **new)
    check("cuda", q, k_cache, v_cache, q_start, kv_len, block_size=32)
    static_q = q.clone()
    with use_backend("cuda"):
        dllm_kernels.block_attention(static_q, k_cache, v_cache, q_start, kv_len)  # warm-up off the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = dllm_kernels.block_attention(static_q, k_cache, v_cache, q_start, kv_len)
    static_q.copy_(torch.randn_like(static_q))
    graph.replay()
    assert_close(out, reference(static_q, k_cache, v_cache, q_start, kv_len)[0])


@pytest.mark.parametrize("part", range(4))
def test_cuda_kernel_under_host_emulation(part, summary):
    """csrc/cuda/block_attention.cu, compiled for the host with its PTX emulated (tests/cuda_emulation): every
    visibility regime, head dim, dtype, GQA group, split count and the fused write against the reference."""
    code, report = run_cuda_emulation("block_attention", part, 4)
    assert code == 0, report
    summary(f"block_attention CUDA emulation, part {part}", report.splitlines()[-1])


@pytest.mark.gpu
def test_cuda_kernel_on_the_emulated_cases():
    """The real kernels on every case the host emulation runs (tests/cuda_emulation): the first GPU run
    checks what the emulation could not, the hardware itself."""
    run_emulated_cases_on_gpu("block_attention")
