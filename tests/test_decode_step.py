"""decode_step recipes against each framework's own per-row loop (B = 1 at a time, its style, T = 0).

The oracles restate the frameworks' public code (../shared/ANCHORS.md): LLaDA generate.py, Fast-dLLM
llada/generate.py and v2 generation_functions.py, Dream generation_utils.py, SDAR generate.py,
dParallel generate.py, Prophet's early exit. Logits are continuous fp32, so torch.topk meets no ties.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_BACKENDS

import dllm_kernels
from dllm_kernels import schedules, use_backend
from dllm_kernels.ops import logits_to_confidence, select_unmask
from dllm_kernels.ops._common import rows_view

B, L, V, MASK = 4, 48, 61, 61  # the mask id is outside the vocabulary: never predicted
NEG_INF = float("-inf")


def problem(block=(16, 32)):
    """Logits, a half-masked sequence, and eligible = masked inside the active block."""
    logits = torch.randn(B, L, V) * 3
    x = torch.randint(0, V, (B, L))
    x[torch.rand(B, L) < 0.5] = MASK
    eligible = x == MASK
    eligible[:, : block[0]] = False
    eligible[:, block[1] :] = False
    return logits, x, eligible


def run(backend, logits, x, eligible, **options):
    for op, arg in ((logits_to_confidence, rows_view(logits)), (select_unmask, x.float())):
        reason = op.dispatcher.why_not(backend, logits.device, arg, explicit=True)
        if reason is not None:
            pytest.skip(reason)
    with use_backend(backend):
        return dllm_kernels.decode_step(logits, x, eligible, **options)


def llada_row(logits, x, eligible, k):
    """LLaDA generate.py, low_confidence remasking at temperature 0, for one row."""
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(eligible, x0_p, NEG_INF)
    _, select_index = torch.topk(confidence, k=k)
    x[select_index] = x0[select_index]


def fast_dllm_row(logits, x, eligible, threshold=None, factor=None):
    """Fast-dLLM v1 get_transfer_index (threshold) and get_transfer_index_dynamic (factor), one row.
    Returns True where its factor loop hits the quirk (the last rank is the first to fail)."""
    x0 = torch.argmax(logits, dim=-1)
    x0_p = torch.gather(F.softmax(logits.to(torch.float64), dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(eligible, x0_p, NEG_INF)
    n = int(eligible.sum())
    if n == 0:
        return False
    if factor is None:
        _, select_index = torch.topk(confidence, k=n)
        transfer = torch.zeros_like(eligible)
        transfer[select_index] = True
        for k in range(1, n):
            if confidence[select_index[k]] < threshold:
                transfer[select_index[k]] = False
        x[transfer] = x0[transfer]
        return False
    threshs = [1 - factor / (i + 1) for i in range(1, n + 1)]
    threshs[0] = -1
    sorted_confidence = torch.sort(confidence[eligible], descending=True)[0]
    for top_i in range(n):  # the index after the loop is the count, as in Fast-dLLM
        if sorted_confidence[top_i] < threshs[top_i]:
            break
    quirk = n > 1 and top_i == n - 1 and bool(sorted_confidence[n - 1] < threshs[n - 1])
    if top_i == 0 or top_i == n - 1:
        top_i += 1
    if quirk:
        top_i -= 1  # the rule as written: the failing last rank is not committed
    _, select_index = torch.topk(confidence, k=top_i)
    x[select_index] = x0[select_index]
    return quirk


def shifted(logits):
    return torch.cat([logits[:1], logits[:-1]], dim=0)


def fast_dllm_v2_row(logits, x, eligible, threshold):
    """Fast-dLLM v2 sub-block step at temperature 0, one row."""
    logits = shifted(logits)
    p = F.softmax(logits, dim=-1)
    x_1 = torch.argmax(p, dim=-1)
    x1_p = torch.where(eligible, torch.gather(p, -1, x_1[:, None])[:, 0], NEG_INF)
    unmask = x1_p > threshold
    unmask[x1_p.argmax()] = True
    unmask &= eligible
    x[unmask] = x_1[unmask]


def dream_row(logits, x, eligible, k, alg):
    """Dream _sample with temperature 0, no top-p / top-k, alg_temp None, one row."""
    logits = shifted(logits)[eligible]
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        sorted_probs = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    full_confidence = torch.full_like(x, NEG_INF, dtype=logits.dtype)
    full_confidence[eligible] = confidence
    _, transfer_index = torch.topk(full_confidence, k)
    x_ = torch.full_like(x, MASK)
    x_[eligible] = x0
    x[transfer_index] = x_[transfer_index]


def sdar_row(logits, x, eligible, k, threshold):
    """SDAR low_confidence_dynamic (greedy tokens: SDAR samples, which this test cannot share), one row."""
    x0 = torch.argmax(logits, dim=-1)
    confidence = torch.gather(F.softmax(logits, dim=-1), -1, x0[:, None])[:, 0]
    confidence = torch.where(eligible, confidence, NEG_INF)
    high_conf_mask = confidence > threshold
    if high_conf_mask.sum() >= k:
        transfer = high_conf_mask
    else:
        transfer = torch.zeros_like(eligible)
        transfer[torch.topk(confidence, k).indices] = True
    x[transfer] = x0[transfer]


def dparallel_row(logits, x, eligible, threshold):
    """dParallel get_transfer_index_entropy at temperature 0, one row."""
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    entropy = torch.where(eligible, -torch.sum(p * torch.log(p + 1e-12), dim=-1), torch.inf)
    n = int(eligible.sum())
    _, select_index = torch.topk(entropy, k=n, largest=False)
    transfer = torch.zeros_like(eligible)
    transfer[select_index] = True
    for k in range(1, n):
        if entropy[select_index[k]] > threshold:
            transfer[select_index[k]] = False
    x[transfer] = x0[transfer]


def prophet_row(logits, x, eligible, k, gap_threshold, answer_start):
    """Prophet: mean raw top-1 / top-2 logit gap over 5 answer positions; commit all masks or step LLaDA."""
    gaps = [torch.topk(logits[answer_start + i], 2).values for i in range(5)]
    gap = sum(float(t[0] - t[1]) for t in gaps) / 5
    if gap >= gap_threshold:
        masked = x == MASK
        x[masked] = torch.argmax(logits, dim=-1)[masked]
    else:
        llada_row(logits, x, eligible, k)


def expect(row_fn, logits, x, eligible, per_row=None, **kwargs):
    out = x.clone()
    for b in range(B):
        extra = {name: int(v[b]) for name, v in (per_row or {}).items()}
        row_fn(logits[b], out[b], eligible[b], **extra, **kwargs)
    return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_llada(backend):
    logits, x, eligible = problem()
    k = schedules.llada_transfer_counts(eligible.sum(-1), steps=4)[:, 0]
    want = expect(llada_row, logits, x, eligible, per_row=dict(k=k))
    x_out, selected, count = run(backend, logits, x.clone(), eligible, recipe="llada", k=k)
    assert torch.equal(x_out, want)
    assert torch.equal(count, k.int()) and torch.equal(selected.sum(-1).int(), count)


@pytest.mark.parametrize("mode", ["threshold", "factor"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_dllm(backend, mode):
    logits, x, eligible = problem()
    logits = logits * 2  # confident enough that several positions pass
    option = dict(threshold=0.6) if mode == "threshold" else dict(factor=1.0)
    want = x.clone()
    quirk = [fast_dllm_row(logits[b], want[b], eligible[b], **option) for b in range(B)]
    x_out, _, _ = run(backend, logits, x.clone(), eligible, recipe="fast_dllm", **option)
    assert torch.equal(x_out, want), f"Fast-dLLM's last-rank quirk on rows {quirk}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_dllm_v2_sub_block(backend):
    logits, x, eligible = problem(block=(24, 32))  # an 8-token sub-block of the 32-token block at 0
    want = expect(fast_dllm_v2_row, logits * 2, x, eligible, threshold=0.7)
    x_out, selected, _ = run(backend, logits * 2, x.clone(), eligible, recipe="fast_dllm_v2", threshold=0.7)
    assert torch.equal(x_out, want)
    assert not selected[:, :24].any() and not selected[:, 32:].any()


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dream(backend, alg):
    logits, x, eligible = problem()
    k = schedules.dream_transfer_count(eligible.sum(-1), step=2, steps=6)
    want = expect(dream_row, logits, x, eligible, per_row=dict(k=k), alg=alg)
    x_out, _, count = run(backend, logits, x.clone(), eligible, recipe="dream", k=k, alg=alg)
    assert torch.equal(x_out, want) and torch.equal(count, k.int())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sdar(backend):
    logits, x, eligible = problem()
    logits = logits * 2
    k = torch.tensor([1, 2, 3, 30])  # small k: all passing positions; large k: the top k
    want = expect(
        sdar_row, logits, x, eligible, per_row=dict(k=torch.minimum(k, eligible.sum(-1))), threshold=0.6
    )
    x_out, _, _ = run(
        backend, logits, x.clone(), eligible, recipe="sdar", k=k, threshold=0.6, temperature=0.0
    )
    assert torch.equal(x_out, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dparallel(backend):
    logits, x, eligible = problem()
    want = expect(dparallel_row, logits * 2, x, eligible, threshold=0.5)
    x_out, _, _ = run(backend, logits * 2, x.clone(), eligible, recipe="dparallel", threshold=0.5)
    assert torch.equal(x_out, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_prophet(backend):
    logits, x, eligible = problem()
    logits[:2, 20:25] *= 20  # rows 0 and 1 are sure of their answer: they commit every mask
    k = torch.full((B,), 2)
    want = expect(prophet_row, logits, x, eligible, per_row=dict(k=k), gap_threshold=5.0, answer_start=20)
    kwargs = dict(recipe="prophet", k=k, mask_id=MASK, gap_threshold=5.0, answer_start=20)
    x_out, _, _ = run(backend, logits, x.clone(), eligible, **kwargs)
    assert torch.equal(x_out, want)
    assert not (x_out[:2] == MASK).any() and (x_out[2:] == MASK).any()


def test_unknown_recipe():
    logits, x, eligible = problem()
    with pytest.raises(ValueError, match="dllm::decode_step: recipe must be one of llada, fast_dllm"):
        dllm_kernels.decode_step(logits, x, eligible, recipe="maskgit")
