"""csrc/cuda/credit_confidence.cu under the host emulation: the slot epilogue over rows that fill one CTA, a
few CTAs or part of one, S from 1 to 17, fp32 / fp16 / bf16 logits (strided rows), slot rows with a wider
stride, banned ids (in the slots too), NaN / +inf / all-banned / ineligible rows, and slots that hold the
argmax, have a free slot or must evict; against reference.credit_confidence. The rows' states come from
reference.logits_to_confidence_partial, as the scan kernel writes them."""

import ctypes
import math
from types import SimpleNamespace

import torch
from harness import pointer
from helpers import assert_close

from dllm_kernels.reference.credit_confidence import credit_confidence as reference
from dllm_kernels.reference.logits_to_confidence import logits_to_confidence_partial as partial

KERNEL = "credit_confidence"
PARAMS_TYPE = "DllmCreditParams"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# A token may differ from the fp64 reference only where the reference's fused logits put it this close to
# the best (fp32 rounding of l + alpha * log(C + 1)).
NEAR_TIE = 1e-4


class Params(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("n_outer", ctypes.c_int64),
        ("n_inner", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("stride_outer", ctypes.c_int64),
        ("stride_inner", ctypes.c_int64),
        ("banned", ctypes.c_void_p),
        ("n_banned", ctypes.c_int64),
        ("credit_token", ctypes.c_void_p),
        ("credit_value", ctypes.c_void_p),
        ("slots", ctypes.c_int64),
        ("token_stride", ctypes.c_int64),
        ("value_stride", ctypes.c_int64),
        ("alpha", ctypes.c_float),
        ("beta", ctypes.c_float),
        ("gamma", ctypes.c_float),
        ("token", ctypes.c_void_p),
        ("score", ctypes.c_void_p),
    ]


def cases(generator):
    def pick(options):
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    for outer, inner in ((1, 1), (1, 19), (3, 33), (2, 150)):
        for slots in (1, 3, 8, 17):
            yield dict(
                outer=outer,
                inner=inner,
                vocab=pick([1, 19, 989]),
                slots=slots,
                dtype=pick(list(DTYPES)),
                pad=pick([0, 5]),  # extra elements between logits rows and between slot rows
                banned=pick([False, True]),
                alpha=pick([0.7, 0.0, 3.0]),
                beta=pick([0.8, 1.0, 0.0]),
                gamma=pick([0.2, 0.0, 1.5]),
            )


def random_state(shape, slots, vocab, filled=0.7):
    """Slots holding distinct random tokens (a fraction `filled` of them) with credits in (0, 3)."""
    rows = math.prod(shape)
    tokens = torch.rand(rows, max(vocab, slots)).argsort(-1)[:, :slots]
    tokens = torch.where((tokens < vocab) & (torch.rand(rows, slots) < filled), tokens, -1)
    return tokens.view(*shape, slots), values_of(tokens).view(*shape, slots)


def values_of(tokens):
    """Random credits in (0, 3) for the occupied slots, 0 for the empty ones."""
    return torch.where(tokens >= 0, 3 * torch.rand(tokens.shape) + 1e-3, 0.0)


def fused_logits(logits, tokens, values, alpha, banned):
    """The fp64 fused rows l + alpha * log(C + 1) of a state's dense credit, banned ids -inf."""
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab).double()
    if banned is not None:
        x[:, banned[(banned >= 0) & (banned < vocab)]] = -torch.inf
    tokens, values = tokens.reshape(x.shape[0], -1), values.reshape(x.shape[0], -1).double()
    valid = (tokens >= 0) & (tokens < vocab)
    dense = torch.zeros_like(x).scatter_add_(
        -1, torch.where(valid, tokens, 0), torch.where(valid, values, 0.0)
    )
    return x + alpha * torch.log(dense + 1)


