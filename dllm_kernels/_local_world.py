"""A torch.distributed world of local processes, for the tests and benchmarks of ``dllm_kernels.distributed``.

``run(fn, world, *args)`` spawns ``world`` processes that join one gloo group over 127.0.0.1 only,
calls ``fn(rank, world, *args)`` in each and returns their results in rank order. Each process loads
``fn`` from its source file, so it may live in a test or benchmark file that is not importable by name.
The whole run is bounded by ``timeout``: a rank that raises, crashes or hangs ends it with an error that
carries every failed rank's traceback, and no process outlives it.
"""

import datetime
import importlib.util
import inspect
import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After one rank fails, how long the others get to report (they may be waiting on it in a collective).
_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location("_dllm_local_world_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _rank_main(target, rank, world, port, args, results, timeout, threads):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on the loopback interface too
    torch.set_num_threads(threads)
    try:
        fn = _load(*target)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        # Plain pickle: tensors travel as bytes, not as shared memory that dies with this process.
        results.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, world: int, *args, timeout: float = 120.0, threads: int = 1) -> list:
    """``[fn(rank, world, *args) for each rank]``, each in its own process (``fn`` a module-level function,
    ``args`` picklable; ``threads``: torch's intra-op threads a rank)."""
    target = (os.path.abspath(inspect.getfile(fn)), fn.__name__)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main, args=(target, rank, world, port, args, results, timeout, threads), daemon=True
        )
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    done: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):  # a rank died without reporting
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
                continue
            done[rank] = (ok, value)
            if not ok:
                deadline = min(deadline, time.monotonic() + _GRACE_S)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(done.items()) if not ok]
    silent = [rank for rank in range(world) if rank not in done]
    if failures or silent:
        raise RuntimeError(
            f"local world of {world}: {len(failures)} rank(s) failed, {silent or 'none'} did not report "
            f"within {timeout:g} s\n" + "\n".join(failures)
        )
    return [pickle.loads(done[rank][1]) for rank in range(world)]
