"""The newer decoding rules (local_leap, hierarchy, credit, joint_threshold, ccd, Jacobi acceptance, the
end-of-text stop) against transcriptions of their released code (tests/upstream_rules.py), which run one
row at a time: every row of a batch must get its batch-1 answer, on every backend, over several steps."""

import pytest
import torch
import upstream_rules as upstream
from helpers import KERNEL_BACKENDS

import dllm_kernels
from dllm_kernels import decode, use_backend
from dllm_kernels.ops import logits_to_confidence, select_unmask

B, L, V, MASK = 4, 40, 67, 67  # the mask id is outside the vocabulary: never predicted
BACKENDS = ["reference", *KERNEL_BACKENDS]


def pinned(backend):
    """use_backend(backend), or a skip where this machine does not run it for these ops."""
    for op, arg in ((logits_to_confidence, torch.zeros(1, V)), (select_unmask, torch.zeros(1, L))):
        reason = op.dispatcher.why_not(backend, arg.device, arg, explicit=True)
        if reason is not None:
            pytest.skip(reason)
    return use_backend(backend)


def masked_block(block=(8, 32), masked_share=0.6):
    """x with a prompt-like prefix, masks inside [block) (every third position at least) and eligible =
    the masked positions of the block."""
    x = torch.randint(0, V, (B, L))
    inside = torch.zeros(L, dtype=torch.bool)
    inside[block[0] : block[1]] = True
    masked = inside & ((torch.rand(B, L) < masked_share) | (torch.arange(L) % 3 == 0))
    x[masked] = MASK
    return x, masked


def per_row(fn, logits, x, *args, **kwargs):
    """fn applied to each row alone (its batch-1 call), on a copy of x."""
    out = x.clone()
    for b in range(B):
        fn(logits[b], out[b], *(a[b] for a in args), **kwargs)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_leap(backend):
    """Confident clusters (anchors) next to relaxed positions: the rule must use the neighbourhood."""
    x, eligible = masked_block()
    logits = torch.randn(B, L, V) * 2
    boost = torch.rand(B, L) * 9  # spreads the top probabilities over [0, 1]
    logits.scatter_add_(-1, torch.randint(0, V, (B, L, 1)), boost[..., None])
    want = per_row(
        upstream.local_leap_row, logits, x, eligible, threshold=0.9, relaxed_threshold=0.75, radius=4
    )
    with pinned(backend):
        got, selected, count = dllm_kernels.decode_step(logits, x.clone(), eligible, recipe="local_leap")
    assert torch.equal(got, want)
    assert torch.equal(selected, got != x) and torch.equal(count, selected.sum(-1).int())


def test_local_leap_relaxes_only_near_an_anchor():
    """One anchor at 10: a 0.8 position 3 away is committed, the same 0.8 position 7 away is not."""
    score = torch.full((1, L), 0.1)
    score[0, [10, 13, 17]] = torch.tensor([0.95, 0.8, 0.8])
    eligible = torch.ones(1, L, dtype=torch.bool)
    selected, count = dllm_kernels.select_unmask(
        score, eligible, policy="local_leap", threshold=0.9, low_threshold=0.75, radius=4, inclusive=True
    )
    assert selected[0].nonzero().flatten().tolist() == [10, 13] and count.item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [None, 0.8])
def test_hierarchy(backend, threshold):
    """Every row equals dInfer's batch-1 step; two positions of a run share the run's best logits row, so
    the tie rule (every tied position) is exercised."""
    x, eligible = masked_block()
    logits = torch.randn(B, L, V) * 2
    logits.scatter_add_(-1, torch.randint(0, V, (B, L, 1)), (torch.rand(B, L) * 8)[..., None])
    for b in range(B):  # the best position's logits also on a neighbour (the same run when it is masked)
        best = int(torch.where(eligible[b], torch.softmax(logits[b], -1).amax(-1), -1).argmax())
        logits[b, best + 1 if eligible[b, best + 1] else best - 1] = logits[b, best]
    want = x.clone()
    for b in range(B):  # the masks all lie in the block, so the rows' runs are the block's
        upstream.hierarchy_step(logits[b : b + 1], want[b : b + 1], MASK, threshold, 0.4)
    with pinned(backend):
        got, _, _ = dllm_kernels.decode_step(
            logits, x.clone(), eligible, recipe="hierarchy", threshold=threshold
        )
    assert torch.equal(got, want)


