"""The dispatcher: automatic choice, pinning, availability reporting, a missing extension."""

import importlib
import inspect
import os
import pkgutil

import pytest
import torch
from helpers import python

import dllm_kernels
from dllm_kernels import BACKENDS, available_backends, use_backend
from dllm_kernels.ops._common import rows_view
from dllm_kernels.ops.logits_to_confidence import dispatcher


def test_available_backends_report():
    status = available_backends()
    assert list(status) == list(BACKENDS)
    assert status["reference"].available
    for name, s in status.items():
        assert s.reason, f"{name} has no reason"
    if os.environ.get("DLLM_REQUIRE_EXTENSION") == "1":  # set by `make test`: the build must have worked
        assert status["cpu"].available, status["cpu"].reason


def test_automatic_choice_on_cpu():
    rows = rows_view(torch.randn(2, 3, 10))
    expected = "cpu" if available_backends()["cpu"].available else "reference"
    assert dispatcher.select(torch.device("cpu"), rows).backend == expected
    with use_backend("reference"):
        assert dispatcher.select(torch.device("cpu"), rows).backend == "reference"
    with use_backend(None):
        assert dispatcher.select(torch.device("cpu"), rows).backend == expected


def test_pinned_backend_that_cannot_run_raises():
    with use_backend("cuda"), pytest.raises(RuntimeError) as info:
        dllm_kernels.logits_to_confidence(torch.randn(2, 10))
    message = str(info.value)
    assert message.startswith("dllm::logits_to_confidence: backend 'cuda' was requested but cannot run"), (
        message
    )


def test_unknown_backend_name():
    expected = "unknown backend 'tpu'; expected one of cuda, triton, cpu, reference"
    with pytest.raises(ValueError, match=expected), use_backend("tpu"):
        pass


def test_env_pins_backend_once_at_import():
    """DLLM_BACKEND pins every call of the process, the ones the compiled kernels would take included."""
    code = """
        import torch, dllm_kernels
        from dllm_kernels.ops import logits_to_confidence
        from dllm_kernels.reference import logits_to_confidence as reference
        print(logits_to_confidence.dispatcher.select(torch.device("cpu"), torch.randn(1, 1, 4)).backend)
        calls = []
        def spy(*args):
            calls.append(1)
            return reference.logits_to_confidence(*args)
        logits_to_confidence.dispatcher.register("reference")(spy)
        logits_to_confidence.dispatcher._candidates.clear()
        dllm_kernels.logits_to_confidence(torch.randn(2, 9))
        print(len(calls))
    """
    assert python(code, DLLM_BACKEND="reference").stdout.split() == ["reference", "1"]
    bad = python(code, DLLM_BACKEND="fast")
    assert bad.returncode != 0 and "unknown backend 'fast'" in bad.stderr


def test_triton_on_cpu_only_in_interpreter_and_by_name():
    code = """
        import torch, dllm_kernels
        with dllm_kernels.use_backend("triton"):
            dllm_kernels.logits_to_confidence(torch.randn(2, 10))
    """
    result = python(code, TRITON_INTERPRET="0")
    assert result.returncode != 0
    assert "backend 'triton' was requested but cannot run" in result.stderr


def test_missing_extension_warns_once_and_falls_back():
    code = """
        import sys, warnings
        sys.modules["dllm_kernels._C"] = None  # as if the extension had not been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, dllm_kernels
            import dllm_kernels.ops.logits_to_confidence
        messages = [str(w.message) for w in caught if "compiled extension" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        print(dllm_kernels.available_backends()["cpu"])
        token, score = dllm_kernels.logits_to_confidence(torch.tensor([[0.0, 2.0, 1.0]]))
        print(token.item())
    """
    result = python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "could not be loaded" in lines[0]
    assert lines[1].startswith("unavailable: compiled extension not loaded")
    assert lines[2] == "1"


def test_meta_tensors_take_the_fake_kernel(monkeypatch):
    """Plain meta tensors get shapes from the fake kernel: no provider is ever chosen for them."""

    def refuse(self, device, *args, **kwargs):
        raise AssertionError(f"{self.op}: a provider was chosen for {device}")

    monkeypatch.setattr(dllm_kernels._backends.Dispatcher, "select", refuse)
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, device="meta", dtype=dtype)
    int32 = torch.int32
    token, score = dllm_kernels.logits_to_confidence(meta(2, 3, 10), meta(2, 3, dtype=torch.bool))
    assert token.shape == score.shape == (2, 3) and token.dtype == torch.int64
    selected, count = dllm_kernels.select_unmask(
        meta(2, 5), meta(2, 5, dtype=torch.bool), k=meta(2, dtype=torch.int64)
    )
    assert selected.shape == (2, 5) and count.shape == (2,) and count.dtype == int32
    out, lse = dllm_kernels.block_attention(
        meta(1, 4, 2, 8),
        meta(1, 8, 2, 8),
        meta(1, 8, 2, 8),
        meta(1, dtype=int32),
        meta(1, dtype=int32),
        return_lse=True,
    )
    assert out.shape == (1, 4, 2, 8) and lse.shape == (1, 2, 4)
    values, meta16 = meta(4, 16), meta(4, 2, dtype=torch.int16)
    assert dllm_kernels.sparse24_mm(meta(3, 32), values, meta16).shape == (3, 4)
    assert dllm_kernels.decompress_24(values, meta16).shape == (4, 32)
    compressed = dllm_kernels.compress_24(meta(4, 32))
    assert compressed[0].shape == (4, 16) and compressed[1].shape == (4, 2)
    with pytest.raises(RuntimeError, match="dllm::sparse24_mm: x must have shape"):
        dllm_kernels.sparse24_mm(meta(3, 16), values, meta16)  # the fake kernel checks too


COMPILED_OPS = (
    "logits_to_confidence",
    "credit_confidence",
    "select_unmask",
    "sparse24_mm",
    "block_attention",
    "armor_linear",
    "attention_mass",
)


def test_compiled_kernels_take_the_dispatch_keys():
    """The extension's kernels sit on the CPU (and CUDA) dispatch keys, so a call stays in C++."""
    if dllm_kernels._extension._C is None:
        pytest.skip("no compiled extension")
    for op in COMPILED_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dllm::{op}", "CPU"), op


def _calls():
    """One representative call of each op with a compiled kernel, fresh inputs."""
    logits, logits_eligible = torch.randn(3, 5, 301), torch.rand(3, 4) < 0.5
    score, eligible = torch.randn(4, 37), torch.rand(4, 37) < 0.6
    k = torch.randint(0, 5, (4,))
    weight = torch.randn(24, 64)
    values, meta = dllm_kernels.compress_24(weight)
    x, bias = torch.randn(3, 64), torch.randn(24)
    wrap_in, wrap_out = torch.randn(4, 16, 16), torch.randn(3, 8, 8)
    q, cache = torch.randn(2, 5, 4, 16), torch.randn(2, 24, 2, 16)
    new, starts, lengths = torch.randn(2, 5, 2, 16), torch.tensor([3, 9]).int(), torch.tensor([8, 24])
    lse, key_mask = torch.randn(2, 4, 5) + 4, torch.rand(2, 24) < 0.3
    credit = (torch.rand(12, 301).argsort(-1)[:, :3].view(3, 4, 3), torch.rand(3, 4, 3))

    def credit_step():
        state = [t.clone() for t in credit]  # every call from the same credit state
        return (*dllm_kernels.credit_confidence(logits[:, 1:], logits_eligible, *state, beta=0.9), *state)

    return {
        "logits_to_confidence": lambda: dllm_kernels.logits_to_confidence(
            logits[:, 1:], logits_eligible, temperature=0.7, seed=5, score="margin"
        ),
        "credit_confidence": credit_step,
        "select_unmask": lambda: dllm_kernels.select_unmask(
            score, eligible, k=k, policy="topk_or_threshold", threshold=0.2
        ),
        "sparse24_mm": lambda: dllm_kernels.sparse24_mm(x, values, meta, bias),
        "armor_linear": lambda: dllm_kernels.armor_linear(x, wrap_in, values, meta, wrap_out, bias),
        "block_attention": lambda: dllm_kernels.block_attention(
            q,
            cache.clone(),
            cache.clone(),
            starts,
            lengths.int(),
            k_new=new,
            v_new=new,
            block_size=4,
            return_lse=True,
        ),
        "attention_mass": lambda: dllm_kernels.attention_mass(
            q,
            cache,
            lse,
            starts,
            lengths.int(),
            query_mask=torch.tensor([[True, False, True, True, True]] * 2),
            key_mask=key_mask,
            block_size=4,
        ),
    }


def _same(a, b):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("op", COMPILED_OPS)
def test_compiled_path_equals_the_pinned_cpu_backend(op, monkeypatch):
    """Unpinned, the C++ kernel takes the call without Python; pinned to cpu, Python picks the same kernel:
    the answers are bitwise equal, and Python is entered only when pinned."""
    if dllm_kernels._extension._C is None:
        pytest.skip("no compiled extension")
    call = _calls()[op]
    entered = []
    original = dllm_kernels._backends.Dispatcher.select

    def spy(self, device, *args, **kwargs):
        entered.append(self.op)
        return original(self, device, *args, **kwargs)

    monkeypatch.setattr(dllm_kernels._backends.Dispatcher, "select", spy)
    automatic = call()
    assert entered == [], "an unpinned call that the compiled kernel takes entered Python"
    with use_backend("cpu"):
        pinned = call()
    assert entered == [op]
    assert _same(automatic, pinned)


