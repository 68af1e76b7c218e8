"""Backend ("provider") choice for every dllm op.

Automatic choice walks ``cuda -> triton -> cpu -> reference`` and takes the first backend that is
installed and says it supports the call. It looks only at metadata (device, dtype, shape, strides,
what was built), never at tensor values, and reads no environment variable per call: ``DLLM_BACKEND``
and ``DLLM_DEBUG_CHECKS`` are read once, at import. ``use_backend(name)`` overrides both; an explicitly
requested backend that cannot run the call raises instead of falling back.

The compiled extension registers its kernels for the CPU and CUDA dispatch keys: a call with nothing
pinned that the Python checks would accept and hand to that kernel anyway runs there without entering
Python (csrc/torch/fast_path.h). Every other call reaches the implementation registered here.
"""

import contextlib
import contextvars
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _extension, _registry

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Triton kernels run on CPU tensors only in the interpreter, and only when asked for by name.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Value checks that read tensors (a host sync on a GPU): off unless asked for.
DEBUG_CHECKS = os.environ.get("DLLM_DEBUG_CHECKS") == "1"


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __str__(self):
        return ("available: " if self.available else "unavailable: ") + self.reason


def _triton_status() -> BackendStatus:
    try:
        import triton
    except ImportError as e:
        return BackendStatus(False, f"triton is not importable ({e})")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on CUDA tensors")
    if TRITON_INTERPRET:
        return BackendStatus(
            True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
        )
    return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")


def _compute_status() -> dict[str, BackendStatus]:
    ext = _extension.load_error
    if ext is not None:
        cpu = BackendStatus(False, f"compiled extension not loaded: {ext}")
        cuda = cpu
    else:
        cpu = BackendStatus(True, "compiled C++ kernels (OpenMP)")
        if not _extension.cuda_built():
            cuda = BackendStatus(False, "extension built without CUDA (torch without CUDA, or no nvcc)")
        elif not torch.cuda.is_available():
            cuda = BackendStatus(False, "no CUDA device visible")
        else:
            cuda = BackendStatus(True, "compiled CUDA kernels")
    return {
        "cuda": cuda,
        "triton": _triton_status(),
        "cpu": cpu,
        "reference": BackendStatus(True, "plain PyTorch (the semantics and the test oracle)"),
    }


_STATUS: dict[str, BackendStatus] | None = None


def _status() -> dict[str, BackendStatus]:
    global _STATUS
    if _STATUS is None:
        _STATUS = _compute_status()
    return _STATUS


def available_backends() -> dict[str, BackendStatus]:
    """What this install can run, and why not the rest: ``{backend: BackendStatus}``."""
    return dict(_status())


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"dllm: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_ENV_BACKEND = os.environ.get("DLLM_BACKEND") or None
if _ENV_BACKEND is not None:
    _check_name(_ENV_BACKEND)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dllm_backend", default=_ENV_BACKEND)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run every dllm op inside the block on backend ``name`` (``None``: automatic choice)."""
    token = _forced.set(None if name is None else _check_name(name))
    pinned = _extension.set_pinned(name is not None)
    try:
        yield
    finally:
        _forced.reset(token)
        _extension.restore_pinned(pinned)


def _device_supported(backend: str, device_type: str, explicit: bool) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if device_type == "cpu" else f"the cpu backend runs CPU tensors, got {device_type}"
    if device_type == "cuda":
        return None
    if backend == "triton" and device_type == "cpu" and TRITON_INTERPRET:
        return None if explicit else "triton on CPU tensors runs only when requested by name"
    return f"the {backend} backend runs CUDA tensors, got {device_type}"


@dataclass(frozen=True)
class Provider:
    backend: str
    run: Callable
    # Metadata-only predicate: None if the provider can run these arguments, else why not.
    supports: Callable[..., str | None]


