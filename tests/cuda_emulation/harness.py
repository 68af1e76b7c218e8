"""Runs a CUDA kernel file of csrc/cuda on the host (include/emulator.h) and compares it with the reference.

    python tests/cuda_emulation/harness.py SUITE --seed N [--part I --parts P]

SUITE is a module next to this file (sparse24_mm, block_attention) that names its kernel file, its
parameter struct, and yields cases; each case runs under a schedule drawn for it (fiber order, SM count,
when cp.async lands) and must match the reference. The kernel source is compiled as it is: only
csrc/cuda/ptx.cuh is swapped for include/cuda/ptx.cuh, whose recorded fingerprint must match, and every
``kernel<<<...>>>(args)`` becomes ``Launch(...)(kernel, args)``. Runs in its own process (tests call it
through subprocess) because a read past a guarded buffer ends the process with SIGSEGV.
"""

import argparse
import ctypes
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INCLUDE = HERE / "include"
_TEMPLATE_ARGS = r"(?:<(?:[^;<>]|<[^;<>]*>)*>)?"
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*" + _TEMPLATE_ARGS + r")<<<(.*?)>>>\(", re.S)
_FINGERPRINT = re.compile(r"emulates csrc/cuda/ptx\.cuh sha256 ([0-9a-f]{64})")
_FLAGS = ["-std=c++20", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror"]


def check_fingerprint(real: Path = ROOT / "csrc" / "cuda" / "ptx.cuh"):
    """The emulated ptx.cuh must describe the real one: a change to the real wrappers fails here."""
    recorded = _FINGERPRINT.search((INCLUDE / "cuda" / "ptx.cuh").read_text()).group(1)
    actual = hashlib.sha256(real.read_bytes()).hexdigest()
    if actual != recorded:
        raise RuntimeError(
            "csrc/cuda/ptx.cuh changed since tests/cuda_emulation/include/cuda/ptx.cuh was written: emulate "
            f"the change there and record the new fingerprint ({actual})"
        )


def emulated_source(kernel: str, params_type: str, replace=()) -> str:
    source = (ROOT / "csrc" / "cuda" / f"{kernel}.cu").read_text()
    for old, new in replace:  # a deliberate defect, for the tests that the emulation catches one
        if old not in source:
            raise RuntimeError(f"csrc/cuda/{kernel}.cu has no {old!r} to replace")
        source = source.replace(old, new)
    emulated, launches = _LAUNCH.subn(r"::dllm_emu::Launch(\2)(\1, ", source)
    if launches == 0:
        raise RuntimeError(f"csrc/cuda/{kernel}.cu: no kernel launch found to emulate")
    return (
        f'#line 1 "csrc/cuda/{kernel}.cu"\n{emulated}\n'
        f'extern "C" size_t dllm_emu_params_size() {{ return sizeof({params_type}); }}\n'
    )


def build(kernel: str, params_type: str, replace=()) -> ctypes.CDLL:
    """The emulated kernel file as a shared library (cached under build/emulation by content)."""
    check_fingerprint()
    source = emulated_source(kernel, params_type, replace)
    inputs = [source, *(p.read_text() for p in sorted(INCLUDE.rglob("*")) if p.is_file())]
    inputs += [
        (HERE / "api.cpp").read_text(),
        *(p.read_text() for p in sorted((ROOT / "csrc").rglob("*.h*"))),
    ]
    key = hashlib.sha256("\0".join([*inputs, *_FLAGS]).encode()).hexdigest()[:16]
    out_dir = ROOT / "build" / "emulation"
    library = out_dir / f"{kernel}-{key}.so"
    if not library.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        cpp = out_dir / f"{kernel}-{key}.{os.getpid()}.cpp"
        cpp.write_text(source)
        partial = library.with_suffix(f".{os.getpid()}.so")
        command = ["g++", *_FLAGS, f"-I{INCLUDE}", f"-I{ROOT / 'csrc'}", str(cpp), str(HERE / "api.cpp")]
        subprocess.run([*command, "-o", str(partial)], check=True)
        partial.rename(library)  # atomic: a concurrent build never loads a half-written library
        cpp.unlink()
    lib = ctypes.CDLL(str(library))
    lib.dllm_emu_alloc.restype = ctypes.c_void_p
    lib.dllm_emu_alloc.argtypes = [ctypes.c_size_t]
    lib.dllm_emu_free.argtypes = [ctypes.c_void_p]
    lib.dllm_emu_params_size.restype = ctypes.c_size_t
    return lib


class Memory:
    """Tensors in guarded memory (a page no one may read right after each), freed together."""

    def __init__(self, lib):
        self.lib = lib
        self.pointers = []

    def empty(self, shape, dtype) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        pointer = self.lib.dllm_emu_alloc(max(nbytes, 16))
        self.pointers.append(pointer)
        raw = (ctypes.c_uint8 * max(nbytes, 16)).from_address(pointer)
        return torch.frombuffer(raw, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def free(self):
        for pointer in self.pointers:
            self.lib.dllm_emu_free(pointer)
        self.pointers.clear()


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--first-failure", action="store_true", help="stop at the first failing case")
    parser.add_argument("--schedule", type=int, choices=range(4), help="every case under this fiber schedule")
    parser.add_argument(
        "--copies-at-issue", type=int, choices=(0, 1), help="every case with this cp.async timing"
    )
    parser.add_argument(
        "--replace",
        nargs=2,
        action="append",
        default=[],
        metavar=("OLD", "NEW"),
        help="replace text in the kernel source first (tests of the emulation itself)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location(args.suite, HERE / f"{args.suite}.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)

    lib = build(suite.KERNEL, suite.PARAMS_TYPE, args.replace)
    if lib.dllm_emu_params_size() != ctypes.sizeof(suite.Params):
        raise RuntimeError(
            f"{suite.PARAMS_TYPE}: C has {lib.dllm_emu_params_size()} bytes, the ctypes mirror "
            f"{ctypes.sizeof(suite.Params)}"
        )
    generator = torch.Generator().manual_seed(args.seed)
    cases = list(suite.cases(generator))[args.part :: args.parts]
    failures, started, ran = [], time.time(), 0
    for case in cases:
        ran += 1
        # Each case its own schedule: fiber order, SM count (the device id too, see cuda_runtime.h), and
        # whether cp.async lands at issue or at the wait.
        schedule = int(torch.randint(0, 4, (), generator=generator))
        sms = int(torch.tensor([1, 3, 8, 33, 63])[torch.randint(0, 5, (), generator=generator)])
        at_issue = int(torch.randint(0, 2, (), generator=generator))
        schedule = schedule if args.schedule is None else args.schedule
        at_issue = at_issue if args.copies_at_issue is None else args.copies_at_issue
        lib.dllm_emu_configure(sms, schedule, at_issue)
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        memory = Memory(lib)
        label = f"{case} | sms={sms} schedule={schedule} copies_at_issue={at_issue}"
        try:
            suite.run(lib, memory, case)
        except AssertionError:
            failures.append(f"{label}\n{traceback.format_exc(limit=1)}")
        finally:
            memory.free()
        if failures and args.first_failure:
            break
    print(
        f"{ran} cases of {args.suite} (seed {args.seed}, part {args.part}/{args.parts}) in "
        f"{time.time() - started:.1f} s: {len(failures)} failed"
    )
    for failure in failures[:10]:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
