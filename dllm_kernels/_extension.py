"""Loads the compiled extension ``dllm_kernels._C``, or says once why it could not."""

import warnings

try:
    from . import _C
except ImportError as e:  # not built, or built against another torch
    _C = None
    load_error: str | None = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"dllm_kernels: the compiled extension could not be loaded ({load_error}); "
        "the reference and Triton backends still work. Rebuild with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    load_error = None


def cuda_built() -> bool:
    return _C is not None and bool(_C.cuda_built)


def set_pinned(pinned: bool | None) -> int | None:
    """Tell the C++ kernels whether a backend is pinned on this thread (None: the default); returns the
    state it replaces, for ``restore_pinned``."""
    if _C is None:
        return None
    previous = _C.get_pinned()
    _C.set_pinned(-1 if pinned is None else int(pinned))
    return previous


def restore_pinned(state: int | None):
    if _C is not None and state is not None:
        _C.set_pinned(state)