def alternating_logits(steps, swap=0.05):
    """Per step [B, L, V] logits where each position's two favourite tokens trade the lead by ``swap``
    every step (so the raw argmax flips and credit from earlier steps decides the fused one), on a flat
    background that keeps every probability under the threshold for a few steps."""
    favourites = torch.stack([torch.randperm(V)[:2] for _ in range(B * L)]).view(B, L, 2)
    base = torch.randn(B, L, V) * 0.5
    level = 2 + torch.rand(B, L) * 3
    out = []
    for step in range(steps):
        logits = base + 0.05 * torch.randn(B, L, V)
        lead = torch.where(torch.rand(B, L) < 0.5, swap, -swap) if step else torch.full((B, L), swap)
        logits.scatter_(-1, favourites, torch.stack([level + lead, level - lead], -1) + step * 0.4)
        out.append(logits)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_credit_follows_dense_credit_over_a_block(backend, dtype):
    """Eight steps of a block against dInfer's dense [B, L, V] credit: the same tokens every step (slots
    enough for every raw argmax a position sees), and credit changes some fused argmax."""
    if backend == "triton":
        pytest.skip(
            "the Triton interpreter takes 20 s a block; test_credit_confidence runs its kernels over the same"
            " 8 steps against the dense upstream, and the recipe around them is the other backends'"
        )
    x, eligible = masked_block()
    state = dllm_kernels.credit_state((B, L), slots=8)
    dense, want = upstream.DenseCredit(), x.clone()
    steered = 0
    with pinned(backend):
        for logits in alternating_logits(8):
            logits = logits.to(dtype)
            fused = dense.step(logits, want, MASK, threshold=0.9)
            steered += int(((fused != logits.argmax(-1)) & (x == MASK)).sum())
            eligible = x == MASK
            dllm_kernels.decode_step(logits, x, eligible, recipe="credit", credit=state, mask_id=MASK)
            assert torch.equal(x, want)
    assert steered > 0, "credit never changed a fused argmax: the test would not see it ignored"


@pytest.mark.parametrize("backend", BACKENDS)
def test_joint_threshold_unmasks_and_edits(backend):
    """Steps of SGLang's JointThreshold from states with masks, decoded tokens and prompt tokens in the
    block; each library step equals the per-request step (both start from the same tokens)."""
    x, _ = masked_block(block=(0, L), masked_share=0.5)
    prompt = torch.zeros(B, L, dtype=torch.bool)
    prompt[:, :6] = True
    x[prompt] = torch.randint(0, V, (B, 6)).flatten()
    edits = 0
    with pinned(backend):
        for step in range(5):
            logits = torch.randn(B, L, V) * (1 + step)  # later steps are confident: more unmasking and edits
            masked = x == MASK
            want = x.clone()
            for b in range(B):
                upstream.joint_threshold_row(logits[b], want[b], prompt[b], MASK, 0.5, 0.3)
            editable = ~masked & ~prompt
            got, selected, count = dllm_kernels.decode_step(
                logits, x, masked, recipe="joint_threshold", editable=editable, edit_threshold=0.3
            )
            assert torch.equal(got, want), f"step {step}"
            assert torch.equal(count, selected.sum(-1).int())
            edits += int((selected & ~masked).sum())
            assert not (selected & prompt).any()
    assert edits > 0, "no edit happened: the test would not see edits ignored"


