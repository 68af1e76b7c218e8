"""Builds dllm_kernels and its extension dllm_kernels._C.

The extension always holds the CPU kernels (C++20, OpenMP; runtime ISA dispatch inside the
kernels, so the build runs on any x86-64 CPU). When torch was built with CUDA and nvcc is found,
it also holds the CUDA kernels and their bindings (TORCH_CUDA_ARCH_LIST honoured, default
"8.0+PTX;9.0a": the PTX lets later GPUs run the sm_80 code). A failed extension build leaves a
package that runs on the reference and Triton backends (import warns once);
DLLM_REQUIRE_EXTENSION=1 (set by the Makefile) makes it an error instead, DLLM_NO_EXTENSION=1 skips
the extension.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("DLLM_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")  # PTX: later GPUs JIT the sm_80 code
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-psabi", "-Wno-unknown-pragmas"]
    sources = _sources("csrc/cpu/*.cpp") + _sources("csrc/torch/*.cpp")
    kwargs = dict(
        name="dllm_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            sources=sources + _sources("csrc/cuda/*.cu"),
            define_macros=[("DLLM_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-warn-spills"],
            },
            **{k: v for k, v in kwargs.items() if k != "sources"},
        )
    else:
        ext = cpp_extension.CppExtension(extra_compile_args=cxx_flags, **kwargs)

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:
                if os.environ.get("DLLM_REQUIRE_EXTENSION") == "1":
                    raise
                self.warn(f"building {extension.name} failed ({e}); dllm_kernels will run without it")

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dllm_kernels",
    version="0.1.0",
    description="Fused decode-step kernels for diffusion LLMs, as torch custom ops",
    python_requires=">=3.10",
    packages=[
        "dllm_kernels",
        "dllm_kernels.ops",
        "dllm_kernels.reference",
        "dllm_kernels.triton_kernels",
    ],
    # triton_kernels/ sits at the top of the tree but is only ever imported as
    # dllm_kernels.triton_kernels (a top-level "triton_kernels" is another project's name).
    package_dir={"dllm_kernels.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "numpy"],
    extras_require={"triton": ["triton"], "bench": ["matplotlib"]},
)
