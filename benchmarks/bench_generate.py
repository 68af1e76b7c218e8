"""A whole generation (examples/block_diffusion.py): the library loop beside the framework loop.

Fast-dLLM's threshold decoding (0.9) of 64 tokens in two 32-token blocks after ragged prompts of 16-32
tokens, on the example's LLaDA-shaped model (126464-token vocabulary, 4 layers, hidden 256, fp32), with
no cache, the prefix cache and the dual cache, at batch 1 and 8. Each case first runs the two loops side by
side (examples/lockstep.py: the same tokens after every step), then times each loop alone (the library's
as one LibraryGeneration reused, as a server would: on CUDA it replays the step's CUDA graphs). Columns: a
whole generation's median ms, tokens/s, steps, ms a step, and a step's split between the model's forward
and the decode step (selection and commit; the framework's includes its fp64 softmax), from one more run
with a clock around each phase. GB/s counts the weights a step reads (not the embedding table).
"""

import statistics
import sys
import time
from functools import cache
from pathlib import Path

import torch

from dllm_kernels.bench import Case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import block_diffusion as bd
import lockstep

OP = "generate"
BASELINE = "framework loop"
GEN, BLOCK, THRESHOLD = 64, 32, 0.9


@cache
def _model(device: str):
    return bd.TinyDLM(seed=0, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(run, device, min_seconds):
    """Median seconds of whole generations (at least one, at most 5) and the steps of one."""
    samples = []
    budget = time.perf_counter() + min_seconds
    while not samples or (time.perf_counter() < budget and len(samples) < 5):
        stats = bd.Stats()
        _sync(device)
        start = time.perf_counter()
        run(stats)
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), stats.steps


def cases(device, quick):
    out = []
    for cache_scheme in ("dual",) if quick else bd.CACHES:
        for batch in (1, 8):
            label = f"B={batch}, {cache_scheme} cache, fast_dllm 0.9, {GEN} tokens in {BLOCK}-token blocks"
            case = Case(
                OP, label, run=None, check=None, bytes=0, backends=["auto"], baselines={BASELINE: None}
            )
            case.timed = lambda min_seconds, case=case, cache_scheme=cache_scheme, batch=batch: _timed(
                case, device, cache_scheme, batch, min_seconds
            )
            out.append(case)
    return out


def _timed(case, device, cache_scheme, batch, min_seconds):
    model = _model(str(device))
    lengths = torch.randint(16, 33, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    prompt, attention_mask = bd.make_prompts(model.config, lengths, torch.Generator().manual_seed(1), device)
    common = dict(gen_length=GEN, block_length=BLOCK, cache=cache_scheme)
    framework = dict(common, threshold=THRESHOLD)
    library = dict(common, recipe="fast_dllm", threshold=THRESHOLD)
    comparison = lockstep.compare(model, prompt, attention_mask, framework=framework, library=library)
    assert comparison.same, "the library loop generates other tokens than the framework loop"
    # One generation object for every timed run, as a server keeps one per batch shape: on CUDA its graphs
    # are captured in the first run and replayed after. The split needs eager steps (a sync per phase).
    generation = bd.LibraryGeneration(model, *prompt.shape, **library)
    eager = (
        generation
        if device.type == "cpu"
        else bd.LibraryGeneration(model, *prompt.shape, cuda_graph=False, **library)
    )
    generation.generate(prompt, attention_mask)
    loops = {
        "auto": (
            lambda stats: generation.generate(prompt, attention_mask, stats=stats),
            lambda stats: eager.generate(prompt, attention_mask, stats=stats),
        ),
        BASELINE: (
            lambda stats: bd.framework_generate(model, prompt, attention_mask, stats=stats, **framework),
        )
        * 2,
    }
    # GB/s: the weights each step reads (the embedding table only a few rows of)
    weight_bytes = sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if name != "embed.weight"
    )
    times = {}
    for name, (run, run_split) in loops.items():
        seconds, steps = _time(run, device, min_seconds)
        split = bd.Stats(timed=True)
        run_split(split)
        phases = split.forward_s + split.decode_s
        times[name] = (
            seconds * 1e3,
            {
                "tokens/s": batch * GEN / seconds,
                "steps": steps,
                "ms/step": seconds * 1e3 / steps,
                "forward ms/step": split.forward_s * 1e3 / split.steps,
                "decode ms/step": split.decode_s * 1e3 / split.steps,
                "decode %": 100 * split.decode_s / phases,
            },
        )
        if name == BASELINE:
            case.baseline_bytes[BASELINE] = weight_bytes * steps
        else:
            case.bytes = weight_bytes * steps  # the steps are known once the loop has run
    return times
