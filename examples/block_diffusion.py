"""A whole block-diffusion generation, written twice: as the frameworks write it, and with dllm-kernels.

This file is the worked example of wiring the ops into a model. It holds:

- ``TinyDLM``: a small diffusion LM with the LLaDA / Dream architecture (RMSNorm, RoPE, GQA, SwiGLU,
  bidirectional attention, a mask token, LLaDA's 126464-token vocabulary), random weights from a seed.
- ``framework_generate``: the loop of Fast-dLLM v1's ``llada/generate.py`` (``generate``,
  ``generate_with_prefix_cache``, ``generate_with_dual_cache``), batched with left padding the way LLaDA's
  ``generate`` takes an ``attention_mask``: SDPA with a dense mask, past K/V concatenated or replaced in
  place, logits for every query position, the ``[B, L, V]`` fp64 softmax and a Python loop over rows with
  host syncs (``get_transfer_index``).
- ``library_generate`` (``LibraryGeneration`` to reuse one across generations): the same generation with
  ``dllm_kernels``. Each line the library replaces is named where it happens (search for "replaces"):

  ==========================================  ==============================================================
  framework                                   library
  ==========================================  ==============================================================
  left padding + a ``[B, 1, 1, L]`` key mask  ragged rows: per-row ``q_start`` / ``kv_len``, no pad keys
  ``repeat_kv`` + SDPA with a dense mask      ``block_attention`` (GQA in the kernel, no mask)
  ``torch.cat(past, new)`` / in-place replace ``block_attention(k_new=, v_new=)`` writes the cache
  logits for every query position            the LM head on the rows the step decides only
  ``get_transfer_index``: fp64 softmax,       ``decode_step(recipe=...)``: one pass over each eligible row,
  ``topk`` per row, ``.item()`` syncs         no host sync
  ``while (x == mask).sum() > 0`` per step    fixed-step recipes: no check; threshold recipes: a check the
                                              GPU runs one step ahead of (CPU: free)
  dense MLP                                   ``Sparse24Linear`` (``sparse_mlp=True``)
  ==========================================  ==============================================================

With greedy decoding and the same cache scheme both loops produce the same tokens, up to decisions within
float rounding of a tie (examples/lockstep.py, which tests/test_generate.py and the benchmark run, tells
them apart); ``make bench BENCH_ARGS="--op generate"`` measures both. Run this file for a demo::

    python examples/block_diffusion.py --batch 8 --cache dual
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import dllm_kernels
from dllm_kernels import schedules
from dllm_kernels.nn import Sparse24Linear

CACHES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 126464  # LLaDA's
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 688  # SwiGLU width, a multiple of 16 for the 2:4 layers
    rope_theta: float = 500000.0  # LLaDA's
    norm_eps: float = 1e-5
    mask_id: int = 126336  # LLaDA's [MASK]
    eos_id: int = 126081  # LLaDA's <|endoftext|>, also its left padding
    # Standard deviation of a random-weight logit. A trained model is confident on most positions and a random
    # one is not; at 24 the top-1 probability spreads over (0.4, 1) and Fast-dLLM's 0.9 threshold commits
    # about 5 tokens a step, as it does with LLaDA on GSM8K.
    logit_std: float = 24.0
    # Scale of the q and k projections: at 3 each position attends to a few others, as in a trained model,
    # so masked positions predict different tokens (at 1 a block's predictions repeat a few tokens).
    attention_sharpness: float = 3.0


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, h):
        normed = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(h.dtype)


class Layer(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        linear = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.attn_norm, self.mlp_norm = RMSNorm(c.hidden, c.norm_eps), RMSNorm(c.hidden, c.norm_eps)
        self.q_proj = linear(c.hidden, c.heads * c.head_dim)
        self.k_proj = linear(c.hidden, c.kv_heads * c.head_dim)
        self.v_proj = linear(c.hidden, c.kv_heads * c.head_dim)
        self.o_proj = linear(c.heads * c.head_dim, c.hidden)
        self.gate_proj, self.up_proj = linear(c.hidden, c.intermediate), linear(c.hidden, c.intermediate)
        self.down_proj = linear(c.intermediate, c.hidden)
        self.sparse_mlp: torch.nn.ModuleDict | None = None  # Sparse24Linear copies, after prune_mlp_24()

    def mlp(self, h, sparse: bool):
        if sparse:  # replaces the dense projections: sparse24_mm reads 9/16 of the weight bytes
            gate, up, down = (self.sparse_mlp[name] for name in ("gate_proj", "up_proj", "down_proj"))
        else:
            gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        return down(F.silu(gate(h)) * up(h))


def rope(t: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``t`` ``[B, S, H, D]`` at integer ``positions`` ``[B, S]``."""
    half = t.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * inv_freq  # [B, S, D/2]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    t1, t2 = t.float()[..., :half], t.float()[..., half:]
    return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1).to(t.dtype)


