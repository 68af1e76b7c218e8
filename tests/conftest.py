"""Shared test set-up: the Triton interpreter on CPU-only machines, fresh seeds, devices, GPU markers."""

import os
import random
import zlib

import pytest
import torch

# Triton kernels run on CPU under the interpreter; it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None, help="base seed (default: fresh each run)")


def pytest_configure(config):
    if config.getoption("--seed") is None:
        config.option.seed = random.SystemRandom().randrange(2**31)


def pytest_report_header(config):
    return f"dllm-kernels: base seed {config.getoption('--seed')} (rerun a failure with --seed N)"


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs every run, reproducible from the seed printed in the header."""
    torch.manual_seed(request.config.getoption("--seed") ^ zlib.crc32(request.node.nodeid.encode()))


_SUMMARIES: list[tuple[str, str]] = []


@pytest.fixture
def summary():
    """``summary(title, text)``: text printed at the end of the run (the CI log keeps it)."""
    return lambda title, text: _SUMMARIES.append((title, text))


def pytest_terminal_summary(terminalreporter):
    for title, text in _SUMMARIES:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)


def pytest_collection_modifyitems(config, items):
    gpu = pytest.mark.gpu
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        params = getattr(item, "callspec", None)
        on_cuda = params is not None and any(
            v == "cuda" or (isinstance(v, torch.device) and v.type == "cuda") for v in params.params.values()
        )
        if on_cuda or item.get_closest_marker("gpu"):
            item.add_marker(gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
