"""The newer decode_step recipes beside their upstream PyTorch steps (tests/upstream_rules.py, the test
oracles: per-row loops, fp64 / dense state as released) on one block of LLaDA's vocabulary, bf16."""

import importlib.util

import torch

import dllm_kernels
from dllm_kernels import decode
from dllm_kernels.bench import ROOT, Case
from dllm_kernels.ops.credit_confidence import dispatcher as credit_dispatcher
from dllm_kernels.ops.logits_to_confidence import dispatcher as confidence_dispatcher
from dllm_kernels.ops.select_unmask import dispatcher as select_dispatcher

_spec = importlib.util.spec_from_file_location("upstream_rules", ROOT / "tests" / "upstream_rules.py")
upstream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upstream)

MASK = 126336


def block_problem(device, shape):
    """Logits shaped like a language model's (a bulk plus a few dozen high tokens, some positions sure of
    themselves), a 32-token block with 60% still masked, the rest decoded, a 4-token prompt."""
    n_rows, length, vocab = shape
    logits = torch.randn(shape, device=device) * 2.5
    peaks = 10 + 15 * torch.rand(n_rows, length, 32, device=device)
    logits.scatter_(-1, torch.randint(0, vocab, (n_rows, length, 32), device=device), peaks)
    logits = logits.to(torch.bfloat16)
    x = torch.randint(0, 126000, (n_rows, length), device=device)
    x[torch.rand(n_rows, length, device=device) < 0.6] = MASK
    prompt = torch.zeros(n_rows, length, dtype=torch.bool, device=device)
    prompt[:, :4] = True
    x[prompt & (x == MASK)] = 7
    return logits, x, prompt


def _rows(fn):
    """An upstream per-row step over a batch, as the framework runs it (its loop over rows or requests)."""

    def run(logits, x, *per_row):
        for b in range(x.shape[0]):
            fn(logits[b], x[b], *(t[b] for t in per_row))

    return run


def make_case(device, shape, recipe, options, baseline, label, backends_of=confidence_dispatcher):
    logits, x, prompt = block_problem(device, shape)
    eligible = x == MASK
    fresh = options(x, prompt)  # the state before the step; each call starts from a copy of it

    def library():
        state = {name: _copied(value) for name, value in fresh.items()}
        return dllm_kernels.decode_step(logits, x.clone(), eligible, recipe=recipe, **state)

    with dllm_kernels.use_backend("reference"):
        want = library()

    def check(out):
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1]), f"{recipe}: tokens differ"

    backends = [
        b
        for b in backends_of.backends_for(device, logits)
        if b != "reference" and b in select_dispatcher.backends_for(device, torch.zeros(1, 1, device=device))
    ]
    upstream_x = x.clone()
    return Case(
        op="decode_step",
        label=label,
        run=library,
        check=check,
        bytes=logits.numel() * logits.element_size() + x.numel() * 8 * 2,
        backends=backends,
        baselines={
            f"upstream {recipe} step": lambda: baseline(logits, upstream_x.copy_(x), eligible, prompt)
        },
        cuda_graph=device.type == "cuda",
    )


def _copied(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(v.clone() for v in value)
    if isinstance(value, decode.CCDState):
        return decode.CCDState(*(v.clone() for v in vars(value).values()))
    return value


def _every_third_mask(x):
    return (x == MASK) & (torch.arange(x.shape[1], device=x.device) % 3 == 0)


def ccd_midway(x, prompt):
    """CCD two steps after its warm-up: n_v 3, every third position buffered where masked."""
    state = decode.ccd_state(x)
    state.step.fill_(6)
    state.buffer_size.fill_(3)
    state.previous_token.copy_(torch.where(x == MASK, 0, x))
    state.buffer.copy_(_every_third_mask(x))
    return dict(k=torch.full((x.shape[0],), 1, device=x.device), state=state, gen_length=x.shape[1], steps=32)


def ccd_upstream(logits, x, eligible, prompt):
    """The batch-1 CCD loop of every row, each from the same midway state as the library's."""
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    for b in range(x.shape[0]):
        loop = upstream.CCD(steps=32, gen_length=x.shape[1])
        loop.i, loop.buffer_size = 6, 3
        loop.previous = torch.where(x[b] == MASK, 0, x[b])
        loop.buffer = _every_third_mask(x[b : b + 1])[0].nonzero().flatten()
        loop.step(shifted[b], x[b], MASK, 1)


def cases(device, quick):
    shape = (8, 32, 126464)
    n_rows, length, vocab = shape
    dense = upstream.DenseCredit()
    dense_mb = n_rows * length * vocab * 4 / 2**20
    slots_kb = n_rows * length * 8 * 12 / 2**10
    recipes = {
        "local_leap": (
            lambda x, prompt: {},
            _rows(
                lambda logits, x, eligible, prompt: upstream.local_leap_row(logits, x, eligible, 0.9, 0.75, 4)
            ),
            "local_leap [8, 32, 126464] bf16",
        ),
        "hierarchy": (
            lambda x, prompt: {},
            lambda logits, x, eligible, prompt: [
                upstream.hierarchy_step(logits[b : b + 1], x[b : b + 1], MASK, None, 0.4)
                for b in range(n_rows)
            ],
            "hierarchy [8, 32, 126464] bf16",
        ),
        "credit": (
            lambda x, prompt: dict(credit=dllm_kernels.credit_state(x.shape, device=x.device), mask_id=MASK),
            lambda logits, x, eligible, prompt: dense.step(logits, x, MASK, 0.9),
            f"credit [8, 32, 126464] bf16, state {slots_kb:.0f} KiB vs dense {dense_mb:.0f} MiB",
        ),
        "joint_threshold": (
            lambda x, prompt: dict(editable=(x != MASK) & ~prompt),
            _rows(
                lambda logits, x, eligible, prompt: upstream.joint_threshold_row(
                    logits, x, prompt, MASK, 0.5, 0.0
                )
            ),
            "joint_threshold [8, 32, 126464] bf16",
        ),
        "ccd": (ccd_midway, ccd_upstream, "ccd [8, 32, 126464] bf16, verifying"),
    }
    if quick:
        recipes = {name: recipes[name] for name in ("credit", "local_leap")}
    return [
        make_case(
            device,
            shape,
            recipe,
            options,
            baseline,
            label,
            credit_dispatcher if recipe == "credit" else confidence_dispatcher,
        )
        for recipe, (options, baseline, label) in recipes.items()
    ]