class TinyDLM(torch.nn.Module):
    """A LLaDA / Dream-shaped diffusion LM with random weights from ``seed`` (no download).

    ``forward_framework`` is how the Hugging Face models (and Fast-dLLM's patched LLaDA) run attention;
    ``forward_library`` runs it with ``block_attention``. Everything else is one piece of code for both."""

    def __init__(self, config: Config = Config(), *, seed: int = 0, dtype=torch.float32, device="cpu"):
        super().__init__()
        c = self.config = config
        self.embed = torch.nn.Embedding(c.vocab_size, c.hidden)
        self.layers = torch.nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.norm_eps)
        self.lm_head = torch.nn.Linear(c.hidden, c.vocab_size, bias=False)
        generator = torch.Generator().manual_seed(seed)
        # Scales that make random weights behave like a trained model's where a generation can tell:
        # sharp attention, layers that perturb the residual stream (o, down), a [MASK] embedding that
        # carries little of its own, and a confident head.
        scale = {
            "q_proj": c.attention_sharpness,
            "k_proj": c.attention_sharpness,
            "o_proj": 0.5,
            "down_proj": 0.5,
            "lm_head": c.logit_std,
        }
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    continue
                fan_in = 1 if name == "embed.weight" else p.shape[1]
                std = scale.get(name.split(".")[-2], 1.0)
                p.copy_(torch.randn(p.shape, generator=generator) * std / math.sqrt(fan_in))
            self.embed.weight[c.mask_id] *= 0.1
            # A trained model never predicts [MASK]; its logit here is 0, far below any row's maximum.
            self.lm_head.weight[c.mask_id] = 0
        self.to(dtype=dtype, device=device)

    @torch.no_grad()
    def prune_mlp_24(self):
        """Prunes every MLP projection to 2:4 (largest |w| of each 4) and keeps a ``Sparse24Linear`` copy of
        each for the library loop; the dense layers keep the pruned weights (zeros), so both loops compute
        the same function."""
        for layer in self.layers:
            layer.sparse_mlp = torch.nn.ModuleDict()
            for name in ("gate_proj", "up_proj", "down_proj"):
                dense = getattr(layer, name)
                dense.weight.mul_(dllm_kernels.prune_24(dense.weight))
                layer.sparse_mlp[name] = Sparse24Linear.from_linear(dense)
        return self

    def _layers(self, tokens, positions, attend, sparse_mlp=False):
        """The transformer body. ``attend(index, q, k, v)`` is the attention of layer ``index``: ``q``
        ``[B, S, Hq, D]``, ``k``, ``v`` ``[B, S, Hkv, D]`` (after RoPE) -> ``[B, S, Hq, D]``."""
        c = self.config
        h = self.embed(tokens)
        n_rows, n_tokens = tokens.shape
        for index, layer in enumerate(self.layers):
            a = layer.attn_norm(h)
            q = rope(layer.q_proj(a).view(n_rows, n_tokens, c.heads, c.head_dim), positions, c.rope_theta)
            k = rope(layer.k_proj(a).view(n_rows, n_tokens, c.kv_heads, c.head_dim), positions, c.rope_theta)
            v = layer.v_proj(a).view(n_rows, n_tokens, c.kv_heads, c.head_dim)
            h = h + layer.o_proj(attend(index, q, k, v).reshape(n_rows, n_tokens, -1))
            h = h + layer.mlp(layer.mlp_norm(h), sparse_mlp)
        return self.norm(h)

    def forward_framework(self, tokens, positions, key_mask, past=None, replace_start=None):
        """The frameworks' forward: logits ``[B, S, V]`` for every token and the layers' K/V
        ``[B, Hkv, T, D]``. ``key_mask`` ``[B, T]`` is False at left padding. ``past`` (a K/V pair per
        layer) is either a prefix the new tokens follow (prefix cache: concatenated) or, with
        ``replace_start``, the whole sequence whose slots from ``replace_start`` the new K/V replace in
        place (dual cache)."""
        c = self.config
        group = c.heads // c.kv_heads
        present = []

        def attend(index, q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
            if past is not None and replace_start is None:
                k, v = torch.cat((past[index][0], k), dim=2), torch.cat((past[index][1], v), dim=2)
            elif past is not None:
                end = replace_start + q.shape[2]
                past[index][0][:, :, replace_start:end] = k
                past[index][1][:, :, replace_start:end] = v
                k, v = past[index]
            present.append((k, v))
            # Hugging Face's repeat_kv, then a dense boolean mask over every key
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
            return out.transpose(1, 2)

        hidden = self._layers(tokens, positions, attend)
        return self.lm_head(hidden), present

    def forward_library(self, tokens, q_start, kv_len, caches, logit_rows, sparse_mlp=False):
        """The library's forward: ``tokens`` ``[B, W]`` sit at positions ``q_start[b] + i`` of each row's
        cache (ragged rows, no padding); their K/V are written there and they attend to keys
        ``[0, kv_len[b])``. Logits only for the window rows ``logit_rows`` ``[B, R]``."""
        positions = q_start.long()[:, None] + torch.arange(tokens.shape[1], device=tokens.device)

        def attend(index, q, k, v):
            # replaces repeat_kv + the dense mask + SDPA + the cache update
            out, _ = dllm_kernels.block_attention(
                q, caches[index][0], caches[index][1], q_start, kv_len, k_new=k, v_new=v
            )
            return out

        hidden = self._layers(tokens, positions, attend, sparse_mlp)
        rows = hidden.gather(1, logit_rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(rows)  # replaces logits for every query position

    def new_caches(self, n_rows: int, length: int):
        c = self.config
        shape = (n_rows, length, c.kv_heads, c.head_dim)
        p = self.lm_head.weight
        return [
            (
                torch.zeros(shape, dtype=p.dtype, device=p.device),
                torch.zeros(shape, dtype=p.dtype, device=p.device),
            )
            for _ in range(c.layers)
        ]


def make_prompts(config: Config, lengths: list[int], generator: torch.Generator | None = None, device="cpu"):
    """Random prompts of the given lengths, left-padded with EOS as LLaDA's tokenizer pads them:
    ``(prompt [B, P], attention_mask [B, P])`` with ``P = max(lengths)``."""
    width = max(lengths)
    prompt = torch.full((len(lengths), width), config.eos_id, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, config.vocab_size - 2, (n,), generator=generator)
        tokens += tokens >= min(config.mask_id, config.eos_id)  # skip the special ids (both near the top)
        tokens += tokens >= max(config.mask_id, config.eos_id)
        prompt[row, width - n :] = tokens
        attention_mask[row, width - n :] = True
    return prompt.to(device), attention_mask.to(device)


@dataclass
class Stats:
    """What a generation did: forward passes, and (``timed=True``) wall time split between the model's
    forward and the decode step (selection and commit)."""

    steps: int = 0
    forward_s: float = 0.0
    decode_s: float = 0.0
    timed: bool = False
    _device: torch.device | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.timed:
            yield
            return
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        start = time.perf_counter()
        yield
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        setattr(self, f"{name}_s", getattr(self, f"{name}_s") + time.perf_counter() - start)


def padded_positions(attention_mask: torch.Tensor, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frameworks' key mask ``[B, P + gen_length]`` (the prompt's, then every generated position) and
    RoPE positions ``cumsum(mask) - 1``: a row's first real token is position 0 whatever its padding."""
    generated = torch.ones(len(attention_mask), gen_length, dtype=torch.bool, device=attention_mask.device)
    attention_mask = torch.cat([attention_mask.bool(), generated], dim=-1)
    return attention_mask, (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _steps_per_block(steps: int | None, gen_length: int, num_blocks: int) -> int:
    """Fixed-count decoding: ``steps`` in all (default one a token), the same number in every block."""
    steps = gen_length if steps is None else steps
    if steps < num_blocks or steps % num_blocks:
        raise ValueError(f"steps must be a positive multiple of the {num_blocks} blocks; got {steps}")
    return steps // num_blocks


def _check_lengths(gen_length: int, block_length: int, cache: str):
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}; got {cache!r}")
    if block_length < 1 or gen_length % block_length:
        raise ValueError(
            f"gen_length must be a multiple of block_length; got {gen_length} and {block_length}"
        )


# ---------------------------------------------------------------------------------------------------------
# The framework loop: Fast-dLLM v1's llada/generate.py, with LLaDA's attention_mask for left padding.
# ---------------------------------------------------------------------------------------------------------


def add_gumbel_noise(logits, temperature):
    """LLaDA's: Gumbel-max in fp64 as exp(l) / (-log u)^T."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_transfer_index(logits, temperature, mask_index, x, num_transfer_tokens, threshold=None):
    """Fast-dLLM's (low_confidence remasking): the step's tokens and which positions take them."""
    logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j])
        transfer_index[j, select_index] = True
        if threshold is not None:
            for k in range(1, num_transfer_tokens[j]):
                if confidence[j, select_index[k]] < threshold:
                    transfer_index[j, select_index[k]] = False
    return x0, transfer_index


def _framework_eos_stop(x, prompt_width, block_end, eos_id, finished):
    """Per row: after a block, everything past the first generated EOS becomes EOS and the row stops."""
    for j in range(x.shape[0]):
        hits = (x[j, prompt_width:block_end] == eos_id).nonzero()
        if len(hits) > 0:
            x[j, prompt_width + int(hits[0]) :] = eos_id
            finished[j] = True


@torch.no_grad()
def framework_generate(
    model: TinyDLM,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    gen_length: int = 64,
    block_length: int = 32,
    cache: str = "dual",
    steps: int | None = None,
    threshold: float | None = 0.9,
    temperature: float = 0.0,
    eos_stop: bool = False,
    stats: Stats | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
):
    """Greedy (or Gumbel) low-confidence decoding as Fast-dLLM runs it: ``threshold`` (Fast-dLLM) or, with
    ``threshold=None``, ``steps`` in all with LLaDA's fixed counts per step. ``cache``: ``"none"`` (a full
    forward every step), ``"prefix"`` (``generate_with_prefix_cache``) or ``"dual"``
    (``generate_with_dual_cache``). ``on_step(x)`` sees the tokens after each step. Returns ``x``
    ``[B, P + gen_length]``."""
    _check_lengths(gen_length, block_length, cache)
    c = model.config
    stats = stats or Stats()
    stats._device = prompt.device
    n_rows, width = prompt.shape
    x = torch.full((n_rows, width + gen_length), c.mask_id, dtype=torch.long, device=prompt.device)
    x[:, :width] = prompt.clone()
    attention_mask, position_ids = padded_positions(attention_mask, gen_length)
    num_blocks = gen_length // block_length
    steps_per_block = _steps_per_block(steps, gen_length, num_blocks) if threshold is None else 1
    finished = torch.zeros(n_rows, dtype=torch.bool, device=prompt.device)
    for num_block in range(num_blocks):
        start, end = width + num_block * block_length, width + (num_block + 1) * block_length
        # LLaDA's get_num_transfer_tokens (schedules reproduces it)
        num_transfer_tokens = schedules.llada_transfer_counts(
            (x[:, start:end] == c.mask_id).sum(1), steps_per_block
        )
        i = 0
        past = None
        while True:
            if (x[:, start:end] == c.mask_id).sum() == 0:
                break
            with stats.phase("forward"):
                if cache == "none" or i == 0:  # the whole sequence (and, with a cache, its K/V)
                    logits, present = model.forward_framework(x, position_ids, attention_mask)
                    view_start, view = 0, x
                    if cache == "prefix":
                        past = [(k[:, :, :start], v[:, :, :start]) for k, v in present]
                    elif cache == "dual":
                        past = present
                elif cache == "prefix":  # the block and everything after it, over the cached prefix
                    view_start, view = start, x[:, start:]
                    logits, _ = model.forward_framework(view, position_ids[:, start:], attention_mask, past)
                else:  # the block, over the whole cached sequence, its own slots replaced
                    view_start, view = start, x[:, start:end]
                    logits, _ = model.forward_framework(
                        view, position_ids[:, start:end], attention_mask, past, replace_start=start
                    )
            with stats.phase("decode"):
                mask_index = view == c.mask_id
                mask_index[:, end - view_start :] = False  # nothing past the block
                k = None if threshold is not None else num_transfer_tokens[:, i]
                x0, transfer_index = get_transfer_index(logits, temperature, mask_index, view, k, threshold)
                view[transfer_index] = x0[transfer_index]
            i += 1
            stats.steps += 1
            if on_step is not None:
                on_step(x)
        if eos_stop:
            _framework_eos_stop(x, width, end, c.eos_id, finished)
            if finished.all():
                break
    return x


# ---------------------------------------------------------------------------------------------------------
# The library loop.
# ---------------------------------------------------------------------------------------------------------


class _BlockDoneCheck:
    """Whether every row's block is complete, read without stalling the device: on CUDA the flag of step
    ``i`` is copied to pinned memory behind the step and read after step ``i + 1`` is queued (so a block
    may run one extra step, which selects nothing); on CPU the flag is there already."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flags = (
            [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(2)] if self.cuda else []
        )
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        self.pending = None

    def reset(self):
        self.pending = None

    def after_step(self, block_has_mask: torch.Tensor, step: int) -> bool:
        """Called after each step is queued; True when a block is known to be complete."""
        if not self.cuda:
            return not bool(block_has_mask)
        slot = step % 2
        self.flags[slot].copy_(block_has_mask, non_blocking=True)
        self.events[slot].record()
        previous, self.pending = self.pending, slot
        if previous is None:
            return False
        self.events[previous].synchronize()  # the step before this one: done while this one runs
        return not bool(self.flags[previous])


