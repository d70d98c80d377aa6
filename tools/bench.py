"""
Time and memory of one attention module (softmax, linear, DyDiLA) against the number of tokens.

    python tools/bench.py                      # CPU: N = 256 .. 16,384; CUDA: up to 262,144
    python tools/bench.py --compile            # each module through torch.compile first
    python tools/bench.py --cuda-graphs        # CUDA: replays of a CUDA graph, the GPU's own time

Writes scaling.csv and scaling.png into --out-dir and prints the crossover points.
"""

import argparse
import csv
import functools
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # dydilit.py and the scripts live one folder up
import dydilit as D                                               # noqa: E402
import visualize as V                                             # noqa: E402
from training.evaluation import pyplot                            # noqa: E402
from training.run import HelpFormatter, UserError, check_writable, cli, pick_device   # noqa: E402


def measure(modules, x, hw, repeats, device, graphs=False, min_seconds=3.0):
    """Forward+backward seconds (median), peak memory in MiB (CUDA: allocator peak over the
    call; CPU: bytes of the distinct tensors autograd saves for backward, the activation memory) and the per-round
    seconds of each module on x.
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
        return sec, ((torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else sum(saved.values())) / 2**20

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
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < 100):  # fast points: more rounds
        for kind in times:
            if rounds == 0 or times[kind][0] < 5:               # a slow point: one timed run is enough
                times[kind].append(run[kind]()[0])
        rounds += 1
    return {kind: (statistics.median(times[kind]), memory[kind], times[kind]) for kind in times}


def paired_ratio(a, b):
    """Median over rounds of a_r / b_r: a slow spell of a shared machine hits both runs of a round."""
    return statistics.median(x / y for x, y in zip(a, b))


def scaling(args, out):
    device = pick_device()
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU (it times CUDA-graph replays); drop it on this machine")
    if args.compile:                                            # each size and mechanism compiles its own graph
        torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 256
    mode = ", torch.compile" * args.compile + ", CUDA-graph replays" * args.cuda_graphs
    # a CUDA graph records autocast's casts, so its cast cache must be off (no difference in eager)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if device.type == "cuda" else nullcontext()
    sides = [s for s in (16, 32, 64, 128, 256, 512) if s * s <= args.max_tokens]
    rows, alive = [], set(V.MECHANISMS)
    print(f"forward+backward, batch 1, width {args.width}, {args.heads} heads, on {device}"
          f"{' (bf16 autocast)' if device.type == 'cuda' else ' (float32)'}{mode}; median of >= {args.repeats} interleaved rounds (more, up to ~3 s, where they are fast) after a warm-up")
    for side in sides:
        N, row = side * side, {"tokens": side * side}
        x = torch.randn(1, N, args.width, device=device, requires_grad=True)
        modules = {}
        for kind in V.MECHANISMS:
            if kind in alive:
                torch.manual_seed(0)
                modules[kind] = D.ATTENTIONS[kind](args.width, args.heads).to(device)
                if args.compile:
                    # one static graph per size: recompiling for a new N with dynamic shapes crashed inductor (CPU)
                    modules[kind] = torch.compile(modules[kind], dynamic=False)
        with amp:
            results = measure(modules, x, (side, side), args.repeats, device, args.cuda_graphs)
        for kind in set(modules) - set(results):
            alive.discard(kind)
            print(f"{kind}: out of memory at {N} tokens; stopping it there")
        for kind, (sec, mem, _) in results.items():
            row[f"{kind}_ms"], row[f"{kind}_mem_mib"] = 1000 * sec, mem
        del modules, x
        if "dydila" in results and "linear" in results:
            row["dydila_over_linear"] = paired_ratio(results["dydila"][2], results["linear"][2])
        rows.append(row)
        print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    fields = ["tokens"] + [f"{k}_{u}" for k in V.MECHANISMS for u in ("ms", "mem_mib")] + ["dydila_over_linear"]
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cross = next((r["tokens"] for r in rows if r.get("linear_ms", math.inf) < r.get("softmax_ms", -1)), None)
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, kind in enumerate(V.MECHANISMS):
        pts = [(r["tokens"], r[f"{kind}_ms"], r[f"{kind}_mem_mib"]) for r in rows if f"{kind}_ms" in r]
        if pts:
            n, ms, mem = zip(*pts)
            a1.plot(n, ms, "o-", color=f"C{i}", label=V.LABELS[kind])
            a2.plot(n, mem, "o-", color=f"C{i}", label=V.LABELS[kind])
    for ax, ylabel in ((a1, "forward+backward time (ms)"),
                       (a2, "peak memory (MiB)" if device.type == "cuda" else "activations saved for backward (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=ylabel)
        ax.set_xticks([r["tokens"] for r in rows], [f"{r['tokens'] // 1024}k" if r["tokens"] >= 1024 else str(r["tokens"])
                                                     for r in rows])
        for axis in (ax.xaxis, ax.yaxis):                               # label the measured sizes and decades only
            axis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3, which="both")
        if cross:
            ax.axvline(cross, color="gray", ls="--", lw=1)
            ax.text(cross, ax.get_ylim()[1], f" linear < softmax from N={cross}", fontsize=8, va="top")
        ax.legend(fontsize=8)
    fig.suptitle(f"width {args.width}, {args.heads} heads, batch 1, {device.type}{mode}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)
    print(f"linear attention is faster than softmax from N = {cross} tokens" if cross else
          "linear attention was not faster than softmax at any measured size")
    dydi = {r["tokens"]: r for r in rows if "dydila_ms" in r}
    cross_dydi = next((n for n, r in dydi.items() if r["dydila_ms"] < r.get("softmax_ms", -1)), None)
    print(f"DyDiLA is faster than softmax from N = {cross_dydi} tokens" if cross_dydi else
          "DyDiLA was not faster than softmax at any measured size")
    ratios = [r["dydila_over_linear"] for n, r in dydi.items() if n >= 1024 and "dydila_over_linear" in r]
    if ratios:
        print(f"DyDiLA / linear attention time at N >= 1024: {min(ratios):.2f} - {max(ratios):.2f}")
    if 1024 in dydi and max(dydi) > 1024:
        n = max(dydi)
        print(f"DyDiLA time at N = {n} / at N = 1024: {dydi[n]['dydila_ms'] / dydi[1024]['dydila_ms']:.1f} "
              f"(tokens x{n // 1024})")
    return ["scaling.csv", "scaling.png"]


def get_parser():
    p = argparse.ArgumentParser(description="Forward+backward time and memory of softmax, linear and DyDiLA attention "
                                "against the number of tokens.", formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="viz", help="folder for scaling.csv and scaling.png")
    p.add_argument("--width", type=int, default=192, help="channels of each module")
    p.add_argument("--heads", type=int, default=3, help="heads of each module")
    p.add_argument("--max-tokens", type=int, default=None, help="largest N (default 16384 on CPU, 262144 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile each module first (fuses DyDiLA's elementwise "
                   "passes; compiles once per size, seconds to a minute each)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA only: time CUDA-graph replays of each forward+backward, "
                   "the GPU's own time without Python, dispatcher and launch overhead (which bounds small N on a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="at least this many timed rounds per point (median; fast points "
                   "run more rounds, about 3 s)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    return cli(run, args)


def run(args):
    out = Path(args.out_dir)
    if args.heads < 1 or args.width % args.heads:
        raise UserError(f"--width {args.width} is not divisible by --heads {args.heads}")
    args.max_tokens = args.max_tokens or (262_144 if torch.cuda.is_available() else 16_384)
    if args.max_tokens < 256:
        raise UserError(f"--max-tokens {args.max_tokens} is below the smallest size timed, 256 tokens: give 256 or more")
    check_writable(out, "--out-dir")
    out.mkdir(parents=True, exist_ok=True)
    written = scaling(args, out)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
