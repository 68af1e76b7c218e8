"""credit_confidence beside the step dInfer's CreditThresholdParallelDecoder runs in plain PyTorch (a dense
fp32 credit [B, L, V]: decay, fp32 softmax, scatter_add, fused = l + alpha * log(C + 1), argmax, softmax
gather), with the bytes each keeps for the credit; and a tiny call beside torch.softmax."""

import torch

import dllm_kernels
from dllm_kernels.bench import Case, call_case
from dllm_kernels.ops.credit_confidence import dispatcher
from dllm_kernels.reference.credit_confidence import credit_confidence as reference

ALPHA, BETA, GAMMA = 0.7, 0.8, 0.2
SLOTS = 8


def upstream_step(logits, eligible, credit):
    """dInfer's step on its dense fp32 credit (updated in place), for the masked positions."""
    credit.mul_(BETA)
    p = torch.softmax(logits.float(), -1)
    pmax, raw = p.max(-1)
    credit.scatter_add_(-1, raw[..., None], torch.where(eligible, pmax**GAMMA, 0.0)[..., None])
    fused = logits.float() + ALPHA * torch.log(credit + 1)
    token = fused.argmax(-1)
    score = torch.softmax(fused, -1).gather(-1, token[..., None])[..., 0]
    return torch.where(eligible, token, -1), torch.where(eligible, score, -torch.inf)


def make_case(device, shape, dtype, eligible_fraction):
    logits = torch.randn(shape, device=device).mul_(3).to(dtype)
    eligible = torch.rand(shape[:-1], device=device) < eligible_fraction
    n_rows, n_eligible, vocab = eligible.numel(), int(eligible.sum()), shape[-1]
    initial = dllm_kernels.credit_state(shape[:-1], SLOTS, device)
    # A state a few steps into a block: half the slots credited.
    initial[0][..., : SLOTS // 2] = torch.randint(0, vocab, (*shape[:-1], SLOTS // 2), device=device)
    initial[1][..., : SLOTS // 2] = torch.rand(*shape[:-1], SLOTS // 2, device=device)
    state = [t.clone() for t in initial]
    dense = torch.zeros(shape, device=device)

    def check(_):
        """From the initial state, one call against the reference (timing keeps updating the state)."""
        for t, t0 in zip(state, initial, strict=True):
            t.copy_(t0)
        token, score = dllm_kernels.credit_confidence(logits, eligible, *state)
        ref_state = [t.clone() for t in initial]
        ref_token, ref_score = reference(logits, eligible, *ref_state)
        assert torch.equal(token, ref_token), "tokens differ from the reference"
        torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert torch.equal(state[0], ref_state[0]), "credit tokens differ from the reference"
        torch.testing.assert_close(state[1], ref_state[1], rtol=1e-5, atol=1e-5)

    dense_bytes, slot_bytes = n_rows * vocab * 4, n_rows * SLOTS * 12
    read = n_eligible * vocab * logits.element_size()
    return Case(
        op="credit_confidence",
        label=(
            f"{list(shape)} {str(dtype).removeprefix('torch.')} {eligible_fraction:.0%} eligible, S={SLOTS}; "
            f"credit state: dense {dense_bytes / 2**20:.0f} MiB vs slots {slot_bytes / 2**10:.0f} KiB"
        ),
        run=lambda: dllm_kernels.credit_confidence(logits, eligible, *state),
        check=check,
        bytes=read + n_rows * (1 + 2 * SLOTS * 12 + 8 + 4),
        backends=[b for b in dispatcher.backends_for(device, logits) if b != "reference"],
        baselines={"upstream dense fp32": lambda: upstream_step(logits, eligible, dense)},
        # every row read; the dense credit read and written by the decay, read again by the fused logits
        baseline_bytes={"upstream dense fp32": n_rows * vocab * logits.element_size() + 3 * dense_bytes},
    )


def cases(device, quick):
    out = [make_case(device, (8, 32, 126464), torch.bfloat16, 0.5)]
    if device.type == "cpu":
        tiny = torch.randn(1, 8, 64)
        eligible = torch.ones(1, 8, dtype=torch.bool)
        state = dllm_kernels.credit_state((1, 8), SLOTS)
        out.append(
            call_case(
                "credit_confidence",
                "tiny call [1, 8, 64] fp32, alpha=0 (the credit leaves (token, score) alone)",
                lambda: dllm_kernels.credit_confidence(tiny, eligible, *state, alpha=0.0),
                {"torch.softmax": lambda: torch.softmax(tiny, -1)},
                tiny.numel() * 4 + 8 * (1 + 2 * SLOTS * 12 + 12),
            )
        )
    return out