class LibraryGeneration:
    """The library loop: its buffers, its step and the loop over blocks, reusable across generations of one
    shape (``B`` rows, prompts ``P`` wide), so that captured CUDA graphs and compiled steps are too.

    ``step(full, offset)`` (the forward over the window, logits for the block, ``decode_step``, the commit)
    has no host sync and no graph break: ``compile`` (a ``torch.compile`` backend name) compiles it with
    ``fullgraph=True``, and with ``cuda_graph`` it is captured once per window shape and replayed. Everything
    a step reads is a buffer updated in place (``x``, the caches, ``block_start``, ``k``)."""

    def __init__(
        self,
        model: TinyDLM,
        n_rows: int,
        prompt_width: int,
        *,
        gen_length: int = 64,
        block_length: int = 32,
        cache: str = "dual",
        recipe: str = "fast_dllm",
        sparse_mlp: bool = False,
        cuda_graph: bool | None = None,
        compile: str | None = None,
        **options,
    ):
        _check_lengths(gen_length, block_length, cache)
        if sparse_mlp and model.layers[0].sparse_mlp is None:
            raise ValueError("sparse_mlp=True needs model.prune_mlp_24() first")
        device = model.lm_head.weight.device
        self.model, self.cache, self.recipe, self.options = model, cache, recipe, options
        self.gen_length, self.block_length, self.sparse_mlp = gen_length, block_length, sparse_mlp
        self.fixed_steps = dllm_kernels.decode.requires_k(recipe)
        self.shift = 1 if recipe in dllm_kernels.decode.SHIFTED_RECIPES else 0  # j predicted at j - 1
        # A step's random numbers are keyed by its index (decode_step's int offset), which a captured graph
        # would replay and a compiled step would specialise on.
        self.sampling = dllm_kernels.decode.draws_random(recipe, **options)
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and not self.sampling
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device; got {device.type}")
        if self.sampling and (cuda_graph or compile is not None):
            raise ValueError(
                "cuda_graph and compile run greedy steps only (temperature=0, no random remasking)"
            )
        if n_rows < 1 or prompt_width < 1:
            raise ValueError(f"a generation needs rows with a prompt; got {n_rows} rows {prompt_width} wide")
        self.prompt_width, self.length = prompt_width, prompt_width + gen_length
        # replaces left padding and its key mask: each row's tokens are packed to the front (position p
        # of row b is column p), so no key is padding and each row has its own prompt length and end.
        self.prompt = torch.zeros(n_rows, prompt_width, dtype=torch.long, device=device)
        self.x = torch.zeros(n_rows, self.length, dtype=torch.long, device=device)
        self.caches = model.new_caches(n_rows, self.length)
        self.columns = torch.arange(self.length, device=device)
        int32 = dict(dtype=torch.int32, device=device)
        self.prompt_len, self.kv_len = torch.zeros(n_rows, **int32), torch.zeros(n_rows, **int32)
        self.row_start, self.block_start = torch.zeros(n_rows, **int32), torch.zeros(n_rows, **int32)
        self.k = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
        if recipe == "credit":  # CreditDecoding's state: the block's credit slots, reset per block
            self.credit = dllm_kernels.credit_state((n_rows, block_length), device=device)
            self.options = dict(options, credit=self.credit, mask_id=model.config.mask_id)
        self.block_index = 0
        self.compiled = compile is not None
        self._step = torch.compile(self.step, fullgraph=True, backend=compile) if self.compiled else self.step
        self.graphs: dict | None = {} if cuda_graph else None
        self.graph_pool = None
        if cuda_graph:  # one memory pool for every graph: they replay one at a time
            with torch.cuda.device(device):
                self.graph_pool = torch.cuda.graph_pool_handle()

    def load(self, prompt: torch.Tensor, attention_mask: torch.Tensor):
        """Takes new left-padded prompts ``[B, P]`` (``attention_mask`` False at padding), in place."""
        if prompt.shape != self.prompt.shape or attention_mask.shape != prompt.shape:
            raise ValueError(
                f"prompt and attention_mask must be {list(self.prompt.shape)}; got {list(prompt.shape)} "
                f"and {list(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(self.x.device, torch.bool)
        # Checked once a generation (a host sync): packing assumes left padding and a token in every row.
        if not attention_mask[:, -1].all() or (attention_mask.int().diff(dim=1) < 0).any():
            raise ValueError("attention_mask must be left padding: False, then True up to the last column")
        c = self.model.config
        pad = (~attention_mask).sum(1)
        self.prompt.copy_(prompt)
        self.prompt_len.copy_(self.prompt_width - pad)
        self.kv_len.copy_(self.length - pad)
        left_padded = torch.cat([self.prompt, torch.full_like(self.x[:, self.prompt_width :], c.mask_id)], 1)
        packed = left_padded.gather(1, (self.columns + pad[:, None]).clamp(max=self.length - 1))
        # past a row's end: EOS filler, never eligible and never attended to
        self.x.copy_(torch.where(self.columns < self.kv_len[:, None], packed, c.eos_id))
        self.finished.zero_()

    def set_block(self, index: int):
        self.block_index = index
        self.block_start.copy_(self.prompt_len + index * self.block_length)
        if self.recipe == "credit":
            self.credit[0].fill_(-1)
            self.credit[1].zero_()

    def window(self, full: bool) -> tuple[torch.Tensor, int]:
        """``(q_start, width)`` of a step's queries: the whole row, or the cache scheme's window (the
        block, or the block and all after it; from one position earlier for shifted recipes)."""
        if full or self.cache == "none":
            return self.row_start, self.length
        if self.cache == "dual":
            width = self.block_length
        else:
            width = self.gen_length - self.block_index * self.block_length
        return self.block_start - self.shift, width + self.shift

    def positions(self, shift: int) -> torch.Tensor:
        """``[B, block_length + shift]``: the block's positions, from ``shift`` positions earlier."""
        span = torch.arange(self.block_length + shift, device=self.x.device)
        return self.block_start.long()[:, None] - shift + span

    def forward(self, full: bool, decided: torch.Tensor) -> torch.Tensor:
        """Logits of the ``decided`` positions (those a step reads: the block's, one earlier when shifted)
        from a forward over the window."""
        q_start, width = self.window(full)
        queries = q_start.long()[:, None] + torch.arange(width, device=self.x.device)
        tokens = self.x.gather(1, queries)
        rows = decided - q_start.long()[:, None]
        return self.model.forward_library(tokens, q_start, self.kv_len, self.caches, rows, self.sparse_mlp)

    def decode(self, logits: torch.Tensor, decided: torch.Tensor, offset: int):
        x_block = self.x.gather(1, decided)
        eligible = x_block == self.model.config.mask_id
        k = {"k": self.k} if self.fixed_steps else {}
        if self.sampling:
            k["offset"] = offset
        # replaces get_transfer_index: the fp64 [B, L, V] softmax and the per-row topk loop with host syncs
        dllm_kernels.decode_step(logits, x_block, eligible, recipe=self.recipe, **k, **self.options)
        self.x.scatter_(1, decided, x_block)

    def step(self, full: bool, offset: int):
        decided = self.positions(self.shift)
        self.decode(self.forward(full, decided), decided, offset)

    def _replay(self, full: bool, offset: int):
        """The step from a CUDA graph, captured at the second step of its window shape (the first runs
        eagerly and warms the kernels up); every graph shares one memory pool, as one replays at a time."""
        key = (full or self.cache == "none", self.window(full)[1])
        graph = self.graphs.get(key)
        if graph is None:
            self._step(full, offset)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                self._step(full, offset)  # recorded, not run
            self.graphs[key] = graph
            return
        graph.replay()

    def block_masked(self) -> torch.Tensor:
        """``[B]`` masked positions left in each row's block."""
        return (self.x.gather(1, self.positions(0)) == self.model.config.mask_id).sum(1)

    def eos_stop(self):
        """After a block, per row: everything past the first generated EOS becomes EOS and the row stops
        (tensor ops: no sync)."""
        eos_id = self.model.config.eos_id
        generated = (self.columns >= self.prompt_len[:, None]) & (
            self.columns < self.block_start[:, None] + self.block_length
        )
        is_eos = (self.x == eos_id) & generated
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), self.length)
        self.x.masked_fill_(self.columns >= first[:, None], eos_id)
        self.finished |= first < self.length

    def _generated(self) -> torch.Tensor:
        return self.prompt_len.long()[:, None] + torch.arange(self.gen_length, device=self.x.device)

    def tokens(self) -> torch.Tensor:
        """The tokens in the framework's left-padded layout ``[B, P + gen_length]``, read back from the
        packed state (prompt included); the padding is the prompt's."""
        packed = self.columns - (self.prompt_width - self.prompt_len.long())[:, None]
        padding = torch.nn.functional.pad(self.prompt, (0, self.gen_length))
        return torch.where(packed >= 0, self.x.gather(1, packed.clamp(min=0)), padding)

    def set_tokens(self, tokens: torch.Tensor):
        """Takes the generated part of ``tokens`` (left-padded layout) as the current state, in place."""
        self.x.scatter_(1, self._generated(), tokens[:, self.prompt_width :])

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        steps: int | None = None,
        eos_stop: bool = False,
        stats: Stats | None = None,
        on_step: Callable[[LibraryGeneration], None] | None = None,
    ) -> torch.Tensor:
        """One generation from ``prompt``; see ``library_generate``."""
        num_blocks = self.gen_length // self.block_length
        steps_per_block = _steps_per_block(steps, self.gen_length, num_blocks) if self.fixed_steps else 0
        stats = stats or Stats()
        stats._device = self.x.device
        if stats.timed and (self.graphs is not None or self.compiled):
            raise ValueError(
                "stats=Stats(timed=True) times eager steps: build the generation without "
                "cuda_graph and compile"
            )
        device_scope = torch.cuda.device(self.x.device) if self.x.is_cuda else contextlib.nullcontext()
        with device_scope:  # graphs, events and streams of the model's device
            self.load(prompt, attention_mask)
            done = _BlockDoneCheck(self.x.device)
            for index in range(num_blocks):
                self.set_block(index)
                done.reset()
                if self.fixed_steps and self.recipe != "dream":
                    counts = schedules.llada_transfer_counts(self.block_masked(), steps_per_block)
                for i in range(steps_per_block or self.block_length):
                    if self.fixed_steps:
                        if self.recipe == "dream":
                            self.k.copy_(
                                schedules.dream_transfer_count(self.block_masked(), i, steps_per_block)
                            )
                        else:
                            self.k.copy_(counts[:, i])
                    offset = stats.steps if self.sampling else 0
                    if stats.timed:
                        decided = self.positions(self.shift)
                        with stats.phase("forward"):
                            logits = self.forward(i == 0, decided)
                        with stats.phase("decode"):
                            self.decode(logits, decided, offset)
                    elif self.graphs is not None:
                        self._replay(i == 0, offset)
                    else:
                        self._step(i == 0, offset)
                    stats.steps += 1
                    if on_step is not None:
                        on_step(self)
                    if not self.fixed_steps and done.after_step(self.block_masked().sum() > 0, i):
                        break
                if eos_stop:
                    self.eos_stop()
                    if self.finished.all():
                        break
            return self.tokens()


