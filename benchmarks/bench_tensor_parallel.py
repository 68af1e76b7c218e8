"""Tensor-parallel logits_to_confidence (dllm_kernels.distributed) on a local gloo world of 2 ranks, beside
gather-then-decide: all-gather the vocabulary shards of the logits, then the single-device op, as the
frameworks do today. Each rank runs on one thread; a step is timed from a barrier to its end on every rank.
Its file name sorts last, so that the load of its ranks falls on no other benchmark.
The label gives the bytes a rank receives from the collectives of one step, for both."""

import statistics
import time

import torch
import torch.distributed as dist

import dllm_kernels
from dllm_kernels import _local_world, distributed, use_backend
from dllm_kernels.bench import Case

OP = "distributed.logits_to_confidence"
WORLD = 2
SHAPES = ((2, 32, 126464), (32, 32, 152064))
HEADER_BYTES = 7 * 8  # the header every call all-gathers (dllm_kernels.distributed)
STATE_BYTES = 8 * 8  # a row's state
BASELINE = "gather-then-decide"


def rank_steps(rank, world, shape, seed, min_seconds):
    """On every rank: both steps checked against the single-device op on the whole logits, then timed;
    returns this rank's median ms of each."""
    full = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).bfloat16()
    width = shape[-1] // world
    start = rank * width
    shard = full[..., start : start + width].clone()  # the rank's own LM-head output
    with use_backend("cpu"):
        expected = dllm_kernels.logits_to_confidence(full)
    del full

    def tensor_parallel():
        with use_backend("cpu"):
            return distributed.logits_to_confidence(shard, vocab_start=start)

    def gather_then_decide():
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)
        with use_backend("cpu"):
            return dllm_kernels.logits_to_confidence(torch.cat(parts, -1))

    times = {}
    for name, step in (("cpu", tensor_parallel), (BASELINE, gather_then_decide)):
        token, score = step()
        assert torch.equal(token, expected[0]), f"{name}: tokens differ from the single-device op"
        torch.testing.assert_close(score, expected[1], rtol=1e-5, atol=1e-6)
        dist.barrier()
        first = time.perf_counter()
        step()
        # Every rank must run the same number of steps: the slowest rank's first step sets it.
        first_ms = torch.tensor([time.perf_counter() - first])
        dist.all_reduce(first_ms, op=dist.ReduceOp.MAX)
        reps = int(min(100, max(5, min_seconds / float(first_ms))))
        samples = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
        times[name] = statistics.median(samples)
    return times


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cases(device, quick):
    if device.type != "cpu":  # on GPUs: nccl across several devices, which one machine here does not have
        return []
    out = []
    for i, shape in enumerate(SHAPES[:1] if quick else SHAPES):
        rows = shape[0] * shape[1]
        width = shape[-1] // WORLD
        received_tp = (WORLD - 1) * (HEADER_BYTES + rows * STATE_BYTES)
        received_gather = (WORLD - 1) * rows * width * 2
        label = (
            f"[{shape[0]},{shape[1]},{shape[2]}] bf16, {WORLD} gloo ranks, argmax: receives "
            f"{_size(received_tp)} vs {_size(received_gather)} a rank "
            f"({received_gather / received_tp:.0f}x fewer)"
        )

        def timed(min_seconds, shape=shape, seed=i):
            per_rank = _local_world.run(rank_steps, WORLD, shape, seed, min_seconds, timeout=600)
            return {name: max(r[name] for r in per_rank) for name in per_rank[0]}

        out.append(
            Case(
                OP,
                label,
                run=None,
                check=None,
                bytes=rows * width * 2,  # the shard, read once
                backends=["cpu"],
                baselines={BASELINE: None},
                baseline_bytes={BASELINE: rows * shape[-1] * 2},  # the whole logits, read after the gather
                timed=timed,
            )
        )
    return out
