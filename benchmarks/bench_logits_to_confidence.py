"""logits_to_confidence beside what frameworks run today (LLaDA / Fast-dLLM's fp64 softmax of everything, the
best eager fp32 statement), a plain reduction over the same bytes, and a tiny call beside torch.softmax."""

import torch

import dllm_kernels
from dllm_kernels.bench import Case, call_case
from dllm_kernels.ops.logits_to_confidence import dispatcher
from dllm_kernels.reference.logits_to_confidence import logits_to_confidence as reference


def llada_path(logits, eligible):
    """LLaDA / Fast-dLLM generate.py at temperature 0: argmax, fp64 softmax of everything, gather."""
    x0 = torch.argmax(logits, dim=-1)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    confidence = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, torch.where(eligible, confidence, -torch.inf)


def llada_gumbel_path(logits, eligible, temperature):
    """LLaDA's add_gumbel_noise (fp64) then the same confidence."""
    x = logits.to(torch.float64)
    noise = torch.rand_like(x)
    x0 = torch.argmax(x.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    confidence = torch.gather(torch.softmax(x, dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, torch.where(eligible, confidence, -torch.inf)


def eager_masked(logits, eligible):
    """The best plain eager statement: eligible rows only, fp32 max and logsumexp."""
    rows = logits[eligible].float()
    top, token = rows.max(-1)
    token_out = torch.full(eligible.shape, -1, dtype=torch.int64, device=logits.device)
    score_out = torch.full(eligible.shape, -torch.inf, device=logits.device)
    token_out[eligible] = token
    score_out[eligible] = torch.exp(top - torch.logsumexp(rows, -1))
    return token_out, score_out


def peaked_logits(shape, device):
    """Logits shaped like a language model's: a bulk around 0 with a heavy upper tail (a few dozen tokens
    10-25 above the bulk), instead of flat Gaussian noise."""
    logits = torch.randn(shape, device=device) * 2.5
    top = torch.rand(*shape[:-1], 32, device=device)
    columns = torch.randint(0, shape[-1], (*shape[:-1], 32), device=device)
    return logits.scatter_(-1, columns, 10 + 15 * top)


def make_case(
    device, shape, dtype, eligible_fraction, temperature=0.0, compiled_reference=False, peaked=False
):
    logits = peaked_logits(shape, device) if peaked else torch.randn(shape, device=device).mul_(3)
    logits = logits.to(dtype)
    eligible = torch.rand(shape[:-1], device=device) < eligible_fraction
    n_eligible = int(eligible.sum())  # the benchmark's set-up may sync; the op never does
    row_bytes = shape[-1] * logits.element_size()
    kwargs = dict(temperature=temperature, seed=7, offset=1)
    ref_token, ref_score = reference(logits, eligible, **kwargs)

    def check(out):
        token, score = out
        agree = (token == ref_token).float().mean().item()
        assert agree >= (0.999 if temperature > 0 else 1.0), f"tokens agree on {agree:.4%} of rows"
        same = token == ref_token
        torch.testing.assert_close(score[same], ref_score[same], rtol=1e-5, atol=1e-5, equal_nan=True)

    read = logits.view(-1)[: n_eligible * shape[-1]]
    baselines = {}
    if temperature > 0:
        baselines["llada gumbel fp64"] = lambda: llada_gumbel_path(logits, eligible, temperature)
    else:
        baselines["llada fp64"] = lambda: llada_path(logits, eligible)
        baselines["eager fp32 masked"] = lambda: eager_masked(logits, eligible)
    if compiled_reference:
        compiled = torch.compile(reference)
        baselines["compiled reference"] = lambda: compiled(logits, eligible, **kwargs)
    baselines["torch.sum same bytes"] = read.sum
    baseline_bytes = {}
    if device.type == "cuda":
        dst = torch.empty_like(read)
        baselines["copy same bytes"] = lambda: dst.copy_(read)
        baseline_bytes["copy same bytes"] = 2 * read.numel() * read.element_size()
    mode = f"T={temperature}" if temperature > 0 else "argmax"
    mode += ", peaked logits" if peaked else ""
    return Case(
        op="logits_to_confidence",
        label=f"{list(shape)} {str(dtype).removeprefix('torch.')} {eligible_fraction:.0%} eligible, {mode}",
        run=lambda: dllm_kernels.logits_to_confidence(logits, eligible, **kwargs),
        check=check,
        bytes=n_eligible * row_bytes + eligible.numel() * (1 + 8 + 4),
        backends=[b for b in dispatcher.backends_for(device, logits) if b != "reference"],
        baselines=baselines,
        baseline_bytes=baseline_bytes,
    )


def cases(device, quick):
    if device.type == "cuda":
        shapes = [((8, 256, 126464), 0.5), ((1, 32, 152064), 1.0), ((2, 64, 126464), 0.5)]
        out = [
            make_case(device, s, torch.bfloat16, f, compiled_reference=True)
            for s, f in shapes[: 2 if quick else 3]
        ]
        if not quick:
            out.append(make_case(device, (8, 256, 126464), torch.bfloat16, 0.5, temperature=0.8))
        return out
    out = [make_case(device, (2, 64, 126464), torch.bfloat16, 0.5)]
    if not quick:
        out.append(make_case(device, (1, 32, 152064), torch.bfloat16, 1.0))
        out.append(make_case(device, (2, 64, 126464), torch.bfloat16, 0.5, temperature=0.8))
        out.append(make_case(device, (2, 64, 126464), torch.bfloat16, 0.5, temperature=0.8, peaked=True))
    tiny = torch.randn(1, 8, 64)
    out.append(
        call_case(
            "logits_to_confidence",
            "tiny call [1, 8, 64] fp32",
            lambda: dllm_kernels.logits_to_confidence(tiny),
            {
                "torch.softmax": lambda: torch.softmax(tiny, -1),
                "torch.ops.aten._softmax": lambda: torch.ops.aten._softmax.default(tiny, -1, False),
            },
            tiny.numel() * 4 + 8 * 12,
        )
    )
    return out