def library_generate(
    model: TinyDLM,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    gen_length: int = 64,
    block_length: int = 32,
    cache: str = "dual",
    recipe: str = "fast_dllm",
    steps: int | None = None,
    eos_stop: bool = False,
    sparse_mlp: bool = False,
    cuda_graph: bool | None = None,
    compile: str | None = None,
    stats: Stats | None = None,
    on_step: Callable[[LibraryGeneration], None] | None = None,
    **options,
):
    """The same generation with dllm-kernels: ``block_attention`` with the same cache scheme and its fused
    K/V write, ``decode_step(recipe=...)`` for every step (any recipe; ``options`` are the recipe's),
    optionally ``Sparse24Linear`` MLP projections (``sparse_mlp``; call ``model.prune_mlp_24()`` first).

    Recipes that take a count ``k`` run ``steps`` steps in all, as LLaDA does (``schedules`` gives the
    counts: Dream's for ``dream``, LLaDA's for the others); the others run until the block is complete.
    ``cuda_graph`` (default: on CUDA for greedy recipes) replays each step from a CUDA graph; ``compile`` (a
    ``torch.compile`` backend name) compiles the step with ``fullgraph=True`` (each window shape compiles
    once, so a process that compiles more shapes than ``torch._dynamo.config.recompile_limit`` fails).
    ``on_step(generation)`` is called after each step (``generation.tokens()`` are the current ones).
    Returns ``x`` ``[B, P + gen_length]`` as ``framework_generate`` does. To run several generations of one
    shape, build a ``LibraryGeneration`` once and call its ``generate``: its graphs are reused.
    """
    generation = LibraryGeneration(
        model,
        *prompt.shape,
        gen_length=gen_length,
        block_length=block_length,
        cache=cache,
        recipe=recipe,
        sparse_mlp=sparse_mlp,
        cuda_graph=False if cuda_graph is None and stats is not None and stats.timed else cuda_graph,
        compile=compile,
        **options,
    )
    return generation.generate(
        prompt, attention_mask, steps=steps, eos_stop=eos_stop, stats=stats, on_step=on_step
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cache", choices=CACHES, default="dual")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM's (recipe fast_dllm)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = TinyDLM(device=args.device)
    lengths = torch.randint(8, 33, (args.batch,), generator=torch.Generator().manual_seed(1)).tolist()
    prompt, attention_mask = make_prompts(
        model.config, lengths, torch.Generator().manual_seed(2), args.device
    )
    common = dict(gen_length=args.gen_length, block_length=args.block_length, cache=args.cache)
    outputs = {}
    for name, generate in (("framework", framework_generate), ("library", library_generate)):
        stats = Stats()
        start = time.perf_counter()
        outputs[name] = generate(
            model, prompt, attention_mask, threshold=args.threshold, stats=stats, **common
        )
        seconds = time.perf_counter() - start
        print(
            f"{name:9s}: {args.batch * args.gen_length / seconds:7.1f} tokens/s, {stats.steps} steps, "
            f"{seconds / stats.steps * 1e3:6.1f} ms a step"
        )
    # Equal unless a decision fell within float rounding of a tie (examples/lockstep.py tells them apart).
    print("same tokens:", torch.equal(outputs["framework"], outputs["library"]))


if __name__ == "__main__":
    main()
