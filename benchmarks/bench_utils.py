"""Helpers every benchmark shares: process memory, the machine description, CPU contention, child processes.

Linux only (``/proc``); each function degrades to NaN / "?" elsewhere rather than failing a benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_rss_delta(result: dict):
    """result['bytes'] = peak RSS during the block minus RSS before it (Linux: VmHWM reset via clear_refs)."""
    gc.collect()
    malloc_trim()
    before = proc_status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    yield
    peak = proc_status_bytes("VmHWM")
    result["bytes"] = (peak - before) if resettable else float("nan")


def mem_available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    raise KeyError("MemAvailable")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine_description(threads: int) -> dict:
    import torch
    import transformers

    cpu = cpu_name()
    mem = float("nan")
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    commit = "?"
    with contextlib.suppress(Exception):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
        commit += " (src/ modified)" if dirty.strip() else ""
    return {
        "commit": commit,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(mem, 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "os": platform.platform(),
    }


def cpu_snapshot() -> tuple[float, float, float]:
    """(seconds of busy CPU time on the whole machine, this process' CPU seconds, wall seconds)."""
    busy = float("nan")
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def other_cpu_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's CPUs that OTHER processes used since `start` (contention indicator: 0 on an idle box)."""
    busy, own, wall = cpu_snapshot()
    return max(0.0, ((busy - start[0]) - (own - start[1])) / ((wall - start[2]) * (os.cpu_count() or 1)))


WAITED = {"s": 0.0, "n": 0}


def wait_idle(args) -> None:
    """With --wait-idle S: before a timed sample, wait (at most S seconds) until other processes use less than
    --idle-threshold of the CPUs over a 0.25 s window. The machine this was written on is shared."""
    if args.wait_idle <= 0:
        return
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.wait_idle:
        snap = cpu_snapshot()
        time.sleep(0.25)
        if other_cpu_share(snap) < args.idle_threshold:
            break
    WAITED["s"] += time.perf_counter() - t0
    WAITED["n"] += 1


def timed_generate(model, prompt, new_tokens: int, *, first_scores: list | None = None, **kwargs) -> tuple:
    """Greedy `generate` of exactly `new_tokens`, stamping the time at every step from a logits processor (CUDA
    synchronised). Returns (prefill seconds as generate runs it, [decode step seconds], output ids). `first_scores`:
    a list that receives row 0's scores of the first step. Imports only torch and transformers (any release), so
    IEIT's transformers-4.36 worker uses it too."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []
    cuda = prompt.is_cuda

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if first_scores is not None and not first_scores:
                first_scores.append(scores[0].float().cpu())
            return scores

    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, logits_processor=LogitsProcessorList([Stamp()]), **kwargs,
    )  # fmt: skip
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], out


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(open("/proc/loadavg").read().split()[:3])
    return "?"


@dataclass
class Measurement:
    result: Any
    peak_rss_bytes: int
    seconds: float


def _run_child(fn: Callable, args: tuple, kwargs: dict, conn) -> None:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    conn.send((result, peak, seconds))
    conn.close()


def measure(fn: Callable, *args: Any, **kwargs: Any) -> Measurement:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) process; its result, peak RSS and wall time.

    ``fn`` must be importable (a module-level function) and return something picklable. The peak includes the
    interpreter and imports: compare with ``measure(baseline)``.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_run_child, args=(fn, args, kwargs, sender))
    process.start()
    sender.close()
    try:
        result, peak, seconds = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{fn.__name__} died in its process (exit code {process.exitcode}); out of memory?") from None
    process.join()
    return Measurement(result, peak, seconds)