class Dispatcher:
    """The providers of one op and the rule that picks one for a call.

    Every provider and every ``supports`` predicate takes the op's checked arguments, in schema order."""

    def __init__(self, op: str):
        self.op = op
        self.providers: dict[str, Provider] = {}
        self._candidates: dict[tuple[str, str | None], list[Provider]] = {}

    def register(self, backend: str, supports: Callable[..., str | None] = lambda *a, **k: None):
        def decorate(run):
            self.providers[_check_name(backend)] = Provider(backend, run, supports)
            self._candidates.clear()
            return run

        return decorate

    def _static_reason(self, backend: str, device_type: str, explicit: bool) -> str | None:
        """Why backend can never run this op on this device type (None if it may)."""
        if backend not in self.providers:
            return f"{self.op} has no {backend} implementation"
        status = _status()[backend]
        if not status.available:
            return status.reason
        return _device_supported(backend, device_type, explicit)

    def why_not(self, backend: str, device: torch.device, *args, explicit: bool = False, **kwargs):
        """None if ``backend`` can run this call, else the reason it cannot."""
        reason = self._static_reason(backend, device.type, explicit)
        return reason or self.providers[backend].supports(*args, **kwargs)

    def select(self, device: torch.device, *args, **kwargs) -> Provider:
        forced = _forced.get()
        key = (device.type, forced)
        candidates = self._candidates.get(key)
        if candidates is None:  # what install and device type allow never changes: work it out once
            names = BACKENDS if forced is None else (forced,)
            explicit = forced is not None
            candidates = [
                self.providers[b] for b in names if self._static_reason(b, device.type, explicit) is None
            ]
            self._candidates[key] = candidates
        for provider in candidates:
            if provider.supports(*args, **kwargs) is None:
                return provider
        if forced is not None:
            reason = self.why_not(forced, device, *args, explicit=True, **kwargs)
            raise RuntimeError(f"dllm::{self.op}: backend {forced!r} was requested but cannot run: {reason}")
        raise RuntimeError(f"dllm::{self.op}: no backend can run on {device}")  # reference runs anywhere

    def backends_for(self, device: torch.device, *args, **kwargs) -> list[str]:
        """Every backend that can run this call when asked by name (tests and benchmarks walk these)."""
        return [b for b in BACKENDS if self.why_not(b, device, *args, explicit=True, **kwargs) is None]


def define_op(
    op: str,
    checked_args: Callable[..., tuple],
    fake: Callable[..., object],
    prepare: Callable[..., tuple] | None = None,
    choices: tuple[str, ...] = (),
) -> Dispatcher:
    """Registers the fake kernel and the implementation of ``dllm::<op>`` (schema in ``_registry``) and
    returns the op's dispatcher, for its modules to register providers with.

    ``checked_args(*args, **kwargs)`` validates a call and returns the schema's arguments in order; the
    fake kernel (FakeTensor and meta tensors) gets them as ``fake(*arguments)``. The implementation is
    registered for CompositeExplicitAutograd, so every device type reaches it: it runs ``prepare`` (checks
    that read values, defaults computed from values; real tensors only) and then the provider that
    ``Dispatcher.select`` picks for the first argument's device. The op's C++ kernels (if any) hand this
    implementation every call they do not take; ``choices``: the names of the op's string argument, in the
    order of the kernels' enum."""
    dispatcher = Dispatcher(op)

    @torch.library.register_fake(f"dllm::{op}")
    def _fake(*args, **kwargs):
        return fake(*checked_args(*args, **kwargs))

    def _impl(*args, **kwargs):
        arguments = checked_args(*args, **kwargs)
        if prepare is not None:
            arguments = prepare(*arguments)
        return dispatcher.select(arguments[0].device, *arguments).run(*arguments)

    _registry.lib.impl(op, _impl, "CompositeExplicitAutograd")
    if _extension._C is not None:
        _extension._C.set_python_impl(op, _impl, list(choices))
    return dispatcher


def enable_compiled_dispatch():
    """Let the C++ kernels take calls (once every op is defined); not with DLLM_DEBUG_CHECKS, whose value
    checks live in Python."""
    if _extension._C is not None:
        _extension._C.set_fast_path(not DEBUG_CHECKS, _ENV_BACKEND is not None)
