"""
Timing attention modules: forward+backward seconds and memory, the modules taking turns so that a
shared machine's slow spells fall on all of them alike (measure), and their paired ratio. For
tools/bench.py and tools/gpu_check.py.
"""

import functools
import statistics
import time
from typing import NamedTuple

import torch


class Timing(NamedTuple):
    seconds: float                   # median forward+backward seconds
    mib: float                       # peak memory (CUDA) or activation memory (CPU), MiB
    rounds: list                     # seconds of each round, for paired ratios


def measure(modules, x, hw, repeats, device, graphs=False, min_seconds=3.0):
    """Forward+backward seconds (median), peak memory in MiB (CUDA: allocator peak over the
    call; CPU: bytes of the distinct tensors autograd saves for backward, the activation memory) and
    the per-round seconds of each module on x: {name: Timing}.
    The modules take turns, one call each per round, so that a shared machine's slow spells
    fall on all of them alike: at least `repeats` rounds, and more, up to min_seconds (and 100
    rounds), where they are fast. graphs (CUDA): time a CUDA-graph replay of the forward+backward
    instead, the same kernels without Python, dispatcher or launch overhead: the GPU's own time."""
    saved = {}                                                  # storage -> bytes: a tensor saved twice counts once

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def once(module):
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, hw).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else sum(saved.values())
        return sec, peak / 2**20

    def capture(module):
        """A function that replays module's forward+backward on x from a CUDA graph."""
        xg = x.detach().clone().requires_grad_()               # its own input: the graph writes xg.grad in place
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                           # warm-up outside the graph (workspaces, autograd)
            for _ in range(3):
                module(xg, hw).float().sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(xg, hw).float().sum().backward()

        def replay(_inputs=xg):                                 # keeps xg alive: the graph reads and writes its memory
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            return time.perf_counter() - t0, None
        return replay

    memory, times, run = {}, {}, {}
    for kind, m in modules.items():                             # warm-up: its memory counts, its time not
        try:
            memory[kind], times[kind] = once(m)[1], []
            run[kind] = capture(m) if graphs else functools.partial(once, m)
        except (torch.cuda.OutOfMemoryError, MemoryError):     # this mechanism stops here
            times.pop(kind, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rounds, start = 0, time.perf_counter()
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < 100):   # fast: more rounds
        for kind in times:
            if rounds == 0 or times[kind][0] < 5:               # a slow point: one timed run is enough
                times[kind].append(run[kind]()[0])
        rounds += 1
    return {kind: Timing(statistics.median(times[kind]), memory[kind], times[kind]) for kind in times}


def paired_ratio(a, b):
    """Median over rounds of a_r / b_r: a slow spell of a shared machine hits both runs of a round."""
    return statistics.median(x / y for x, y in zip(a, b))
