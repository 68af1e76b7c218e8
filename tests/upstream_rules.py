"""The newer decoding rules as their released code runs them, one row (or one batch-1 call) at a time.

Written from reading the authors' code (docs/recipes.md names each file), in its style: per-row loops,
dense state, Python control flow. These are the oracles of tests/test_decode_rules.py; the library's
recipes must give every row of a batch the answer these give it alone.
"""

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def greedy_confidence(logits, active, dtype=torch.float64):
    """LLaDA-style token and confidence: the argmax and its softmax probability (in ``dtype``); -inf off
    ``active``."""
    token = logits.argmax(-1)
    p = F.softmax(logits.to(dtype), dim=-1).gather(-1, token[..., None])[..., 0]
    return token, torch.where(active, p, NEG_INF)


def local_leap_row(logits, x, active, threshold, relaxed_threshold, radius):
    """LocalLeap's get_transfer_index (greedy) for one row: the ranks of the masked positions by
    confidence; rank 0 is kept, every other is dropped when below its bound, which is relaxed within
    ``radius`` positions of an anchor (a masked position at or above the threshold)."""
    token, confidence = greedy_confidence(logits, active)
    n = int(active.sum())
    if n == 0:
        return
    ranked = torch.topk(confidence, k=n).indices.tolist()
    anchors = [j for j in range(len(x)) if active[j] and confidence[j] >= threshold]
    near = {p for a in anchors for p in range(max(0, a - radius), min(len(x), a + radius + 1))}
    keep = [ranked[0]]
    for j in ranked[1:]:
        bound = relaxed_threshold if j in near else threshold
        if not confidence[j] < bound:
            keep.append(j)
    x[keep] = token[keep]


def hierarchy_step(logits, x, mask_id, threshold, low_threshold):
    """dInfer's HierarchyDecoder on a batch of 1 (it asserts B == 1): in every run of masked positions
    the positions equal to the run's best confidence, if above low_threshold; every position above the
    threshold; the row's best. Confidence in the logits' dtype."""
    assert x.shape[0] == 1
    masked = x == mask_id
    token = logits.argmax(-1)
    p = torch.log_softmax(logits, dim=-1).gather(-1, token[..., None])[..., 0].exp()
    floor = torch.finfo(p.dtype).min
    confidence = torch.where(masked, p, floor)
    starts = masked & ~F.pad(masked[:, :-1], (1, 0))
    run = torch.where(masked, starts.long().cumsum(1) - 1, 0)
    run_best = torch.full_like(confidence, floor).scatter_reduce(1, run, confidence, "amax")
    transfer = confidence == run_best.gather(1, run)
    transfer &= confidence > low_threshold
    if threshold is not None:
        transfer |= confidence > threshold
    transfer |= F.one_hot(confidence.argmax(1), x.shape[1]).bool()
    transfer &= masked
    x[transfer] = token[transfer]


def dinfer_threshold(logits, x, mask_id, threshold):
    """dInfer's ThresholdParallelDecoder rule on fp32 probabilities, per row: masked positions whose token
    is not the mask id, ``>= clamp(best - 1e-5, -1000, threshold)``."""
    masked = x == mask_id
    token = logits.argmax(-1)
    p = (logits.float().gather(-1, token[..., None])[..., 0] - torch.logsumexp(logits.float(), -1)).exp()
    confidence = torch.where(masked & (token != mask_id), p, NEG_INF)
    bound = (confidence.max(1, keepdim=True).values - 1e-5).clamp(-1000, threshold)
    transfer = (confidence >= bound) & masked
    x[transfer] = token[transfer]
    return token


class DenseCredit:
    """dInfer's CreditThresholdParallelDecoder state and step: a dense fp32 [B, L, V] credit per block."""

    def __init__(self, alpha=0.7, beta=0.8, gamma=0.2):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.credit, self.steps = None, 0

    def step(self, logits, x, mask_id, threshold):
        """One decode call on the block's logits; x (the block) is updated; returns the fused tokens."""
        masked = x == mask_id
        if self.credit is None:
            self.credit = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        if self.steps > 0:
            self.credit *= self.beta
        p_max, best = torch.softmax(logits.float(), -1).max(-1)
        self.credit.scatter_add_(2, best[..., None], (p_max**self.gamma * masked.float())[..., None])
        fused = logits + self.alpha * torch.log(self.credit + 1)
        self.steps += 1
        return dinfer_threshold(fused, x, mask_id, threshold)


