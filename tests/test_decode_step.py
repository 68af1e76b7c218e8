"""decode_step recipes against each framework's own per-row loop (B = 1 at a time, its style, T = 0).

The oracles transcribe the frameworks' released step code (docs/recipes.md names the files): LLaDA
generate.py, Fast-dLLM llada/generate.py and v2 generation_functions.py, Dream generation_utils.py, SDAR
generate.py, dParallel generate.py, Prophet's early exit. Logits are continuous fp32, so torch.topk
meets no ties.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_BACKENDS

import dllm_kernels
from dllm_kernels import schedules, use_backend
from dllm_kernels.ops import logits_to_confidence, select_unmask

B, L, V, MASK = 4, 48, 61, 61  # the mask id is outside the vocabulary: never predicted
NEG_INF = float("-inf")


def problem(block=(16, 32)):
    """Logits, a half-masked sequence, and eligible = masked inside the active block. Every fourth
    position is masked whatever the draw, so each row has masked positions inside and outside the block."""
    logits = torch.randn(B, L, V) * 3
    x = torch.randint(0, V, (B, L))
    x[(torch.rand(B, L) < 0.5) | (torch.arange(L) % 4 == 0)] = MASK
    eligible = x == MASK
    eligible[:, : block[0]] = False
    eligible[:, block[1] :] = False
    return logits, x, eligible


def run(backend, logits, x, eligible, **options):
    for op, arg in ((logits_to_confidence, logits), (select_unmask, x.float())):
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


def fast_dllm_confidence(logits, eligible):
    x0 = torch.argmax(logits, dim=-1)
    x0_p = torch.gather(F.softmax(logits.to(torch.float64), dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, torch.where(eligible, x0_p, NEG_INF)


def fast_dllm_row(logits, x, eligible, threshold):
    """Fast-dLLM v1 get_transfer_index with a threshold, one row."""
    x0, confidence = fast_dllm_confidence(logits, eligible)
    n = int(eligible.sum())
    _, select_index = torch.topk(confidence, k=n)
    transfer = torch.zeros_like(eligible)
    transfer[select_index] = True
    for k in range(1, n):
        if confidence[select_index[k]] < threshold:
            transfer[select_index[k]] = False
    x[transfer] = x0[transfer]


def factor_count_upstream(sorted_confidence, factor):
    """Fast-dLLM v1 get_transfer_index_dynamic's loop, verbatim in its logic: the count it commits."""
    n = len(sorted_confidence)
    threshs = [1 - factor / (i + 1) for i in range(1, n + 1)]
    threshs[0] = -1
    for top_i in range(n):
        if sorted_confidence[top_i] < threshs[top_i]:
            break
    if top_i == 0 or top_i == n - 1:
        top_i += 1
    return top_i


def factor_count_as_written(sorted_confidence, factor):
    """The paper's rule: the longest prefix with c_i >= 1 - factor / (i + 1) (rank 1 always passes)."""
    count = 1
    while count < len(sorted_confidence) and sorted_confidence[count] >= 1 - factor / (count + 2):
        count += 1
    return count


def fast_dllm_factor_row(logits, x, eligible, factor, count_rule):
    """Fast-dLLM v1 get_transfer_index_dynamic, one row (it would crash on a row with nothing masked)."""
    x0, confidence = fast_dllm_confidence(logits, eligible)
    if not eligible.any():
        return
    sorted_confidence = torch.sort(confidence[eligible], descending=True)[0]
    _, select_index = torch.topk(confidence, k=count_rule(sorted_confidence.tolist(), factor))
    x[select_index] = x0[select_index]


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


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_dllm_threshold(backend):
    logits, x, eligible = problem()
    logits = logits * 2  # confident enough that several positions pass
    want = expect(fast_dllm_row, logits, x, eligible, threshold=0.6)
    x_out, _, _ = run(backend, logits, x.clone(), eligible, recipe="fast_dllm", threshold=0.6)
    assert torch.equal(x_out, want)


def factor_problem():
    """Rows whose sorted confidences fail the factor rule (factor 1: rank i needs 1 - 1 / (i + 1)) first at
    the last rank (rows 0, 1: upstream commits every masked position, the rule as written all but the
    last) or before it (rows 2, 3: the two lowest fail). The passing confidences clear the largest bound;
    each masked position's top logit is set so that its softmax confidence is exactly the one wanted."""
    logits, x, eligible = problem()
    logits = logits * 0.1  # a flat rest: the top logit decides the confidence
    for b in range(B):
        masked = eligible[b].nonzero().flatten()
        n = len(masked)
        high = 1 - 0.5 / (n + 1) * (1 + torch.rand(n)) / 2  # above 1 - 1 / (n + 1), the bound of rank n
        wanted = torch.where(torch.arange(n) < (1 if b < 2 else 2), 0.1 + 0.2 * torch.rand(n), high)
        for position, c in zip(masked.tolist(), wanted[torch.randperm(n)].tolist(), strict=True):
            row = logits[b, position]
            top = int(row.argmax())
            rest = torch.logsumexp(torch.cat([row[:top], row[top + 1 :]]).double(), 0)
            row[top] = float(rest + math.log(c / (1 - c)))  # softmax(row)[top] = c
    return logits, x, eligible


