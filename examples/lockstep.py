"""Runs the framework loop and the library loop of ``block_diffusion`` side by side and says whether they
generate the same tokens, step by step.

The two loops compute the same function in a different float order: ``block_attention`` sums a row over
exactly its keys, SDPA over the padded row with the padding masked out, so logits differ by float
rounding (about 1e-6 relative, measured with ragged prompts). A decision whose margin is smaller than
that can go either way: an argmax whose top two logits are that close, a probability that close to the
threshold, or two probabilities that close at the top-k boundary. So does a probability that fp32
(the library's) rounds to 1.0 where fp64 (the framework's) still tells two positions apart. The
comparison records the framework's margins at every step, per row; where the loops differ in a row whose
margin was below ``tie_margin``, the library is handed the framework's tokens and goes on (a counted
tie); a difference in any other row fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import block_diffusion as bd
import torch
import torch.nn.functional as F

# (logits, probabilities): a few times the largest differences measured between the two loops on the
# test models and the default one (3e-4 in logits of spread 24, 4e-5 in probabilities).
TIE_MARGIN = (1e-3, 1e-4)


@dataclass
class Comparison:
    framework: torch.Tensor
    library: torch.Tensor
    framework_steps: int
    library_steps: int
    ties: list[int] = field(default_factory=list)  # framework steps where a near tie went another way

    @property
    def same(self) -> bool:
        return torch.equal(self.framework, self.library) and self.framework_steps == self.library_steps


def margins(logits, mask_index, num_transfer_tokens, threshold, transfer_index) -> list[tuple[float, float]]:
    """Per row, (logit margin, probability margin) of one step: how far its decisions were from a tie.
    ``logits`` are those of ``mask_index``'s positions; ``threshold`` None: the ``num_transfer_tokens``
    best are taken, else every one at the threshold and always the best."""
    top2 = logits.float().topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    confidence = F.softmax(logits.to(torch.float64), dim=-1).max(-1).values
    out = []
    for row in range(confidence.shape[0]):
        committed = transfer_index[row] & mask_index[row]
        logit_margin = gaps[row][committed].min().item() if committed.any() else math.inf
        ranked = confidence[row][mask_index[row]].sort(descending=True).values.tolist()
        if threshold is not None:  # the best is taken anyway; the others by the threshold
            near = [abs(c - threshold) for c in ranked[1:]]
            if len(ranked) > 1 and ranked[0] < threshold:  # which one is the best matters
                near.append(ranked[0] - ranked[1])
        else:
            k = int(num_transfer_tokens[row])
            near = [ranked[k - 1] - ranked[k]] if 0 < k < len(ranked) else []
        out.append((logit_margin, min(near, default=math.inf)))
    return out


def near_tie(row_margins, tie_margin=TIE_MARGIN) -> bool:
    return row_margins[0] < tie_margin[0] or row_margins[1] < tie_margin[1]


def compare(model, prompt, attention_mask, *, framework: dict, library: dict, tie_margin=TIE_MARGIN):
    """Runs ``framework_generate(**framework)`` and ``library_generate(**library)`` (the common arguments
    in both) and compares every step; raises ``AssertionError`` at a difference no near tie explains."""
    step_margins, states = [], []
    upstream = bd.get_transfer_index

    def recorded(logits, temperature, mask_index, x, num_transfer_tokens, threshold=None):
        x0, transfer_index = upstream(logits, temperature, mask_index, x, num_transfer_tokens, threshold)
        step_margins.append(margins(logits, mask_index, num_transfer_tokens, threshold, transfer_index))
        return x0, transfer_index

    bd.get_transfer_index = recorded
    try:
        x_framework = bd.framework_generate(
            model,
            prompt,
            attention_mask,
            on_step=lambda x: states.append(x.clone()),
            **framework,
        )
    finally:
        bd.get_transfer_index = upstream

    ties = []
    library_steps = 0
    previous = None

    def check(generation):
        nonlocal library_steps, previous
        tokens = generation.tokens()
        if tokens.is_cuda and previous is not None and torch.equal(tokens, previous):
            return  # the step a threshold recipe runs before the host knows its block is complete
        step, library_steps = library_steps, library_steps + 1
        assert step < len(states), f"the library loop runs more steps than the framework's {len(states)}"
        if not torch.equal(tokens, states[step]):
            rows = (tokens != states[step]).any(1).nonzero().flatten().tolist()
            wide = [row for row in rows if not near_tie(step_margins[step][row], tie_margin)]
            assert not wide, (
                f"step {step}: the loops differ in rows {rows}; the framework's decisions in rows {wide} "
                f"were {[step_margins[step][row] for row in wide]} (logits, probabilities) from a tie"
            )
            ties.append(step)
            generation.set_tokens(states[step])
            tokens = states[step]
        previous = tokens

    x_library = bd.library_generate(model, prompt, attention_mask, on_step=check, **library)
    return Comparison(x_framework, x_library, len(states), library_steps, ties)
