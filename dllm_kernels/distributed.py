"""Tensor-parallel decoding on ``torch.distributed``: vocabulary-sharded logits -> ``(token, score)``, the
same on every rank, without gathering the logits.

A model with a vocabulary-parallel LM head leaves each rank ``logits[..., W_r]``, the global ids
``[vocab_start_r, vocab_start_r + W_r)``. Each rank reduces its shard to a small state per row
(``dllm::logits_to_confidence_partial``: one read of every eligible row), the ranks all-gather the
states (``O(B * L)`` numbers a rank, never ``O(V)``) and each merges all of them
(``dllm::logits_to_confidence_merge``) into the single-device op's answer on the concatenated logits: the
same global token (argmax ties -> lowest global id; sampling noise keyed by the global id) and the score
within fp32 rounding.

Every call first all-gathers a 56-byte header (shard offsets and widths, the row shape, the options,
whether the rank's arguments passed their checks) so that bad input (shards that do not tile the
vocabulary, ranks that disagree on the shape) raises a ``dllm::`` error on every rank instead of hanging a
collective. The header travels on the group's CPU backend (``gloo``, or ``init_process_group()``
without a backend, which pairs gloo with nccl), so a CUDA step syncs with nothing but its own collective;
on an nccl-only group it goes over the device and the host waits for it. A world of one is the plain op.
"""

import zlib

import torch
import torch.distributed as dist

from .ops._common import OpError
from .ops.logits_to_confidence import (
    SCORES,
    checked_partial_args,
    logits_to_confidence_merge,
    logits_to_confidence_partial,
    partial_dispatcher,
)
from .ops.logits_to_confidence import logits_to_confidence as _single_device

OP = "distributed.logits_to_confidence"
_err = OpError(OP)
# torch 2.13 renamed all_gather_into_tensor; the device image's 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# Header fields, one int64 each (_ROWS only makes the shape error readable; _SHAPE is compared).
_OK, _START, _WIDTH, _ROWS, _SHAPE, _OPTIONS, _DEVICE, _HEADER = range(8)


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 where torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def logits_to_confidence(
    logits_shard: torch.Tensor,
    eligible: torch.Tensor | None = None,
    *,
    vocab_start: int,
    group=None,
    temperature: float = 0.0,
    score: str = "prob",
    tempered_score: bool = False,
    banned: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits_to_confidence`` of the logits whose vocabulary is split across the ranks of ``group``.

    Every rank calls it with its own shard ``logits_shard[..., W]`` (global ids ``[vocab_start, vocab_start +
    W)``; widths may differ) and the same ``eligible``, options and ``banned`` (global ids: each rank applies
    those in its range). Returns ``(token, score)``, identical on every rank: ``token`` global ids.
    """
    options = dict(temperature=temperature, score=score, tempered_score=tempered_score, banned=banned)
    if world_size(group) == 1:
        if vocab_start != 0:
            _err(
                f"a world of one holds the whole vocabulary, so vocab_start must be 0; got {vocab_start}",
                ValueError,
            )
        return _single_device(logits_shard, eligible, seed=seed, offset=offset, **options)
    local_error = None
    try:  # every rank reaches the header exchange, so a call this rank cannot run raises on all of them
        arguments = checked_partial_args(
            logits_shard, eligible, vocab_start=vocab_start, seed=seed, offset=offset, **options
        )
        partial_dispatcher.select(logits_shard.device, *arguments)  # a pinned backend that cannot run it
    except (TypeError, ValueError, RuntimeError) as e:
        local_error = e
    # The header travels while this rank reads its shard (only a call that passed its own checks reads).
    headers, arrival = _start_gather(
        _header_tensor(logits_shard, eligible, vocab_start, local_error, seed, offset, group, **options),
        group,
    )
    state = None
    if local_error is None:
        state = logits_to_confidence_partial(
            logits_shard, eligible, vocab_start=vocab_start, seed=seed, offset=offset, **options
        )
    arrival.wait()
    if local_error is not None:
        raise local_error
    vocab_size = _check_headers(headers.cpu())
    states = _all_gather(state, group)
    del options["banned"]
    return logits_to_confidence_merge(states, vocab_size=vocab_size, seed=seed, offset=offset, **options)


def _header_tensor(
    logits, eligible, vocab_start, error, seed, offset, group, temperature, score, tempered_score, banned
):
    """This rank's header: what every rank must agree on, as int64 (tuples of ints, floats and bools hash
    the same in every process), on the device the group's header travels on."""
    header = [0] * _HEADER
    header[_OK] = int(error is None)
    if error is None:
        rows = logits.shape[:-1]
        header[_START], header[_WIDTH] = vocab_start, logits.shape[-1]
        header[_ROWS], header[_SHAPE] = rows.numel(), hash(tuple(rows))
        chosen = (
            temperature,
            SCORES.index(score),
            tempered_score,
            seed,
            offset,
            eligible is None,
            banned is None,
        )
        header[_OPTIONS] = hash(chosen)
        header[_DEVICE] = zlib.crc32(logits.device.type.encode())  # str hashes differ between processes
    return torch.tensor(header, dtype=torch.int64, device=_header_device(group))


def _header_device(group) -> torch.device:
    """CPU where the group has a CPU backend, else the current CUDA device."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _start_gather(t: torch.Tensor, group):
    """``([world, *t.shape], work)``: every rank's contiguous t in rank order once ``work.wait()`` returns
    (gathered flat: gloo's form)."""
    every = t.new_empty(world_size(group) * t.numel())
    work = _all_gather_single(every, t.reshape(-1), group=group, async_op=True)
    return every.view(-1, *t.shape), work


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    every, work = _start_gather(t, group)
    work.wait()
    return every


def _check_headers(headers: torch.Tensor) -> int:
    """The vocabulary size, once the shards tile ``[0, V)`` and every rank agrees on the rows, options and
    device type; else the same error on every rank."""
    rows = headers.tolist()
    bad = [rank for rank, h in enumerate(rows) if not h[_OK]]
    if bad:
        _err(f"rank(s) {bad} rejected their arguments (their own error says why)")
    counts = [h[_ROWS] for h in rows]
    for field, what in (
        (_SHAPE, f"logits.shape[:-1] (rows by rank: {counts})"),
        (
            _OPTIONS,
            "options (temperature, score, tempered_score, seed, offset; eligible, banned given or not)",
        ),
        (_DEVICE, "device type"),
    ):
        if len({h[field] for h in rows}) > 1:
            _err(f"every rank must pass the same {what}; the ranks differ")
    shards = sorted((h[_START], h[_WIDTH]) for h in rows)
    end = 0
    for start, width in shards:
        if start != end:
            layout = [(h[_START], h[_WIDTH]) for h in rows]
            _err(
                "the shards must tile the vocabulary [0, V) without gaps or overlaps; got "
                f"(vocab_start, width) by rank {layout}"
            )
        end = start + width
    return end