@pytest.mark.parametrize("factor_rule", ["upstream", "as_written"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_dllm_factor(backend, factor_rule):
    logits, x, eligible = factor_problem()
    count_rule = factor_count_upstream if factor_rule == "upstream" else factor_count_as_written
    want = expect(fast_dllm_factor_row, logits, x, eligible, factor=1.0, count_rule=count_rule)
    options = dict(factor=1.0) if factor_rule == "upstream" else dict(factor=1.0, factor_rule="as_written")
    x_out, _, count = run(backend, logits, x.clone(), eligible, recipe="fast_dllm", **options)
    assert torch.equal(x_out, want)
    masked = eligible.sum(-1).int()
    last_rank_commits = count[:2] == masked[:2]  # the quirk rows
    assert last_rank_commits.all() if factor_rule == "upstream" else not last_rank_commits.any()
    assert (count[2:] < masked[2:]).all()


def test_fast_dllm_factor_counts_by_hand():
    """Fast-dLLM's loop on hand-made rows (factor 1: rank i needs 1 - 1 / (i + 1)): [.9, .8, .76, .1] commits
    all 4 upstream (the failing last rank too), 3 as written; [.9, .8, .7, .1] commits 2 either way; two
    positions always commit both upstream."""
    for scores, upstream, as_written in (
        ([0.9, 0.8, 0.76, 0.1], 4, 3),
        ([0.9, 0.8, 0.7, 0.1], 2, 2),
        ([0.9, 0.1], 2, 1),
        ([0.4], 1, 1),
    ):
        assert factor_count_upstream(scores, 1.0) == upstream
        assert factor_count_as_written(scores, 1.0) == as_written
        score = torch.tensor([scores])
        eligible = torch.ones_like(score, dtype=torch.bool)
        for policy, expected in (("factor_upstream", upstream), ("factor", as_written)):
            assert int(select_unmask.select_unmask(score, eligible, policy=policy, factor=1.0)[1]) == expected


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fast_dllm_v2_sub_block(backend):
    logits, x, eligible = problem(block=(24, 32))  # an 8-token sub-block of the 32-token block at 0
    want = expect(fast_dllm_v2_row, logits * 2, x, eligible, threshold=0.7)
    x_out, selected, _ = run(backend, logits * 2, x.clone(), eligible, recipe="fast_dllm_v2", threshold=0.7)
    assert torch.equal(x_out, want)
    assert not selected[:, :24].any() and not selected[:, 32:].any()


def test_fast_dllm_v2_default_threshold_and_exact_probabilities():
    """Upstream's default threshold is 0.95. With bf16 logits upstream compares bf16 probabilities; the
    recipe compares exact ones, i.e. it equals upstream run on the fp32 upcast of the same logits."""
    logits, x, eligible = problem(block=(24, 32))
    logits = (logits * 4).to(torch.bfloat16)  # confident: a few positions near 0.95
    want = expect(fast_dllm_v2_row, logits.float(), x, eligible, threshold=0.95)
    x_out, _, _ = dllm_kernels.decode_step(logits, x.clone(), eligible, recipe="fast_dllm_v2")
    assert torch.equal(x_out, want)


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
    window = logits[:, 20:25]
    top2 = window.topk(2, dim=-1)
    # Rows 0, 1 are sure of their answer (every gap in [6, 8)): they commit every mask. Rows 2, 3 are not
    # (every gap in [0, 2)): a LLaDA step of 2.
    gap = torch.where(torch.arange(B)[:, None] < 2, 6.0, 0.0) + 2 * torch.rand(B, 5)
    window.scatter_(-1, top2.indices[..., :1], (top2.values[..., 1] + gap)[..., None])
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


@pytest.mark.parametrize(
    "recipe, options, exc, fragment",
    [
        ("llada", dict(k=None, tempreature=0.5), TypeError, "got unknown 'tempreature'"),
        ("llada", {}, TypeError, "recipe 'llada' needs k; got none"),
        ("prophet", dict(k=None), TypeError, "needs mask_id, gap_threshold"),
        ("llada", dict(k=None, remasking="confidence"), ValueError, "remasking must be one of"),
        ("dream", dict(k=None, alg="margin"), ValueError, "alg must be one of 'maskgit_plus'"),
        ("fast_dllm", dict(factor=1.0, factor_rule="paper"), ValueError, "factor_rule must be one of"),
        ("sdar", dict(k=None, min_per_row=2), TypeError, "got unknown 'min_per_row'"),
    ],
)
def test_bad_options(recipe, options, exc, fragment):
    logits, x, eligible = problem()
    if "k" in options:
        options["k"] = torch.full((B,), 2)
    before = x.clone()
    with pytest.raises(exc) as info:
        dllm_kernels.decode_step(logits, x, eligible, recipe=recipe, **options)
    message = str(info.value)
    assert message.startswith("dllm::decode_step: ") and fragment in message, message
    assert torch.equal(x, before), "x written on error"