def check_outputs(logits, banned, alpha, got, want, what=""):
    """(token, score, credit_token, credit_value) of a kernel against the reference's: the state's tokens
    exactly, values and scores within fp32 tolerance, tokens exactly except at near ties of the fused row."""
    token, score, tok, val = got
    ref_token, ref_score, ref_tok, ref_val = want
    assert torch.equal(tok, ref_tok), f"{what}: credit_token"
    assert_close(val, ref_val, f"{what}: credit_value")
    differ = (token != ref_token).reshape(-1)
    if differ.any():
        fused = fused_logits(logits, ref_tok, ref_val, alpha, banned)[differ]
        mine, theirs = token.reshape(-1)[differ], ref_token.reshape(-1)[differ]
        assert (mine >= 0).all() and (theirs >= 0).all(), f"{what}: token -1 on one side only"
        f_mine, f_theirs = fused.gather(-1, mine[:, None]), fused.gather(-1, theirs[:, None])
        gap = (f_theirs - f_mine).abs() / f_theirs.abs().clamp(min=1)
        assert (gap <= NEAR_TIE).all(), (
            f"{what}: tokens differ beyond a near tie: {mine.tolist()} {theirs.tolist()}"
        )
        score, ref_score = score.reshape(-1)[~differ], ref_score.reshape(-1)[~differ]
    assert_close(score, ref_score, f"{what}: score")


def inputs(case, put):
    """The case's logits (a row-strided view when pad > 0), eligible, state and banned ids, placed by put."""
    outer, inner, vocab, slots, pad = case["outer"], case["inner"], case["vocab"], case["slots"], case["pad"]
    a = SimpleNamespace(banned=None)
    logits = 3 * torch.randn(outer, inner, vocab + pad)
    tokens, _ = random_state((outer, inner), slots, vocab)
    # Some rows' first slot holds the row's argmax (a hit, no duplicate); others find a free slot or evict.
    argmax = logits[..., :vocab].argmax(-1)
    hit = torch.rand(outer, inner) < 0.3
    tokens = torch.where(hit[..., None] & (tokens == argmax[..., None]), -1, tokens)
    tokens[..., 0] = torch.where(hit, argmax, tokens[..., 0])
    values = values_of(tokens)
    if case["banned"]:
        a.banned = put(torch.tensor([vocab // 2, vocab + 4, -3, int(tokens.max().clamp(min=0))]))
    rows = logits.view(-1, vocab + pad)
    if vocab > 1 and rows.shape[0] > 4:
        rows[0, vocab // 3] = math.nan
        rows[1, vocab // 4] = math.inf
        rows[2, :vocab] = -math.inf
    a.logits = put(logits.to(case["dtype"]))[..., :vocab]
    a.eligible = put(torch.rand(outer, inner) < 0.8)
    a.tokens = put(torch.nn.functional.pad(tokens, (0, pad), value=7))[..., :slots]
    a.values = put(torch.nn.functional.pad(values, (0, pad), value=7.0))[..., :slots]
    a.state = put(partial(a.logits, a.eligible, banned=a.banned))
    return a


def expected(case, a):
    tok, val = a.tokens.clone(), a.values.clone()
    options = case["alpha"], case["beta"], case["gamma"], a.banned
    token, score = reference(a.logits, a.eligible, tok, val, *options)
    return token, score, tok, val


def run(lib, memory, case):
    """The emulated epilogue through its extern "C" launcher."""
    a = inputs(case, memory.copy)
    want = expected(case, a)
    outer, inner, vocab = a.logits.shape
    token = memory.empty((outer, inner), torch.int64)
    score = memory.empty((outer, inner), torch.float32)
    params = Params(
        pointer(a.state), pointer(a.logits), DTYPES[a.logits.dtype], outer, inner, vocab,
        a.logits.stride(0), a.logits.stride(1), pointer(a.banned),
        0 if a.banned is None else a.banned.numel(), pointer(a.tokens), pointer(a.values), case["slots"],
        a.tokens.stride(1), a.values.stride(1), case["alpha"], case["beta"], case["gamma"], pointer(token),
        pointer(score),
    )  # fmt: skip
    err = lib.dllm_credit_confidence_cuda(ctypes.byref(params), None)
    assert err == 0, f"launcher returned {err}"
    check_outputs(a.logits, a.banned, case["alpha"], (token, score, a.tokens, a.values), want, str(case))


def run_on_gpu(case):
    """The real kernels (scan and epilogue) on the same case (the GPU test), through the cuda backend."""
    from dllm_kernels import _extension

    a = inputs(case, lambda t: t.cuda())
    want = expected(case, a)
    options = case["alpha"], case["beta"], case["gamma"], a.banned
    token, score = _extension._C.credit_confidence_run(a.logits, a.eligible, a.tokens, a.values, *options)
    check_outputs(a.logits, a.banned, case["alpha"], (token, score, a.tokens, a.values), want, str(case))
