"""How many positions each framework unmasks per step, per row, as device tensors (no host sync)."""

import torch


def llada_transfer_counts(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens`` for one block: ``[B]`` masked counts -> ``[B, steps]``.

    Every step gets ``m // steps``; the first ``m % steps`` steps get one more, so a row's counts add up
    to its ``m``. Fast-dLLM and SDAR (with ``m`` = the block length) use the same schedule.
    """
    if steps < 1:
        raise ValueError(f"dllm::llada_transfer_counts: steps must be >= 1; got {steps}")
    m = mask_count.to(torch.int64)
    base, remainder = m // steps, m % steps
    step = torch.arange(steps, device=m.device)
    return base[:, None] + (step[None, :] < remainder[:, None]).to(torch.int64)


def dream_transfer_count(mask_count: torch.Tensor, step: int, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Dream's count at ``step`` (0-based) of ``steps``, per row: ``int(m * (1 - s / t))`` with
    ``t, s`` consecutive points of ``linspace(1, eps, steps + 1)`` (fp32, as Dream computes them), and
    every remaining position at the last step. ``mask_count`` is each row's current masked count
    (Dream itself uses the batch average, which over- or under-counts rows that differ).
    """
    if not 0 <= step < steps:
        raise ValueError(f"dllm::dream_transfer_count: step must be in [0, {steps}); got {step}")
    m = mask_count.to(torch.int64)
    if step == steps - 1:
        return m
    timesteps = torch.linspace(1, eps, steps + 1, device=m.device)
    t, s = timesteps[step], timesteps[step + 1]
    return (m.to(torch.float32) * (1 - s / t)).to(torch.int64)
