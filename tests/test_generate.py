"""The worked example (examples/block_diffusion.py): a whole generation with the library gives the
framework loop's tokens.

Token equality goes through examples/lockstep.py: the two loops run side by side and must agree after
every step. The loops differ in float rounding only (block_attention sums a row over exactly its keys,
SDPA over the left-padded row with the padding masked), so a decision within rounding of a tie may go
either way: there, and only there, the comparison hands the library the framework's tokens and counts a
tie (printed at the end of the run). Fast-dLLM's threshold runs on the default confident head; LLaDA's
fixed-count top-k runs on a head with logit_std 8, where fp32 (the library's probabilities) does not
round the best positions to exactly 1.0 and so leaves the top-k boundary to real differences.
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICES, KERNEL_BACKENDS

import dllm_kernels
from dllm_kernels.ops import block_attention, select_unmask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import block_diffusion as bd
import lockstep

# A small model for the tests: V not a power of two, D = 64 (every attention backend), GQA 2:1.
SMALL = bd.Config(
    vocab_size=3001,
    mask_id=3000,
    eos_id=2999,
    hidden=128,
    heads=2,
    kv_heads=1,
    head_dim=64,
    intermediate=352,
    layers=2,
)
GEN, BLOCK = 48, 16  # three blocks
SHAPE = dict(gen_length=GEN, block_length=BLOCK)
FRAMEWORK = {"fast_dllm": dict(threshold=0.9), "llada": dict(threshold=None, steps=24)}
LIBRARY = {"fast_dllm": dict(recipe="fast_dllm", threshold=0.9), "llada": dict(recipe="llada", steps=24)}
LOGIT_STD = {"fast_dllm": 24.0, "llada": 8.0}


def model_for(recipe="fast_dllm", config=SMALL, device="cpu", dtype=torch.float32):
    seed = int(torch.randint(2**31, ()))
    return bd.TinyDLM(
        dataclasses.replace(config, logit_std=LOGIT_STD[recipe]), seed=seed, device=device, dtype=dtype
    )


def ragged_prompts(config, rows, device="cpu"):
    """Left-padded prompts of random lengths in [1, 24]; the first row is 24 long and the second 1."""
    lengths = torch.randint(1, 25, (rows,))
    lengths[0] = 24
    if rows > 1:
        lengths[1] = 1
    generator = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    return bd.make_prompts(config, lengths.tolist(), generator, device)


def runs_the_model(backend, model):
    """Whether ``backend`` takes every op of a generation with ``model`` (its dtype and head dim)."""
    c, weight = model.config, model.lm_head.weight
    q = weight.new_zeros(1, 1, c.heads, c.head_dim)
    kv = weight.new_zeros(1, 1, c.kv_heads, c.head_dim)
    lengths = torch.zeros(1, dtype=torch.int32, device=weight.device)
    attention = block_attention.dispatcher.why_not(
        backend, weight.device, q, kv, kv, lengths, lengths, None, None, explicit=True
    )
    selection = select_unmask.dispatcher.why_not(backend, weight.device, q.float(), explicit=True)
    return attention is None and selection is None


def compare(model, prompt, attention_mask, recipe, cache, summary, eos_stop=False, **library):
    common = dict(SHAPE, cache=cache, eos_stop=eos_stop)
    result = lockstep.compare(
        model,
        prompt,
        attention_mask,
        framework={**common, **FRAMEWORK[recipe]},
        library={**common, **LIBRARY[recipe], **library},
    )
    # Near ties are rare; a loop that differed everywhere at small margins would be a bug, not rounding.
    assert len(result.ties) <= max(1, result.framework_steps // 4), f"near ties at steps {result.ties}"
    if result.ties:
        summary(
            "generate: steps where a near tie went another way (the library took the framework's tokens)",
            f"{recipe}, {cache} cache, B = {len(prompt)}: steps {result.ties} of {result.framework_steps}",
        )
    assert result.same
    return result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", bd.CACHES)
@pytest.mark.parametrize("recipe", ["fast_dllm", "llada"])
def test_library_loop_generates_the_framework_tokens(recipe, cache, device, summary):
    model = model_for(recipe, device=device)
    prompt, attention_mask = ragged_prompts(SMALL, 4, device)
    result = compare(model, prompt, attention_mask, recipe, cache, summary)
    masked = result.library[:, prompt.shape[1] :] == SMALL.mask_id
    assert not masked.any(), "a generation ends with every position decided"
    assert torch.equal(result.library[:, : prompt.shape[1]], prompt), "the prompt is never written"


def test_llada_vocabulary(summary):
    """The default model (LLaDA's 126464-token vocabulary and ids), one row alone and two ragged ones."""
    model = model_for(config=bd.Config(layers=1))
    for rows in (1, 2):
        prompt, attention_mask = ragged_prompts(model.config, rows)
        compare(model, prompt, attention_mask, "fast_dllm", "dual", summary)


def test_sparse_mlp(summary):
    """2:4 MLP projections: the framework multiplies the pruned dense weights, the library Sparse24Linear."""
    model = model_for().prune_mlp_24()
    prompt, attention_mask = ragged_prompts(SMALL, 3)
    for cache in ("prefix", "dual"):
        compare(model, prompt, attention_mask, "fast_dllm", cache, summary, sparse_mlp=True)


def test_compiled_step_has_no_graph_break(summary):
    """torch.compile(fullgraph=True) of the library step, through every window shape of a generation:
    a graph break or a host sync inside the step fails the compile."""
    model = model_for()
    prompt, attention_mask = ragged_prompts(SMALL, 3)
    for cache in bd.CACHES:
        torch._dynamo.reset()  # each scheme compiles its own window shapes
        compare(model, prompt, attention_mask, "fast_dllm", cache, summary, compile="aot_eager")


def test_eos_stops_a_row(summary):
    """A row stops at the end of the block where it generated EOS (every later position becomes EOS), and a
    batch whose rows all stopped runs no further block. EOS is a token the loops generate in row 0's first
    block without a stop (the same computation up to that block's end), so the premise holds for every
    draw."""
    model = model_for()
    config = model.config
    prompt, attention_mask = ragged_prompts(SMALL, 3)
    width = prompt.shape[1]

    def stop_at_a_generated_token(x):
        model.config = dataclasses.replace(config, eos_id=int(x[0, width + int(torch.randint(BLOCK, ()))]))
        return model.config.eos_id

    for cache in bd.CACHES:
        model.config = config
        eos = stop_at_a_generated_token(
            compare(model, prompt, attention_mask, "fast_dllm", cache, summary).library
        )
        generated = compare(model, prompt, attention_mask, "fast_dllm", cache, summary, eos_stop=True).library
        generated = generated[:, width:]
        for row in generated:
            hits = (row == eos).nonzero().flatten()
            if len(hits):
                assert (row[hits[0] :] == eos).all(), "everything after a row's first EOS is EOS"
        assert (generated[0] == eos).nonzero()[0] < BLOCK, "row 0 stops in its first block"

        model.config = config
        blocks = []
        alone = dict(SHAPE, cache=cache)
        x = bd.library_generate(
            model,
            prompt[:1],
            attention_mask[:1],
            on_step=lambda g, blocks=blocks: blocks.append(g.block_index),
            **alone,
        )
        stop_at_a_generated_token(x)
        stats = bd.Stats()
        bd.library_generate(model, prompt[:1], attention_mask[:1], eos_stop=True, stats=stats, **alone)
        assert stats.steps == blocks.count(0), "a batch whose rows all stopped runs no further block"


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_gives_the_same_tokens_on_every_backend(device):
    """temperature > 0 with random remasking: tokens and scores come from decode_step's counter-based
    generator, keyed by (seed, step, row, token), so every backend draws the same ones (they could part only
    where two noisy logits of a row lie within the backends' rounding of each other)."""
    model = model_for("llada", device=device)
    prompt, attention_mask = ragged_prompts(SMALL, 2, device)
    options = dict(gen_length=32, block_length=16, recipe="llada", steps=8, temperature=1.0, seed=7)
    options.update(remasking="random")
    with dllm_kernels.use_backend("reference"):
        want = bd.library_generate(model, prompt, attention_mask, **options)
    for backend in KERNEL_BACKENDS:
        if not runs_the_model(backend, model):
            continue
        with dllm_kernels.use_backend(backend):
            got = bd.library_generate(model, prompt, attention_mask, **options)
        assert torch.equal(got, want), f"{backend} draws other tokens than the reference"
    other = bd.library_generate(model, prompt, attention_mask, **{**options, "seed": 8})
    assert not torch.equal(other, want), "another seed draws other tokens"


@pytest.mark.parametrize("recipe", ["fast_dllm_v2", "dream"])
def test_shifted_recipes_read_the_logits_before_each_position(recipe, summary):
    """Without a cache, every library step of a shifted recipe equals decode_step on the framework forward's
    logits of the window [s - 1, e) (position j predicted at j - 1), from the same tokens. As in the
    lockstep comparison, a row may differ only at a near tie, where the test goes on from the expected
    tokens."""
    model = model_for("llada")  # logit_std 8: dream's top-k boundary is not left to fp32 saturation
    prompt, attention_mask = ragged_prompts(SMALL, 3)
    width = prompt.shape[1]
    mask_id = SMALL.mask_id
    padded_mask, position_ids = bd.padded_positions(attention_mask, GEN)
    options = dict(steps=24) if dllm_kernels.decode.requires_k(recipe) else {}
    threshold = None if options else 0.95
    state = torch.cat([prompt, torch.full((len(prompt), GEN), mask_id)], dim=1)
    ties = 0

    def check(generation):
        nonlocal state, ties
        start = width + generation.block_index * BLOCK
        logits, _ = model.forward_framework(state, position_ids, padded_mask)
        expected = state.clone()
        window = expected[:, start - 1 : start + BLOCK]
        k = {"k": generation.k.clone()} if options else {}
        dllm_kernels.decode_step(
            logits[:, start - 1 : start + BLOCK], window, window == mask_id, recipe=recipe, **k
        )
        got = generation.tokens()
        if not torch.equal(got, expected):
            block = slice(start, start + BLOCK)
            row_margins = lockstep.margins(
                logits[:, start - 1 : start + BLOCK - 1],
                state[:, block] == mask_id,
                generation.k,
                threshold,
                expected[:, block] != state[:, block],
            )
            for row in (got != expected).any(1).nonzero().flatten().tolist():
                assert lockstep.near_tie(row_margins[row]), (
                    f"row {row}: the library's step differs from decode_step on the full logits, "
                    f"{row_margins[row]} (logits, probabilities) from a tie"
                )
            ties += 1
            generation.set_tokens(expected)
        state = expected

    x = bd.library_generate(
        model,
        prompt,
        attention_mask,
        cache="none",
        recipe=recipe,
        on_step=check,
        **SHAPE,
        **options,
    )
    assert torch.equal(x, state)
    assert not (x[:, width:] == mask_id).any()
    if ties:
        summary("generate: shifted recipes, steps decided at a near tie", f"{recipe}: {ties}")


@pytest.mark.gpu
def test_cuda_step_never_syncs_and_replays_exactly():
    """On CUDA: a step (forward, logits of the block, decode_step, commit) makes no synchronizing call, and
    generations replayed from CUDA graphs equal the eager one bit for bit (bf16: the CUDA attention kernel).
    """
    model = model_for(device="cuda", dtype=torch.bfloat16)
    prompt, attention_mask = ragged_prompts(SMALL, 4, "cuda")
    options = dict(SHAPE, cache="dual", recipe="fast_dllm")
    generation = bd.LibraryGeneration(model, *prompt.shape, cuda_graph=False, **options)
    generation.load(prompt, attention_mask)
    generation.set_block(0)
    with torch.no_grad():
        generation.step(True, 0)  # compiles and allocates
        generation.step(False, 0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            generation.step(True, 0)
            generation.step(False, 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    eager = bd.library_generate(model, prompt, attention_mask, cuda_graph=False, **options)
    graphed = bd.LibraryGeneration(model, *prompt.shape, cuda_graph=True, **options)
    for _ in range(2):  # the second generation replays the first one's graphs
        assert torch.equal(graphed.generate(prompt, attention_mask), eager)


@pytest.mark.parametrize(
    "recipe", ["dream", "fast_dllm_v2", "sdar", "dparallel", "prophet", "local_leap", "hierarchy", "credit"]
)
@pytest.mark.parametrize("cache", bd.CACHES)
def test_every_recipe_completes_a_generation(recipe, cache):
    """The recipes the framework loop does not transcribe: every block is decided, the prompt is kept, and a
    fixed-count recipe takes exactly its steps."""
    model = model_for()
    prompt, attention_mask = ragged_prompts(SMALL, 3)
    stats = bd.Stats()
    options = dict(steps=24) if dllm_kernels.decode.requires_k(recipe) else {}
    if recipe == "prophet":
        options.update(mask_id=SMALL.mask_id, gap_threshold=5.0)
    x = bd.library_generate(
        model,
        prompt,
        attention_mask,
        cache=cache,
        recipe=recipe,
        stats=stats,
        **SHAPE,
        **options,
    )
    assert torch.equal(x[:, : prompt.shape[1]], prompt)
    assert not (x[:, prompt.shape[1] :] == SMALL.mask_id).any()
    if "steps" in options:
        assert stats.steps == 24


def test_errors():
    model = model_for()
    prompt, attention_mask = ragged_prompts(SMALL, 2)
    generate = lambda **options: bd.library_generate(model, prompt, attention_mask, **options)
    with pytest.raises(ValueError, match="cache must be one of"):
        generate(cache="paged")
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(gen_length=40, block_length=16)
    with pytest.raises(ValueError, match="steps must be a positive multiple of the 2 blocks"):
        generate(recipe="llada", steps=3)
    with pytest.raises(ValueError, match="prune_mlp_24"):
        generate(sparse_mlp=True)
    with pytest.raises(ValueError, match="cuda_graph needs the model on a CUDA device"):
        generate(cuda_graph=True)
    with pytest.raises(ValueError, match="greedy steps only"):
        generate(compile="aot_eager", temperature=0.5)
    with pytest.raises(ValueError, match="greedy steps only"):  # sdar samples by default
        generate(compile="aot_eager", recipe="sdar", steps=4)
    with pytest.raises(ValueError, match="times eager steps"):
        generate(compile="aot_eager", stats=bd.Stats(timed=True))
    with pytest.raises(ValueError, match="dllm::decode_step: recipe must be one of"):
        generate(recipe="nope")
    with pytest.raises(ValueError, match="left padding"):
        bd.library_generate(model, prompt, attention_mask.flip(1))
    with pytest.raises(ValueError, match="needs rows with a prompt; got 2 rows 0 wide"):
        bd.library_generate(model, prompt[:, :0], attention_mask[:, :0])
    with pytest.raises(ValueError, match=r"prompt and attention_mask must be \[2, 24\]"):
        bd.LibraryGeneration(model, 2, 24).generate(prompt[:1], attention_mask[:1])
