"""``python -m dllm_kernels.bench``: check every op against its reference, then time it beside its baselines.

Each ``benchmarks/bench_<op>.py`` of the source tree defines ``cases(device, quick) -> list[Case]``. For
every case, each backend that can run it is first checked against the reference, then timed with the
case's baselines in the same run. One table is printed (median time, achieved GB/s, TFLOP/s where it
applies, ratio to each baseline) and ``<out>/<device>.json`` plus a PNG plot are written.
"""

import argparse
import datetime
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _backends

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"


@dataclass
class Case:
    op: str
    label: str
    run: Callable[[], object] | None  # calls the public op; the harness pins the backend around it
    check: (
        Callable[[object], None] | None
    )  # raises AssertionError when an output disagrees with the reference
    bytes: int  # bytes that must move: inputs read once, outputs written once
    # backends that can run this case, from the op's dispatcher; None: the automatic choice, unpinned (for
    # a call the compiled kernels take, the path that never enters Python)
    backends: list[str | None]
    baselines: dict[str, Callable[[], object] | None] = field(default_factory=dict)
    baseline_bytes: dict[str, int] = field(default_factory=dict)  # where a baseline moves other bytes
    flops: int | None = None
    baseline_flops: dict[str, int | None] = field(default_factory=dict)  # None: a baseline that only reads
    cuda_graph: bool = False  # on CUDA, time the backends as a replay of one captured call
    # Cases timed by their own code (in a torch.distributed world, or a whole generation):
    # ``timed(min_seconds)`` checks the outputs and returns the median ms of every backend and baseline by
    # name, or (ms, extra) with more figures for the table and the JSON; run and check are then unused.
    timed: Callable[[float], dict[str, float | tuple[float, dict[str, float]]]] | None = None


@dataclass
class Result:
    op: str
    case: str
    impl: str
    kind: str  # "backend" or "baseline"
    median_ms: float
    gbps: float
    tflops: float | None
    ratios: dict[str, float] = field(default_factory=dict)  # baseline time / this time
    extra: dict[str, float] = field(default_factory=dict)  # a timed case's own figures, by column name


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, min_seconds: float, max_reps: int = 200) -> float:
    """Median wall time of fn in ms; on CUDA, events around each call and the L2 flushed in between."""
    for _ in range(3):
        fn()
    _sync(device)
    samples: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        budget = time.perf_counter() + min_seconds
        while len(samples) < max_reps and (len(samples) < 10 or time.perf_counter() < budget):
            flush.zero_()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        budget = time.perf_counter() + min_seconds
        while len(samples) < max_reps and (len(samples) < 5 or time.perf_counter() < budget):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def call_case(op: str, label: str, run: Callable[[], object], baselines: dict, nbytes: int) -> Case:
    """A tiny call, where the per-call cost is the time: the automatic choice (the compiled path: no Python
    between torch's dispatcher and the kernel) and the pinned cpu backend (Python's choice) beside plain
    torch ops on the same tensors. Outputs are checked against the reference."""
    with _backends.use_backend("reference"):
        want = run()
    want = want if isinstance(want, tuple) else (want,)

    def check(out):
        out = out if isinstance(out, tuple) else (out,)
        for got, ref in zip(out, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2, equal_nan=True)

    return Case(op, label, run, check, nbytes, [None, "cpu"], baselines)


