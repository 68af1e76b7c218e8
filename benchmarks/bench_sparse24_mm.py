"""sparse24_mm beside the dense product on the same (decompressed) weight, a read of the dense weight and,
on GPU, PyTorch's semi-structured sparse tensor. TFLOP/s count the dense-equivalent 2*M*N*K."""

import torch
import torch.nn.functional as F

import dllm_kernels
from dllm_kernels.bench import Case, call_case
from dllm_kernels.ops.sparse24 import dispatchers
from dllm_kernels.reference import sparse24 as reference


def torch_semi_structured(dense):
    """PyTorch's own 2:4 path (cuSPARSELt or CUTLASS), or None where this GPU / build has none."""
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(dense)
    except (RuntimeError, ValueError, NotImplementedError):
        return None


def make_case(device, m, n, k, dtype):
    weight = torch.randn(n, k, device=device).to(dtype)
    mask = dllm_kernels.prune_24(weight)
    values, meta = dllm_kernels.compress_24(weight, mask)
    dense = weight * mask
    x = torch.randn(m, k, device=device).to(dtype)
    ref = reference.sparse24_mm(x, values, meta)

    def check(out):
        torch.testing.assert_close(
            out.float(), ref.float(), rtol=2e-2, atol=5e-2 if dtype != torch.float32 else 1e-3
        )

    element = x.element_size()
    baselines = {
        "dense F.linear": lambda: F.linear(x, dense),
        "read dense weight": dense.sum,
    }
    baseline_bytes = {
        "read dense weight": n * k * element,
        "dense F.linear": (n * k + m * k + m * n) * element,
    }
    if device.type == "cuda":
        semi = torch_semi_structured(dense)
        if semi is not None:
            baselines["torch semi-structured"] = lambda: F.linear(x, semi)
    return Case(
        op="sparse24_mm",
        label=f"M={m} N={n} K={k} {str(dtype).removeprefix('torch.')}",
        run=lambda: dllm_kernels.sparse24_mm(x, values, meta),
        check=check,
        bytes=(n * k // 2 + m * k + m * n) * element + n * k // 16 * 2,
        flops=2 * m * n * k,
        backends=[
            b
            for b in dispatchers["sparse24_mm"].backends_for(device, x, values, meta, None)
            if b != "reference"
        ],
        baselines=baselines,
        baseline_bytes=baseline_bytes,
        baseline_flops={"read dense weight": None},
    )


def make_armor_case(device, m, n, k, block, dtype):
    """armor_linear beside ARMOR's own three torch products and the dense product alone."""
    weight = torch.randn(n, k, device=device).to(dtype)
    values, meta = dllm_kernels.compress_24(weight)
    dense = dllm_kernels.decompress_24(values, meta)
    eye = torch.eye(block, device=device)
    wrap_in = (eye + 0.1 * torch.randn(k // block, block, block, device=device)).to(dtype)
    wrap_out = (eye + 0.1 * torch.randn(n // block, block, block, device=device)).to(dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    args = (x, wrap_in, values, meta, wrap_out)
    ref = reference.armor_linear(*args)

    def check(out):
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=5e-2)

    def three_products():  # blocks applied as batched products: [G, bs, bs] x [G, bs, M]
        inner = torch.bmm(wrap_in, x.T.reshape(k // block, block, m)).reshape(k, m).T
        return torch.bmm(wrap_out, F.linear(inner, dense).T.reshape(n // block, block, m)).reshape(n, m).T

    element = x.element_size()
    return Case(
        op="armor_linear",
        label=f"M={m} N={n} K={k} blocks {block} {str(dtype).removeprefix('torch.')}",
        run=lambda: dllm_kernels.armor_linear(*args),
        check=check,
        bytes=(n * k // 2 + (n + k) * block + m * k + m * n) * element + n * k // 16 * 2,
        flops=2 * m * n * k,
        backends=[b for b in dispatchers["armor_linear"].backends_for(device, *args) if b != "reference"],
        baselines={"3 torch products": three_products, "dense F.linear": lambda: F.linear(x, dense)},
        baseline_bytes={"dense F.linear": (n * k + m * k + m * n) * element},
    )


def cases(device, quick):
    if device.type == "cuda":
        shapes = [(m, n, 4096) for n in (4096, 11008) for m in (1, 16, 64, 2048)]
        if quick:
            shapes = [(1, 4096, 4096), (2048, 4096, 4096)]
        out = [make_case(device, m, n, k, torch.bfloat16) for m, n, k in shapes]
        armor = [(1, 4096, 4096)] if quick else [(1, 4096, 4096), (16, 4096, 4096), (1, 11008, 4096)]
        return out + [make_armor_case(device, m, n, k, 64, torch.bfloat16) for m, n, k in armor]
    out = [make_case(device, 1, 4096, 4096, torch.float32), make_case(device, 1, 4096, 4096, torch.bfloat16)]
    if not quick:
        out.append(make_case(device, 16, 4096, 4096, torch.float32))
        out.append(make_case(device, 16, 4096, 4096, torch.bfloat16))
    weight = torch.randn(32, 64)
    values, meta = dllm_kernels.compress_24(weight)
    dense, x = dllm_kernels.decompress_24(values, meta), torch.randn(1, 64)
    out.append(
        call_case(
            "sparse24_mm",
            "tiny call M=1 N=32 K=64 fp32",
            lambda: dllm_kernels.sparse24_mm(x, values, meta),
            {"F.linear": lambda: F.linear(x, dense)},
            (32 * 32 + 64 + 32) * 4,
        )
    )
    wrap_in, wrap_out = torch.randn(2, 32, 32), torch.randn(1, 32, 32)
    three_products = lambda: torch.bmm(  # ARMOR's own statement: three products
        wrap_out, F.linear(torch.bmm(wrap_in, x.view(2, 32, 1)).view(1, 64), dense).view(1, 32, 1)
    )
    out.append(
        call_case(
            "armor_linear",
            "tiny call M=1 N=32 K=64 fp32",
            lambda: dllm_kernels.armor_linear(x, wrap_in, values, meta, wrap_out),
            {"3 torch products": three_products},
            (2 * 32 * 32 + 32 * 32 + 32 * 32 + 64 + 32) * 4,
        )
    )
    return out
