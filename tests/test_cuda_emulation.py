"""The host emulation of the CUDA kernels (tests/cuda_emulation) has teeth: it refuses a ptx.cuh it does not
describe, and it fails kernels with a wrong fragment layout, a missing barrier or a missing cp.async wait.
The kernels themselves run under it in each op's test file."""

import sys
from pathlib import Path

import pytest
from helpers import run_cuda_emulation

sys.path.insert(0, str(Path(__file__).parent / "cuda_emulation"))
import harness


def test_a_changed_ptx_header_is_refused(tmp_path):
    changed = tmp_path / "ptx.cuh"
    changed.write_text(harness.ROOT.joinpath("csrc/cuda/ptx.cuh").read_text() + "// a new wrapper\n")
    harness.check_fingerprint()
    with pytest.raises(RuntimeError, match="emulate the change there"):
        harness.check_fingerprint(changed)


# defect: (suite, old source, new source, harness options). One failing case is the proof, so each run stops
# there; a race is run under the schedule that exposes it: warps skewed many steps apart with copies that
# land at issue (a missing barrier), or copies that land only at their wait (a missing wait).
FIRST = ("--first-failure",)
DEFECTS = {
    "V fragments not transposed": (
        "block_attention",
        "ptx::ldmatrix_x4<true>(vb",
        "ptx::ldmatrix_x4<false>(vb",
        FIRST,
    ),
    "no barrier before the next K / V copy": (
        "block_attention",
        "    __syncthreads();  // every warp is done with this buffer",
        "    // no barrier",
        (*FIRST, "--schedule", "3", "--copies-at-issue", "1"),
    ),
    "reads the tile before its copy landed": (
        "block_attention",
        "ptx::cp_async_wait<1>();  // all but",
        "ptx::cp_async_wait<2>();  // all but",
        (*FIRST, "--copies-at-issue", "0"),
    ),
    "metadata of the wrong block": ("sparse24_mm", "const int r = t ^ b;", "const int r = b;", FIRST),
    "armor_linear's wrap_out block misplaced": (
        "sparse24_mm",
        "store_wrapped<Tr>(p, wrap, z + (row - within) * cols + col,",
        "store_wrapped<Tr>(p, wrap, z + row * cols + col,",
        FIRST,
    ),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_defective_kernel_fails(defect):
    suite, old, new, options = DEFECTS[defect]
    code, report = run_cuda_emulation(suite, 0, 2, (old, new), options=options)
    assert code == 1 and " 0 failed" not in report, report
