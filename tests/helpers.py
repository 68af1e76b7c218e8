"""Comparison helpers, the one tolerance table every op's tests use, and a Python subprocess runner."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dllm_kernels import BACKENDS

# Float outputs against the reference, by the output's dtype. fp32 outputs are accumulated in fp32
# by the kernels and in fp64 by the reference.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}

# CUDA cases are always collected, and skip (marked "gpu") where there is no device.
DEVICES = ["cpu", "cuda"]

# Every backend that is compared with the reference (the reference itself is checked by hand).
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]

# The Triton interpreter runs one program (a row) at a time, 10-40 ms each; past this many rows a case only
# repeats rows it has run, and the launch grid is the GPU run's to test.
INTERPRETER_MAX_ROWS = 40


def skip_rows_the_interpreter_repeats(backend: str, device: str, n_rows: int):
    if backend == "triton" and device == "cpu" and n_rows > INTERPRETER_MAX_ROWS:
        pytest.skip(f"the Triton interpreter runs {INTERPRETER_MAX_ROWS} rows at most (one program per row)")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "", reduction: int = 1):
    """Equal NaN / inf pattern, finite values within the tolerance of actual's dtype. ``reduction``: the
    length of the sums behind each output when the reference also sums in fp32, in another order; the
    two roundings drift apart as the partial sums grow, so beyond 128 terms the tolerance grows with it."""
    scale = max(1.0, reduction / 128)
    tolerance = {key: value * scale for key, value in TOLERANCES[actual.dtype].items()}
    torch.testing.assert_close(  # a msg string would replace torch's report of where and by how much
        actual, expected.to(actual.dtype), equal_nan=True, msg=lambda report: f"{msg}\n{report}", **tolerance
    )


def edge_logit_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows 0-4 of ``logits [>= 5, >= 21]`` made the edge cases every logits reader handles, in place: a NaN,
    a +inf, every logit -inf, a banned only finite logit, a NaN at a banned id. Returns the banned ids."""
    logits[0, 11] = math.nan
    logits[1, 20] = math.inf
    logits[2] = -math.inf
    logits[3, :] = -math.inf
    logits[3, 3] = 4.0  # the only finite logit is banned
    logits[4, 5] = math.nan  # a NaN at a banned id is never seen
    return torch.tensor([3, 5], device=logits.device)


def python(code: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """Runs code (dedented) in a fresh interpreter with env added, output captured, bounded in time."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_mostly_equal(actual: torch.Tensor, expected: torch.Tensor, max_disagree: float, msg: str = ""):
    """Integer outputs that may differ in a fraction of entries (float rounding in sampling keys)."""
    n = expected.numel()
    bad = int((actual != expected).sum())
    allowed = math.floor(max_disagree * n) + (1 if max_disagree > 0 else 0)
    assert bad <= allowed, f"{msg}: {bad} of {n} entries differ (allowed {allowed})"


def run_cuda_emulation(
    suite: str, part: int, parts: int, *replace: tuple[str, str], options=(), timeout: float = 600
):
    """Runs csrc/cuda/<suite's kernel>.cu under the host emulation (tests/cuda_emulation) on a fresh seed,
    in its own process: (exit code, report). ``replace``: (old, new) edits of the kernel source first;
    ``options``: more harness arguments (``--schedule 3`` ...)."""
    import shutil

    import pytest

    if shutil.which("g++") is None:
        pytest.skip("the CUDA host emulation needs g++")
    seed = int(torch.randint(0, 2**31, ()))
    harness = os.path.join(os.path.dirname(__file__), "cuda_emulation", "harness.py")
    command = [
        sys.executable,
        harness,
        suite,
        "--seed",
        str(seed),
        "--part",
        str(part),
        "--parts",
        str(parts),
    ]
    for old, new in replace:
        command += ["--replace", old, new]
    command += list(options)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return done.returncode, f"seed {seed}:\n" + (done.stdout + done.stderr).strip()


def run_emulated_cases_on_gpu(name: str):
    """Every case of the host emulation's suite ``name`` on the real CUDA kernels, on a fresh seed."""
    suite = emulation_suite(name)
    for case in suite.cases(torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))):
        suite.run_on_gpu(case)


def emulation_suite(name: str):
    """The module tests/cuda_emulation/<name>.py, whose cases the GPU tests also run on the real kernels."""
    import importlib.util

    folder = os.path.join(os.path.dirname(__file__), "cuda_emulation")
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the suite imports its harness
    spec = importlib.util.spec_from_file_location(f"emulation_{name}", os.path.join(folder, f"{name}.py"))
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite
