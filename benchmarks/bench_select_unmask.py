"""select_unmask (selection + fused commit) beside the frameworks' per-row loops and vectorised torch."""

import torch

import dllm_kernels
from dllm_kernels.bench import Case, call_case
from dllm_kernels.ops.select_unmask import dispatcher
from dllm_kernels.reference.select_unmask import select_unmask as reference

NEG_INF = float("-inf")


def fast_dllm_threshold_loop(confidence, eligible, x0, x, threshold):
    """Fast-dLLM v1 get_transfer_index with a threshold: per row, topk over the masked count, then a
    Python loop that drops every rank below the threshold but the first (host syncs in each row)."""
    transfer = torch.zeros_like(eligible)
    counts = eligible.sum(dim=1)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(counts[j]))
        transfer[j, select_index] = True
        for k in range(1, int(counts[j])):
            if confidence[j, select_index[k]] < threshold:
                transfer[j, select_index[k]] = False
    x[transfer] = x0[transfer]
    return transfer


def fast_dllm_factor_loop(confidence, eligible, x0, x, factor):
    """Fast-dLLM v1 get_transfer_index_dynamic: per row, sort, walk the ranks against 1 - f / (n + 1)."""
    transfer = torch.zeros_like(eligible)
    counts = eligible.sum(dim=1)
    for j in range(confidence.shape[0]):
        n = int(counts[j])
        bounds = [-1.0] + [1 - factor / (i + 1) for i in range(2, n + 1)]
        ranked = torch.sort(confidence[j][eligible[j]], descending=True)[0]
        top = 0
        while top < n and ranked[top] >= bounds[top]:
            top += 1
        _, select_index = torch.topk(confidence[j], k=max(top, 1))
        transfer[j, select_index] = True
    x[transfer] = x0[transfer]
    return transfer


def sdar_loop(confidence, eligible, x0, x, k, threshold):
    """SDAR low_confidence_dynamic: per row, all passing positions if enough, else topk."""
    transfer = torch.zeros_like(eligible)
    for j in range(confidence.shape[0]):
        high = confidence[j] > threshold
        if high.sum() >= k[j]:
            transfer[j] = high
        else:
            transfer[j, torch.topk(confidence[j], int(k[j])).indices] = True
    x[transfer] = x0[transfer]
    return transfer


def llada_topk_loop(confidence, eligible, x0, x, k):
    """LLaDA generate.py: per row, topk(confidence, k=num_transfer_tokens[j])."""
    transfer = torch.zeros_like(eligible)
    for j in range(confidence.shape[0]):
        transfer[j, torch.topk(confidence[j], k=int(k[j])).indices] = True
    x[transfer] = x0[transfer]
    return transfer


def ranks(confidence):
    """Each position's 0-based rank in a stable descending sort of its row."""
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(confidence.shape[1], device=confidence.device).expand_as(order))
    return rank, order


def vectorised(policy, confidence, eligible, x0, x, k, threshold, factor, low, radius, margin):
    """The best plain-torch statement of each policy: no loops, no syncs."""
    if policy == "near_best":  # dInfer's threshold decoder
        bound = torch.clamp(confidence.max(-1, keepdim=True).values - margin, -1000, threshold)
        selected = (confidence >= bound) & eligible
    elif policy in ("local_leap", "hierarchy"):
        if policy == "local_leap":  # LocalLeap: the relaxed bound near an anchor
            anchors = (eligible & (confidence >= threshold)).float()[:, None]
            near = torch.nn.functional.max_pool1d(anchors, 2 * radius + 1, 1, radius)[:, 0] > 0
            selected = confidence >= torch.where(near, low, threshold)
        else:  # dInfer's hierarchy decoder, every row at once: each run's maximum above low
            starts = eligible & ~torch.nn.functional.pad(eligible[:, :-1], (1, 0))
            run = torch.where(eligible, starts.cumsum(-1), 0)
            run_max = torch.full_like(confidence, NEG_INF).scatter_reduce(-1, run, confidence, "amax")
            selected = (confidence == run_max.gather(-1, run)) & (confidence > low) | (confidence > threshold)
        selected.scatter_(-1, confidence.argmax(-1, keepdim=True), True)
        selected &= eligible
    elif policy in ("threshold", "all"):
        selected = confidence >= threshold if policy == "threshold" else eligible.clone()
        selected.scatter_(-1, confidence.argmax(-1, keepdim=True), True)  # at least one per row
        selected &= eligible
    else:
        rank, order = ranks(confidence)
        if policy == "factor":
            ranked = confidence.gather(-1, order).double()
            i = torch.arange(1, confidence.shape[1] + 1, device=confidence.device, dtype=torch.float64)
            ok = (ranked >= 1 - factor / (i + 1)) | (i == 1)
            n = torch.cumprod(ok.long(), -1).sum(-1, keepdim=True)
        elif policy == "topk":
            n = k[:, None]
        else:  # topk_or_threshold
            passing = (confidence > threshold).sum(-1)
            n = torch.where(passing >= k, passing, k)[:, None]
        selected = (rank < n) & eligible
    x.copy_(torch.where(selected, x0, x))
    return selected


def make_case(device, policy, n_rows=32, length=256, block=(96, 128)):
    confidence = torch.rand(n_rows, length, device=device) ** 0.3  # many near 1, as in a late step
    eligible = torch.zeros(n_rows, length, dtype=torch.bool, device=device)
    eligible[:, block[0] : block[1]] = torch.rand(n_rows, block[1] - block[0], device=device) < 0.8
    confidence = torch.where(eligible, confidence, NEG_INF)  # the frameworks' -inf outside the window
    x0 = torch.randint(0, 126000, (n_rows, length), device=device)
    x = torch.full((n_rows, length), 126336, device=device)
    k = eligible.sum(-1).clamp(max=4)
    threshold, factor, low, radius, margin = 0.9, 1.0, 0.7, 2, 1e-5
    kwargs = dict(policy=policy, k=k, threshold=threshold, inclusive=True, factor=factor, min_per_row=1)
    kwargs |= dict(low_threshold=low, radius=radius, margin=margin)
    x_ref = x.clone()
    ref_selected, ref_count = reference(confidence, eligible, token=x0, x=x_ref, **kwargs)

    def check(out):
        selected, count = out
        assert torch.equal(selected, ref_selected) and torch.equal(count, ref_count), "selection differs"
        assert torch.equal(x, x_ref), "commit differs"

    baselines = {
        "vectorised torch": lambda: vectorised(
            policy, confidence, eligible, x0, x, k, threshold, factor, low, radius, margin
        )
    }
    loops = {
        "threshold": (
            "fast-dllm loop",
            lambda: fast_dllm_threshold_loop(confidence, eligible, x0, x, threshold),
        ),
        "factor": ("fast-dllm loop", lambda: fast_dllm_factor_loop(confidence, eligible, x0, x, factor)),
        "topk": ("llada loop", lambda: llada_topk_loop(confidence, eligible, x0, x, k)),
        "topk_or_threshold": ("sdar loop", lambda: sdar_loop(confidence, eligible, x0, x, k, threshold)),
    }
    if policy in loops:
        name, fn = loops[policy]
        baselines[name] = fn
    return Case(
        op="select_unmask",
        label=f"B={n_rows} L={length} block {block[1] - block[0]}, {policy}",
        run=lambda: dllm_kernels.select_unmask(confidence, eligible, token=x0, x=x, **kwargs),
        check=check,
        bytes=confidence.numel() * (4 + 1 + 1) + eligible.sum().item() * 8 * 2 + n_rows * 4,
        backends=[b for b in dispatcher.backends_for(device, confidence) if b != "reference"],
        baselines=baselines,
        cuda_graph=device.type == "cuda",
    )


def cases(device, quick):
    policies = (
        ("threshold", "factor")
        if quick
        else (
            "threshold",
            "factor",
            "topk",
            "topk_or_threshold",
            "all",
            "local_leap",
            "hierarchy",
            "near_best",
        )
    )
    n_rows = 64 if device.type == "cuda" else 32
    out = [make_case(device, policy, n_rows=n_rows) for policy in policies]
    if device.type == "cpu":
        score, eligible, k = torch.rand(1, 32), torch.rand(1, 32) < 0.5, torch.tensor([4])
        out.append(
            call_case(
                "select_unmask",
                "tiny call [1, 32] topk",
                lambda: dllm_kernels.select_unmask(score, eligible, k=k),
                {"torch.topk": lambda: torch.topk(score, 4)},
                32 * 6,
            )
        )
    return out