def drifting_logits(steps, drift=0.15):
    """Logits of a Dream-style model whose predictions settle: one fixed field plus a little noise a step,
    so argmaxes persist and CCD's buffer gets verified."""
    base = torch.randn(B, L, V) * 3
    return [base + drift * torch.randn(B, L, V) for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seek_mode", [True, False])
def test_ccd_follows_the_batch_1_loop(backend, seek_mode):
    """A whole CCD generation (Dream-style, no blocks) of B rows with different masks, against the batch-1
    loop per row: the same tokens after every step, and steps that commit the verified buffer (more than k
    of them with seek_mode)."""
    if backend == "triton" and not seek_mode:
        pytest.skip("the Triton interpreter takes 30 s a generation: it runs seek_mode only")
    steps = 24
    x, _ = masked_block(block=(6, L), masked_share=1.0)
    gen_length = L - 6
    k = torch.full((B,), 1)
    loops = [upstream.CCD(steps, gen_length, seek_mode=seek_mode) for _ in range(B)]
    state = decode.ccd_state(x)
    want = x.clone()
    more_than_k = 0
    with pinned(backend):
        for logits in drifting_logits(steps):
            shifted = torch.cat([logits[:, :1], logits[:, :-1]], 1)  # Dream: position j reads j - 1
            for b in range(B):
                loops[b].step(shifted[b], want[b], MASK, 1)
            _, _, count = dllm_kernels.decode_step(
                logits,
                x,
                x == MASK,
                recipe="ccd",
                k=k,
                state=state,
                gen_length=gen_length,
                steps=steps,
                seek_mode=seek_mode,
            )
            assert torch.equal(x, want)
            more_than_k += int((count > 1).sum())
    assert sum(loop.verified_steps for loop in loops) > 0, "the verification path was never taken"
    assert more_than_k > 0 or not seek_mode, "no step accepted more than k"


def test_jacobi_accept():
    """Drafts that follow the greedy tokens for a random prefix, with EOS inside some of them."""
    n, eos = 9, 5
    logits = torch.randn(B + 4, n, V)
    logits[..., eos] = -30  # EOS is greedy only where placed: rows 2 and 3 accept past their start
    greedy = logits.argmax(-1)
    draft = torch.randint(0, V, (B + 4, n))
    for b in range(B + 4):
        good = int(torch.randint(0, n, ()))
        draft[b, 1 : good + 1] = greedy[b, :good]
    draft[1, 2] = eos  # inside the accepted prefix when row 1 matched that far
    draft[2, 1:] = greedy[2, : n - 1]  # full acceptance
    draft[3, 1:] = greedy[3, : n - 1]
    draft[3, 4], greedy_eos = eos, logits[3, 3].clone()
    logits[3, 3, eos] = greedy_eos.max() + 1  # row 3: EOS accepted at draft position 4
    start = torch.randint(0, 50, (B + 4,), dtype=torch.int32)
    accepted, kv_len, hit, token = decode.jacobi_accept(logits, draft, start, eos_id=eos)
    for b in range(B + 4):
        want, want_eos = upstream.jacobi_accept_row(logits[b], draft[b], eos)
        assert (int(accepted[b]), bool(hit[b])) == (want, want_eos), b
    assert bool(hit[3]) and int(accepted[3]) == 5 and int(accepted[2]) == n
    assert torch.equal(kv_len, (start + accepted).int()) and torch.equal(token, logits[:, : n - 1].argmax(-1))


@pytest.mark.parametrize("recipe", ["fast_dllm", "dream", "local_leap"])
def test_end_of_text_stop(recipe):
    """eot_id / length with a recipe: rows where a committed position is EoT, rows where only a still-masked
    prediction is, rows without EoT; later positions become EoT, the valid length drops to p + 1."""
    eot = 3
    x, eligible = masked_block()
    logits = torch.randn(B, L, V) * 2
    logits[..., eot] = -30  # EoT only where placed: rows 2 and 3 have none
    logits[0, 20, eot] = 30  # row 0: a certain EoT at 20, committed
    logits[1, 25, eot] = logits[1, 25].amax() + 1  # row 1: EoT predicted at 25, committed or not
    x[0, 20] = x[1, 25] = MASK
    eligible = x == MASK
    options = {"k": torch.full((B,), 2)} if decode.requires_k(recipe) else {}
    before = x.clone()
    length = torch.full((B,), L)
    got, selected, _ = dllm_kernels.decode_step(
        logits, x, eligible, recipe=recipe, eot_id=eot, length=length, **options
    )
    token, confidence = upstream.greedy_confidence(logits, eligible)
    if recipe in decode.SHIFTED_RECIPES:
        token, confidence = upstream.greedy_confidence(
            torch.cat([logits[:, :1], logits[:, :-1]], 1), eligible
        )
    for b in range(B):
        cut = upstream.end_of_text_cut(token[b], confidence[b], eligible[b], selected[b], eot)
        want_length = L if cut is None else cut + 1
        assert int(length[b]) == want_length, (b, cut)
        assert (got[b, want_length:] == eot).all()
        committed = before[b, :want_length].clone()
        committed[selected[b, :want_length]] = token[b, :want_length][selected[b, :want_length]]
        assert torch.equal(got[b, :want_length], committed)
    if recipe != "dream":
        assert int(length[0]) == 21 and int(length[1]) == 26 and int(length[2]) == L


def counts(x, k=2):
    return torch.full((x.shape[0],), k, device=x.device)


STATEFUL = {
    "credit": lambda x: dict(credit=dllm_kernels.credit_state(x.shape, device=x.device), mask_id=MASK),
    "joint_threshold": lambda x: dict(editable=x != MASK),
    "ccd": lambda x: dict(k=counts(x), state=decode.ccd_state(x), gen_length=x.shape[1], steps=8),
}


def options_for(recipe, x):
    """The options a step of any recipe needs, on x's device."""
    if recipe in STATEFUL:
        return STATEFUL[recipe](x)
    options = {"k": counts(x)} if decode.requires_k(recipe) else {}
    if recipe == "prophet":
        options.update(mask_id=MASK, gap_threshold=float("inf"))
    return options


@pytest.mark.parametrize("recipe", ["local_leap", "hierarchy", "credit", "joint_threshold", "ccd"])
def test_compiled_step_is_the_eager_step(recipe):
    """torch.compile(fullgraph=True) of each new recipe's step: no graph break, the same result."""
    torch._dynamo.reset()
    x, eligible = masked_block()
    logits = torch.randn(B, L, V) * 3

    def step(logits, x, eligible, options):
        return dllm_kernels.decode_step(logits, x, eligible, recipe=recipe, **options)

    eager = step(logits, x.clone(), eligible, options_for(recipe, x))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
        logits, x.clone(), eligible, options_for(recipe, x)
    )
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "recipe, options, fragment",
    [
        ("credit", dict(mask_id=MASK), "recipe 'credit' needs credit"),
        ("credit", dict(credit=None, mask_id=MASK, seed=3), "got unknown 'seed'"),
        ("fast_dllm", dict(eot_id=3), "eot_id and length go together"),
        ("joint_threshold", {}, "needs editable"),
        ("ccd", dict(k=None, state=None), "needs gen_length, steps"),
        ("credit", dict(credit=torch.zeros(B, L, 8), mask_id=MASK), "credit must be the (credit_token"),
        ("joint_threshold", dict(editable=torch.ones(B, L + 1, dtype=torch.bool)), "editable must be bool"),
        ("ccd", dict(k=None, state=None, gen_length=L, steps=8), "state must be the CCDState"),
        ("fast_dllm", dict(eot_id=3, length=torch.full((B,), 4.0)), "length must be an integer [B]"),
        ("ccd", dict(k=1, state=decode.ccd_state(torch.zeros(B, L)), gen_length=L, steps=8), "k must be"),
    ],
)
def test_bad_options(recipe, options, fragment):
    x, eligible = masked_block()
    before = x.clone()
    with pytest.raises(TypeError) as info:
        dllm_kernels.decode_step(torch.randn(B, L, V), x, eligible, recipe=recipe, **options)
    assert str(info.value).startswith("dllm::decode_step: ") and fragment in str(info.value), str(info.value)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "logits, draft, start, fragment",
    [
        (torch.randn(B, 8, V), torch.randint(0, V, (B, 9)).int(), torch.zeros(B), "draft must be int64"),
        (
            torch.randn(B, 8, V),
            torch.randint(0, V, (B, 0)),
            torch.zeros(B),
            "draft must be [B, n] with n >= 1",
        ),
        (torch.randn(B, 7, V), torch.randint(0, V, (B, 9)), torch.zeros(B), f"logits must be [{B}, >= 8, V]"),
        (torch.randn(B + 1, 8, V), torch.randint(0, V, (B, 9)), torch.zeros(B), "logits must be"),
        (torch.randn(B, 8, V), torch.randint(0, V, (B, 9)), torch.zeros(B), "start must be an integer"),
        (torch.randn(B, 8, V), torch.randint(0, V, (B, 9)), torch.zeros(B + 1).int(), "start must be"),
    ],
)
def test_jacobi_accept_bad_input(logits, draft, start, fragment):
    with pytest.raises((TypeError, RuntimeError)) as info:
        decode.jacobi_accept(logits, draft, start)
    assert str(info.value).startswith("dllm::jacobi_accept: ") and fragment in str(info.value), str(
        info.value
    )