def as_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """fn captured once in a CUDA graph; the returned callable replays it (no Python, one launch)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture: compiles, allocates
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def discover(ops: list[str] | None) -> dict[str, object]:
    if not BENCH_DIR.is_dir():
        sys.exit(f"dllm_kernels.bench: no {BENCH_DIR} (run from a source checkout)")
    modules = {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        op = path.stem.removeprefix("bench_")
        if ops and op not in ops:
            continue
        spec = importlib.util.spec_from_file_location(f"dllm_bench_{op}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[op] = module
    unknown = set(ops or ()) - set(modules)
    if unknown:
        sys.exit(f"dllm_kernels.bench: no benchmark for {', '.join(sorted(unknown))}")
    return modules


def measure(
    case: Case, device: torch.device, min_seconds: float, progress: Callable[[str], None]
) -> list[Result]:
    def result(impl, kind, ms):
        ms, extra = ms if isinstance(ms, tuple) else (ms, {})
        gbps = case.baseline_bytes.get(impl, case.bytes) / (ms * 1e-3) / 1e9
        flops = case.baseline_flops.get(impl, case.flops)
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        return Result(case.op, case.label, impl, kind, ms, gbps, tflops, extra=extra)

    if case.timed is not None:
        progress(f"{case.op} {case.label}: check and time")
        times = case.timed(min_seconds)
        results = [result(b, "backend", times[b]) for b in case.backends]
        results += [result(name, "baseline", times[name]) for name in case.baselines]
    else:
        results = _measure_here(case, device, min_seconds, progress, result)
    baseline_ms = {r.impl: r.median_ms for r in results if r.kind == "baseline"}
    for r in results:
        if r.kind == "backend":
            r.ratios = {name: ms / r.median_ms for name, ms in baseline_ms.items()}
    return results


def _measure_here(case: Case, device: torch.device, min_seconds: float, progress, result) -> list[Result]:
    results = []
    for backend in case.backends:
        name = backend or "auto"
        progress(f"{case.op} {case.label}: check {name}")
        with _backends.use_backend(backend):
            case.check(case.run())
            progress(f"{case.op} {case.label}: time {name}")
            run = as_graph(case.run, device) if case.cuda_graph and device.type == "cuda" else case.run
            results.append(result(name, "backend", time_ms(run, device, min_seconds)))
    for name, fn in case.baselines.items():
        progress(f"{case.op} {case.label}: time baseline {name}")
        results.append(result(name, "baseline", time_ms(fn, device, min_seconds)))
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def format_table(results: list[Result]) -> str:
    baselines = list(dict.fromkeys(n for r in results for n in r.ratios))
    with_flops = any(r.tflops is not None for r in results)
    extras = list(dict.fromkeys(name for r in results for name in r.extra))
    header = ["op", "case", "impl", "median ms", "GB/s"] + ["TFLOP/s"] * with_flops
    header += [f"x vs {b}" for b in baselines] + extras
    rows = [
        [
            r.op,
            r.case,
            r.impl if r.kind == "backend" else f"({r.impl})",
            f"{r.median_ms:.4g}",
            f"{r.gbps:.3g}",
        ]
        + ["" if r.tflops is None else f"{r.tflops:.2f}"] * with_flops
        + [f"{r.ratios[b]:.2f}" if b in r.ratios else "" for b in baselines]
        + [f"{r.extra[name]:.4g}" if name in r.extra else "" for name in extras]
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    from matplotlib.ticker import NullFormatter

    cases = list(dict.fromkeys((r.op, r.case) for r in results))
    height = 1.2 + 0.45 * max(len(results) / len(cases), 2) * len(cases)
    fig, axes = plt.subplots(len(cases), 1, figsize=(9, height))
    axes = [axes] if len(cases) == 1 else axes
    for ax, (op, label) in zip(axes, cases, strict=True):
        rs = [r for r in results if (r.op, r.case) == (op, label)]
        colors = ["tab:blue" if r.kind == "backend" else "tab:gray" for r in rs]
        times = [r.median_ms for r in rs]
        # Bars start well left of the fastest, so that on the log axis every bar has a visible length
        # and the ratios read as lengths; the right margin leaves room for the labels.
        left = min(times) / 4
        ax.barh([r.impl for r in rs], [t - left for t in times], left=left, color=colors)
        ax.set_xscale("log")
        ax.set_xlim(left, max(times) * 6)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()
        ax.set_title(f"{op} {label}", fontsize=9)
        ax.tick_params(labelsize=8)
        for i, r in enumerate(rs):
            ax.text(r.median_ms, i, f" {r.median_ms:.3g} ms, {r.gbps:.3g} GB/s", va="center", fontsize=7)
    axes[-1].set_xlabel("median time (ms, log scale); blue: dllm backends, gray: baselines")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # keep the title clear of the first plot
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dllm_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", help="benchmark only this op (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases and shorter timing")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="folder for the JSON and plot"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    min_seconds = 0.2 if args.quick else 1.0
    stamp = time.perf_counter()

    live = sys.stderr.isatty()

    def progress(message: str):
        line = f"[{time.perf_counter() - stamp:6.1f}s] {message}"
        print(f"\r\033[K{line}" if live else line, end="" if live else "\n", file=sys.stderr, flush=True)

    results: list[Result] = []
    for module in discover(args.op).values():
        for case in module.cases(device, args.quick):
            results.extend(measure(case, device, min_seconds, progress))
    if live:
        print("\r\033[K", end="", file=sys.stderr)

    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", (args.device if device.type == "cpu" else name).lower()).strip("-")
    title = f"dllm-kernels on {name} ({args.device}), torch {torch.__version__}"
    print(title)
    for op in dict.fromkeys(r.op for r in results):  # one table per op: each has its own baselines
        print()
        print(format_table([r for r in results if r.op == op]))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{slug}.json"
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    # One file per device: a run of some ops replaces their entries and keeps the others'.
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    ran = {r.op for r in results}
    kept = [r for r in report.get("results", []) if r["op"] not in ran]
    report = {
        "device": args.device,
        "device_name": name,
        "runs": {**report.get("runs", {}), **dict.fromkeys(sorted(ran), run)},
        "results": kept + [r.__dict__ for r in results],
    }
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    why_no_plot = plot([Result(**r) for r in report["results"]], args.out / f"{slug}.png", title)
    print(f"wrote {json_path}" + (f" (no plot: {why_no_plot})" if why_no_plot else f" and {slug}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