def joint_threshold_row(logits, x, prompt, mask_id, threshold, edit_threshold):
    """SGLang's JointThreshold step for one request's block (the row is live and under its post-edit
    budget): unmask masked positions above the threshold (else the best one), and rewrite decoded
    non-prompt positions whose argmax differs with a probability above edit_threshold."""
    token = logits.argmax(-1)
    p = F.softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    masked = x == mask_id
    transfer = torch.zeros_like(masked)
    if masked.any():
        confidence = torch.where(masked, p, NEG_INF)
        transfer = confidence > threshold
        if not transfer.any():
            transfer[confidence.argmax()] = True
    transfer |= ~masked & ~prompt & (p > edit_threshold) & (token != x)
    x[transfer] = token[transfer]
    return transfer


class CCD:
    """CCD's _sample_inference_lookahead for one sequence (upstream runs batch 1): logits already shifted;
    Python ints for the step and the buffer size, the buffer as a tensor of positions. The entropy is
    exact (upstream adds 1e-10 inside the log: a documented difference of the recipe)."""

    def __init__(self, steps, gen_length, expand_ratio=4.0, warmup=5, seek_mode=True):
        self.steps, self.gen_length, self.expand_ratio = steps, gen_length, expand_ratio
        self.warmup, self.seek_mode = warmup, seek_mode
        self.i, self.buffer_size, self.previous, self.buffer = 0, 1, None, torch.empty(0, dtype=torch.long)
        self.verified_steps = 0  # steps that committed the verified buffer (not the top k)

    def step(self, logits, x, mask_id, k):
        masked = x == mask_id
        n_mask = int(masked.sum())
        if n_mask == 0:
            return
        i, v_max = self.i, k + int(k * self.expand_ratio)
        n_v = 1 if n_mask <= 0.1 * self.gen_length else self.buffer_size
        n_v = 1 if i < self.warmup - 1 else min(n_v + 1, v_max)
        n_d = 2 * n_v
        probs = torch.softmax(logits.double(), -1)
        token = probs.argmax(-1)
        confidence = torch.where(masked, torch.special.xlogy(probs, probs).sum(-1), NEG_INF)
        order = torch.sort(confidence, descending=True, stable=True).indices
        current = token if i >= self.warmup - 1 else None
        transfer = torch.zeros_like(masked)
        if self.warmup <= i < self.steps - 1:
            accepted = None
            if torch.isin(order[:k], self.buffer).any():
                candidates = order[:n_v]
                buffered = candidates[torch.isin(candidates, self.buffer)]
                agree = buffered[current[buffered] == self.previous[buffered]]
                if agree.numel() >= k:
                    accepted = agree
            if accepted is None:
                transfer[order[:k]] = True
                if n_mask - k > 0:
                    self.buffer = order[k : k + min(n_v, n_mask - k)]
            else:
                self.verified_steps += 1
                transfer[accepted if self.seek_mode else accepted[:k]] = True
                left = int((masked & ~transfer).sum())
                if left > 0:
                    size, take = n_d + accepted.numel(), n_v
                    if size > n_mask:
                        size, take = n_mask, min(n_v, left)
                    pool = order[:size]
                    self.buffer = pool[~torch.isin(pool, accepted)][:take]
        else:
            transfer[order[:k]] = True
            if i in (self.warmup - 1, self.warmup - 2):
                self.buffer = order[k : k + n_v]
        if current is not None:
            self.previous = current
        self.i, self.buffer_size = i + 1, n_v
        x[transfer] = token[transfer]
        return transfer


def jacobi_accept_row(logits, draft, eos_id):
    """Jacobi Forcing's engine acceptance for one row: 1 + the matched prefix of draft[1:] against the
    greedy tokens of logits[i] (which verify draft[i + 1]), cut just after an accepted EOS."""
    greedy = logits.float().argmax(-1)
    mismatch = draft[1:] != greedy[: len(draft) - 1]
    accepted = int((mismatch.cumsum(-1) == 0).sum()) + 1
    eos = False
    if accepted > 1:
        hits = (draft[1:accepted] == eos_id).nonzero()
        if len(hits):
            accepted, eos = int(hits[0]) + 2, True
    return accepted, eos


def end_of_text_cut(token, confidence, masked, committed, eot_id):
    """Learn2PD's EoTP cut for one row: the leftmost committed EoT, else the still-masked position predicted
    as EoT with the highest confidence; the sequence keeps [0, p]. None when neither exists."""
    committed_eot = (committed & (token == eot_id)).nonzero()
    if len(committed_eot):
        return int(committed_eot[0])
    end_confidence = torch.where((token == eot_id) & masked, confidence, NEG_INF)
    if (end_confidence > NEG_INF).any():
        return int(end_confidence.argmax())
    return None
