"""Every Triton kernel of the repo compiles ahead of time for an H200 (sm_90) without a GPU, and none spills.

``triton.compile`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for a given target, so
a CPU-only machine checks what the interpreter cannot: that the kernels lower for sm_90 (wgmma, cp.async
pipelining, the constexpr paths the launchers pick) and how many registers they use. The kernels are
compiled in a subprocess: the test suite sets TRITON_INTERPRET=1 on CPU-only machines, and interpreted
kernels cannot be compiled, so the worker imports them afresh with the interpreter off. It compiles into an
empty cache (a cache hit would skip ptxas and its ``-v`` report) with TRITON_DUMP_PTXAS_LOG=1, and reads
registers and spill bytes from that report. Triton 3.9 assembles sm_90 with its bundled ``ptxas-blackwell``
(CUDA 13), which accepts the PTX it emits; no TRITON_PTXAS_PATH is needed.

The configurations are the ones the launchers choose (``block_attention._config`` for the shapes below),
so a launcher change that makes a kernel spill fails here. Run this file directly to print the table.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

# (kernel, label, types of the runtime arguments, constexpr values, compile options); built in the worker.
_TIMEOUT_S = 300


def _attention_cases(ba):
    """The attention kernels at the configs block_attention picks for a 32-token block of a 28/4-head
    model (224 rows: BLOCK_M 128, unsplit, block-causal, with lse) and an 8-token sub-block (56 rows:
    BLOCK_M 64, split KV, no mask), plus a 4-query MHA tile (BLOCK_M 16), for D 64 / 128, fp16 / bf16."""
    import torch

    cases = []
    ints = ("n_queries", "s_max", "n_kv_heads", "block_size")
    strides = [n for n in ba._attn_kernel.arg_names if n.startswith("stride")]
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for head_dim in (64, 128):
            shapes = [(224, 7, False, True), (56, 7, True, False)]
            if dtype == torch.float16 and head_dim == 128:
                shapes.append((4, 1, False, False))
            for n_rows, group, split, causal in shapes:
                block_m, block_n, num_warps, num_stages = ba._config(n_rows, head_dim, dtype)
                types = {n: "*" + name for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
                types |= {n: "*fp32" for n in ("lse_ptr", "ws_o", "ws_lse")}
                types |= {n: "*i32" for n in ("q_start_ptr", "kv_len_ptr")}
                types |= {n: "i32" for n in (*ints, *strides)}
                types["qk_scale"] = "fp32"
                constexprs = dict(
                    GROUP=group,
                    HEAD_DIM=head_dim,
                    BLOCK_D=head_dim,
                    BLOCK_M=block_m,
                    BLOCK_N=block_n,
                    BLOCK_CAUSAL=causal,
                    SPLIT=split,
                    UPCAST=False,
                    PRECISION="tf32",
                )
                if split:
                    constexprs |= dict(o_ptr=None, lse_ptr=None)  # the split pass writes the workspace only
                else:
                    constexprs |= dict(ws_o=None, ws_lse=None)
                label = f"D{head_dim} {name} M{block_m} N{block_n} w{num_warps} s{num_stages}" + (
                    " split" if split else " causal+lse"
                )
                cases.append(
                    (
                        ba._attn_kernel,
                        label,
                        types,
                        constexprs,
                        dict(num_warps=num_warps, num_stages=num_stages),
                    )
                )
            types = {"ws_o": "*fp32", "ws_lse": "*fp32", "o_ptr": "*" + name, "lse_ptr": "*fp32"}
            types |= {n: "i32" for n in ("n_queries", "n_kv_heads", "n_splits")}
            constexprs = dict(
                GROUP=7, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=ba._MERGE_ROWS, UPCAST=False
            )
            cases.append((ba._merge_kernel, f"D{head_dim} {name}", types, constexprs, dict(num_warps=4)))
            types = {n: "*" + name for n in ("k_new", "v_new", "k_cache", "v_cache")}
            types["q_start_ptr"] = "*i32"
            types |= {n: "i32" for n in ba._write_kv_kernel.arg_names if n.startswith(("stride", "n_", "s_"))}
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_I=ba._WRITE_ROWS)
            cases.append((ba._write_kv_kernel, f"D{head_dim} {name}", types, constexprs, dict(num_warps=4)))
    return cases


def _mass_cases(am):
    """attention_mass at the configs its launcher picks: a 32-token block of a 32/8-head model (128 rows per
    KV head: BLOCK_M 64) with masks and a block size, and a one-query decode step (4 rows: BLOCK_M 16), for
    D 64 / 128, fp16 / bf16."""
    import torch

    cases = []
    strides = [n for n in am._mass_kernel.arg_names if n.startswith("stride")]
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for head_dim in (64, 128):
            for n_rows, group, masks, causal in ((128, 4, True, True), (4, 4, False, False)):
                block_m, block_n, num_warps = am._config(n_rows, head_dim, dtype)
                types = {"q_ptr": "*" + name, "k_ptr": "*" + name, "lse_ptr": "*fp32", "mass_ptr": "*fp32"}
                types |= {n: "*i32" for n in ("q_start_ptr", "kv_len_ptr")}
                types |= {n: "*i1" for n in ("query_mask_ptr", "key_mask_ptr")}
                types |= {n: "i32" for n in ("n_queries", "s_max", "n_kv_heads", "block_size", *strides)}
                types["scale"] = "fp32"
                constexprs = dict(
                    GROUP=group,
                    HEAD_DIM=head_dim,
                    BLOCK_D=head_dim,
                    BLOCK_M=block_m,
                    BLOCK_N=block_n,
                    BLOCK_CAUSAL=causal,
                    UPCAST=False,
                    PRECISION="tf32",
                )
                if not masks:
                    constexprs |= dict(query_mask_ptr=None, key_mask_ptr=None)
                label = f"D{head_dim} {name} M{block_m} N{block_n} w{num_warps}" + (
                    " masks+causal" if masks else ""
                )
                cases.append((am._mass_kernel, label, types, constexprs, dict(num_warps=num_warps)))
    return cases


def _sparse24_cases(s24):
    """sparse24_mm / armor_linear at the tiles s24._tiles picks: decode (M <= 16) unsplit and split K,
    M = 64 and prefill tiles, fp16 / bf16; armor's fp32 x (hi / lo MMAs) with the block-diagonal epilogue
    of a 128 block (the widest it fuses); fp32 weights (ieee dot); the split-K reduction with and without
    the epilogue."""
    import torch

    cuda = torch.device("cuda")
    cases = []
    ints = {n: "i32" for n in ("M", "N", "K", "chunk", "stride_xm", "stride_v", "stride_meta", "stride_om")}
    # (label, weight dtype, x dtype, M, wrap_out block, split)
    shapes = [
        ("decode", torch.float16, torch.float16, 1, 0, False),
        ("decode split", torch.float16, torch.float16, 1, 0, True),
        ("decode split", torch.bfloat16, torch.bfloat16, 16, 0, True),
        ("M64", torch.float16, torch.float16, 64, 0, False),
        ("prefill", torch.float16, torch.float16, 4096, 0, False),
        ("prefill", torch.bfloat16, torch.bfloat16, 4096, 0, False),
        ("armor wrap128", torch.float16, torch.float32, 1, 128, False),
        ("armor wrap128", torch.bfloat16, torch.float32, 4096, 128, False),
        ("armor wrap32 split", torch.bfloat16, torch.float32, 1, 32, True),
        ("fp32", torch.float32, torch.float32, 1, 0, False),
    ]
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for label, w_dtype, x_dtype, m, wrap_bs, split in shapes:
        block_m, block_n, block_k, num_warps, num_stages = s24._tiles(m, w_dtype, wrap_bs, cuda)
        w = names[w_dtype]
        types = {"x_ptr": "*" + names[x_dtype], "values_ptr": "*" + w, "meta_ptr": "*i16", "ws_ptr": "*fp32"}
        types |= {"bias_ptr": "*" + w, "wrap_ptr": "*" + w, "out_ptr": "*" + w} | ints
        constexprs = dict(
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            WRAP_BS=max(wrap_bs, 1),
            SPLIT=split,
            X_SPLIT=x_dtype == torch.float32 and w_dtype != torch.float32,
            UPCAST=False,
            PRECISION="ieee" if w_dtype == torch.float32 else "tf32",
        )
        if split:
            constexprs |= dict(bias_ptr=None, wrap_ptr=None, out_ptr=None)
        else:
            constexprs |= dict(ws_ptr=None)
            if not wrap_bs:
                constexprs |= dict(wrap_ptr=None)
        config = f"{label} {w} M{block_m} N{block_n} K{block_k} s{num_stages}"
        options = dict(num_warps=num_warps, num_stages=num_stages)
        cases.append((s24._sparse24_kernel, config, types, constexprs, options))
        if split:
            types = {"ws_ptr": "*fp32", "bias_ptr": "*" + w, "wrap_ptr": "*" + w, "out_ptr": "*" + w}
            types |= {n: "i32" for n in ("M", "N", "splits", "stride_om")}
            constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, WRAP_BS=max(wrap_bs, 1), UPCAST=False)
            if not wrap_bs:
                constexprs |= dict(wrap_ptr=None)
            config = f"{label} {w} M{block_m} N{block_n}"
            cases.append((s24._sparse24_reduce_kernel, config, types, constexprs, dict(num_warps=4)))
    return cases


def _cases():
    from dllm_kernels.triton_kernels import attention_mass as am
    from dllm_kernels.triton_kernels import block_attention as ba
    from dllm_kernels.triton_kernels import credit_confidence as cc
    from dllm_kernels.triton_kernels import logits_to_confidence as ltc
    from dllm_kernels.triton_kernels import select_unmask as su
    from dllm_kernels.triton_kernels import sparse24_mm as s24

    from dllm_kernels.ops.select_unmask import POLICIES

    cases = []
    # logits_to_confidence: greedy and sampling tiles, whole-row and split (workspace) variants, and a
    # vocabulary shard's state (logits_to_confidence_partial).
    scan_types = {
        "x_ptr": "*bf16",
        "eligible_ptr": "*u8",
        "banned_ptr": "*i64",
        "token_ptr": "*i64",
        "score_ptr": "*fp32",
        "state_ptr": "*fp64",
        "ws_f": "*fp32",
        "ws_i": "*i32",
        "c": "fp32",
        "temperature": "fp32",
        "seed": "i64",
    }
    scan_types |= {n: "i32" for n in ("n_inner", "stride_o", "stride_i", "V", "chunk", "n_banned")}
    scan_types |= {n: "i32" for n in ("off_lo", "off_hi", "col_base", "lead")}
    for score, sample, split, state in (
        ("prob", False, False, False),
        ("neg_entropy", False, True, False),
        ("margin", True, False, False),
        ("random", True, True, False),
        ("margin", True, False, True),
    ):
        block_v = ltc._MAX_BLOCK_V_SAMPLE if sample else ltc._MAX_BLOCK_V
        constexprs = dict(SCORE=score, SAMPLE=sample, SPLIT=split, STATE=state, BLOCK_V=block_v)
        if not split:
            constexprs |= dict(ws_f=None, ws_i=None)
        constexprs |= dict(token_ptr=None, score_ptr=None) if state else dict(state_ptr=None)
        label = f"{score} sample={sample} split={split} state={state} V{block_v}"
        options = dict(num_warps=max(1, min(8, block_v // 256)))
        cases.append((ltc._scan_kernel, label, scan_types, constexprs, options))
    merge_types = {
        "token_ptr": "*i64",
        "score_ptr": "*fp32",
        "state_ptr": "*fp64",
        "c": "fp32",
        "seed": "i64",
    }
    merge_types |= {n: "i32" for n in ("parts", "row_stride", "part_stride", "field_stride", "V")}
    merge_types |= {n: "i32" for n in ("off_lo", "off_hi", "col_base")}
    chunks = {"f_ptr": "*fp32", "i_ptr": "*i32"}
    shards = {"f_ptr": "*fp64", "i_ptr": "*fp64"}
    for score, sample, state, where in (
        ("neg_entropy", False, False, chunks),
        ("prob", True, True, chunks),
        ("margin", True, False, shards),
    ):
        constexprs = dict(SCORE=score, SAMPLE=sample, STATE=state, BLOCK_S=32)
        constexprs |= dict(token_ptr=None, score_ptr=None) if state else dict(state_ptr=None)
        label = f"{score} sample={sample} state={state} {'shards' if where is shards else 'chunks'}"
        cases.append((ltc._merge_kernel, label, merge_types | where, constexprs, dict(num_warps=1)))

    # select_unmask: each policy at a 256-token and a 4096-token row, with the fused commit.
    select_types = {"score_ptr": "*fp32", "eligible_ptr": "*u8", "k_ptr": "*i64", "token_ptr": "*i64"}
    select_types |= {"x_ptr": "*i64", "selected_ptr": "*u8", "count_ptr": "*i32"}
    select_types |= {n: "i32" for n in su._select_kernel.arg_names[7:22]}
    for policy in POLICIES:
        for block_l in (256, 4096):
            constexprs = dict(POLICY=policy, INCLUSIVE=True, BLOCK_L=block_l, LOG_L=block_l.bit_length() - 1)
            options = dict(num_warps=su._num_warps(block_l))
            cases.append((su._select_kernel, f"{policy} L{block_l}", select_types, constexprs, options))

    # credit_confidence's slot epilogue (its scan is _scan_kernel's state variant): 8 slots (default) and 64.
    credit_types = {"x_ptr": "*bf16", "state_ptr": "*fp64", "banned_ptr": "*i64", "tok_ptr": "*i64"}
    credit_types |= {"val_ptr": "*fp32", "token_ptr": "*i64", "score_ptr": "*fp32"}
    credit_types |= {n: "i32" for n in ("n_inner", "stride_o", "stride_i", "V", "n_banned", "S")}
    credit_types |= {n: "i32" for n in ("tok_stride", "val_stride")}
    credit_types |= {n: "fp32" for n in ("alpha", "beta", "gamma")}
    for block_s in (8, 64):
        constexprs = dict(BLOCK_S=block_s)
        cases.append((cc._credit_kernel, f"S{block_s}", credit_types, constexprs, dict(num_warps=1)))

    return cases + _attention_cases(ba) + _sparse24_cases(s24) + _mass_cases(am)


def _compile(fn, types, constexprs, options):
    """triton.compile for sm_90; returns (registers, spill bytes, shared bytes, ptxas notes) from ptxas -v.
    The notes flag C7515 (wgmma serialized: a performance loss, not an error)."""
    import contextlib
    import io

    from triton.backends.compiler import GPUTarget

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types[name]
        if types[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # as the JIT specializes aligned tensors and strides
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v report for {fn.__name__}:\n{text}")
    notes = "wgmma serialized" if "C7515" in text else ""
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2)), kernel.metadata.shared, notes


def _worker(path, part, parts):
    rows = []
    for fn, label, types, constexprs, options in _cases()[part::parts]:
        regs, spill, shared, notes = _compile(fn, types, constexprs, options)
        row = dict(kernel=fn.__name__, config=label, regs=regs, spill=spill, shared=shared, notes=notes)
        rows.append(row | options)
    with open(path, "w") as f:
        json.dump(rows, f)


def _table(rows):
    lines = [f"{'kernel':23s} {'config':44s} {'warps':>5s} {'regs':>4s} {'spill B':>7s} {'smem B':>7s} notes"]
    for r in rows:
        lines.append(
            f"{r['kernel']:23s} {r['config']:44s} {r['num_warps']:5d} {r['regs']:4d} {r['spill']:7d} "
            f"{r['shared']:7d} {r['notes']}"
        )
    return "\n".join(lines)


def _compile_all(tmp):
    """One worker per core, each compiling every parts-th case (the compiles are independent and
    single-threaded); the rows come back in case order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= dict(TRITON_CACHE_DIR=os.path.join(tmp, "cache"), TRITON_DUMP_PTXAS_LOG="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    parts = max(1, min(4, len(os.sched_getaffinity(0))))
    paths = [os.path.join(tmp, f"report{part}.json") for part in range(parts)]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, path, str(part), str(parts)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part, path in enumerate(paths)
    ]
    try:
        outputs = [worker.communicate(timeout=_TIMEOUT_S) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, f"AOT compile failed:\n{out[-4000:]}\n{err[-8000:]}"
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    return [reports[i % parts][i // parts] for i in range(sum(map(len, reports)))]


def test_every_kernel_compiles_for_sm90_without_spills(summary):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")
    with tempfile.TemporaryDirectory() as tmp:
        rows = _compile_all(tmp)
    summary("Triton kernels compiled for sm_90: registers and spills", _table(rows))
    assert {r["kernel"] for r in rows} == {
        "_scan_kernel",
        "_merge_kernel",
        "_credit_kernel",
        "_select_kernel",
        "_attn_kernel",
        "_write_kv_kernel",
        "_sparse24_kernel",
        "_sparse24_reduce_kernel",
        "_mass_kernel",
    }
    spilling = [f"{r['kernel']} {r['config']}: {r['spill']} bytes" for r in rows if r["spill"]]
    assert not spilling, "register spills on sm_90:\n" + "\n".join(spilling)


if __name__ == "__main__":
    if len(sys.argv) == 4:
        _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    else:  # python tests/test_triton_aot.py: compile everything and print the table
        with tempfile.TemporaryDirectory() as tmp:
            print(_table(_compile_all(tmp)))