def test_pins_are_per_thread_and_reach_the_compiled_path(monkeypatch):
    """A use_backend block sends every call on its thread through Python to the pinned backend; another
    thread keeps the compiled path."""
    import threading

    chosen = []
    original = dllm_kernels._backends.Dispatcher.select

    def spy(self, device, *args, **kwargs):
        provider = original(self, device, *args, **kwargs)
        chosen.append((threading.current_thread().name, provider.backend))
        return provider

    monkeypatch.setattr(dllm_kernels._backends.Dispatcher, "select", spy)
    logits = torch.randn(2, 50)
    inside = threading.Event()
    release = threading.Event()

    def pinned_worker():
        with use_backend("reference"):
            dllm_kernels.logits_to_confidence(logits)
            inside.set()
            release.wait(timeout=30)

    worker = threading.Thread(target=pinned_worker, name="pinned")
    worker.start()
    assert inside.wait(timeout=30)
    dllm_kernels.logits_to_confidence(logits)  # main thread, unpinned, while the worker holds its pin
    release.set()
    worker.join(timeout=30)
    expected_main = [] if dllm_kernels._extension._C is not None else [("MainThread", "reference")]
    assert chosen == [("pinned", "reference"), *expected_main], chosen


def _op_calls():
    """(module, op, attribute) of every op_call in dllm_kernels.ops: the public function of each op is the
    module's function of the op's name."""
    found = []
    for info in pkgutil.iter_modules(dllm_kernels.ops.__path__):
        module = importlib.import_module(f"dllm_kernels.ops.{info.name}")
        found += [(module, v.dllm_op, name) for name, v in vars(module).items() if hasattr(v, "dllm_op")]
    return found


OP_CALLS = _op_calls()


def test_op_calls_are_found():
    ops = {op for _, op, _ in OP_CALLS}
    assert {"logits_to_confidence", "logits_to_confidence_partial", "select_unmask", "block_attention"} <= ops


@pytest.mark.parametrize("module, op, call", OP_CALLS, ids=[op for _, op, _ in OP_CALLS])
def test_public_functions_pass_each_argument_in_its_schema_place(module, op, call, monkeypatch):
    """The public functions hand torch.ops their options positionally: every argument, given a distinct
    value, must reach the op call in the schema's place for its name."""
    public = getattr(module, op)
    schema = getattr(torch.ops.dllm, op).default._schema
    names = [a.name for a in schema.arguments]
    positional = [
        p.name for p in inspect.signature(public).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    sentinels = {name: object() for name in names}
    passed = []
    monkeypatch.setattr(module, call, lambda *args: passed.append(args))
    public(
        *(sentinels[name] for name in positional), **{n: sentinels[n] for n in names if n not in positional}
    )
    assert len(passed) == 1 and len(passed[0]) == len(names)
    for name, value in zip(names, passed[0], strict=True):
        assert value is sentinels[name], f"{op}: {name} is not in its schema place"


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (
            lambda: dllm_kernels.select_unmask(torch.rand(1, 8), torch.rand(1, 8) < 0.5, k=4),
            TypeError,
            "dllm::select_unmask: Expected a value of type 'Optional[Tensor]' for argument 'k'",
        ),
        (
            lambda: dllm_kernels.select_unmask(torch.rand(1, 8), torch.rand(1, 8) < 0.5, min_per_row=2**70),
            ValueError,
            "dllm::select_unmask: min_per_row must be an int in [-2^63, 2^63)",
        ),
        (
            lambda: dllm_kernels.block_attention(
                *([torch.randn(1, 2, 1, 4)] * 3), *([torch.ones(1, dtype=torch.int32)] * 2), block_size=2**64
            ),
            ValueError,
            "dllm::block_attention: block_size must be an int in [-2^63, 2^63)",
        ),
        (
            lambda: dllm_kernels.logits_to_confidence_merge(torch.randn(1, 1, 8).double(), vocab_size=2.5),
            TypeError,
            "dllm::logits_to_confidence_merge: Expected a value of type 'int' for argument 'vocab_size'",
        ),
    ],
)
def test_arguments_torch_ops_cannot_parse_get_a_dllm_error(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.__context__ is None  # not chained to torch's schema dump