@pytest.mark.parametrize("recipe", dllm_kernels.RECIPES)
def test_shifted_recipes_are_the_ones_that_never_select_position_0(recipe):
    """decode.SHIFTED_RECIPES (what a generation loop reads to place its window) names exactly the recipes
    whose step shifts the logits: with only position 0 eligible, they select nothing and the others it."""
    logits, x = torch.randn(1, 4, V), torch.full((1, 4), MASK)
    eligible = torch.tensor([[True, False, False, False]])
    options = options_for(recipe, x)
    if "k" in options:
        options["k"] = torch.tensor([1])
    _, selected, _ = dllm_kernels.decode_step(logits, x, eligible, recipe=recipe, **options)
    assert bool(selected[0, 0]) == (recipe not in decode.SHIFTED_RECIPES)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["local_leap", "hierarchy", "credit", "joint_threshold", "ccd"])
def test_step_never_syncs_on_cuda(recipe):
    """Every new recipe's step with the end-of-text stop, and Jacobi acceptance, under sync debug mode
    "error" (bf16 logits of LLaDA's vocabulary), equal to the reference backend's step."""
    x, eligible = (t.cuda() for t in masked_block())
    logits = (torch.randn(B, L, 126464, device="cuda") * 3).to(torch.bfloat16)

    def step(out, sync_mode):
        length = torch.full((B,), L, device="cuda")
        state = options_for(recipe, x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            dllm_kernels.decode_step(logits, out, eligible, recipe=recipe, eot_id=5, length=length, **state)
            decode.jacobi_accept(logits[:, :8], out[:, :9], length.int(), eos_id=5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return out, length

    with use_backend("reference"):
        want = step(x.clone(), "default")
    step(x.clone(), "default")  # warm-up: kernels compile and load
    for got, expected in zip(step(x.clone(), "error"), want, strict=True):
        assert torch.equal(got, expected)
