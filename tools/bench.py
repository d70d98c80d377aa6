"""
Time and memory of one attention module (softmax, linear, DyDiLA) against the number of tokens.

    python tools/bench.py                      # CPU: N = 256 .. 16,384; CUDA: up to 262,144
    python tools/bench.py --compile            # each module through torch.compile first
    python tools/bench.py --cuda-graphs        # CUDA: replays of a CUDA graph, the GPU's own time

Writes scaling.csv and scaling.png into --out-dir and prints the crossover points.
"""

import csv
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, one folder up
import dydilit as D                                               # noqa: E402
from training.attention import ATTENTIONS, LABELS                 # noqa: E402
from training.cli import Parser, UserError, check_fits, check_width_heads, check_writable, cli, whole   # noqa: E402
from training.device import pick_device                           # noqa: E402
from training.figures import pyplot, save_figure                  # noqa: E402
from training.timing import measure, paired_ratio                 # noqa: E402

SIDES = (16, 32, 64, 128, 256, 512)                               # the token grids timed: N = 256 .. 262,144


def scaling(args, out, max_tokens):
    device = pick_device()
    if args.compile:                                            # each size and mechanism compiles its own graph
        torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 256
    mode = ", torch.compile" * args.compile + ", CUDA-graph replays" * args.cuda_graphs
    # a CUDA graph records autocast's casts, so its cast cache must be off (no difference in eager)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if device.type == "cuda" else nullcontext()
    sides = [s for s in SIDES if s * s <= max_tokens]
    rows, alive = [], set(ATTENTIONS)
    print(f"forward+backward, batch 1, width {args.width}, {args.heads} heads, on {device}"
          f"{' (bf16 autocast)' if device.type == 'cuda' else ' (float32)'}{mode}; median of >= {args.repeats} "
          f"interleaved rounds (more, up to ~3 s, where they are fast) after a warm-up")
    for side in sides:
        N, row = side * side, {"tokens": side * side}
        x = torch.randn(1, N, args.width, device=device, requires_grad=True)
        modules = {}
        for kind in ATTENTIONS:
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
        for kind, timing in results.items():
            row[f"{kind}_ms"], row[f"{kind}_mem_mib"] = 1000 * timing.seconds, timing.mib
        del modules, x
        if "dydila" in results and "linear" in results:
            row["dydila_over_linear"] = paired_ratio(results["dydila"].rounds, results["linear"].rounds)
        rows.append(row)
        print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    fields = ["tokens"] + [f"{k}_{u}" for k in ATTENTIONS for u in ("ms", "mem_mib")] + ["dydila_over_linear"]
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cross = next((r["tokens"] for r in rows if r.get("linear_ms", math.inf) < r.get("softmax_ms", -1)), None)
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, kind in enumerate(ATTENTIONS):
        pts = [(r["tokens"], r[f"{kind}_ms"], r[f"{kind}_mem_mib"]) for r in rows if f"{kind}_ms" in r]
        if pts:
            n, ms, mem = zip(*pts)
            a1.plot(n, ms, "o-", color=f"C{i}", label=LABELS[kind])
            a2.plot(n, mem, "o-", color=f"C{i}", label=LABELS[kind])
    for ax, ylabel in ((a1, "forward+backward time (ms)"),
                       (a2, "peak memory (MiB)" if device.type == "cuda" else "activations saved for backward (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=ylabel)
        ax.set_xticks([r["tokens"] for r in rows],
                      [f"{r['tokens'] // 1024}k" if r["tokens"] >= 1024 else str(r["tokens"]) for r in rows])
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
    save_figure(fig, out / "scaling.png", dpi=110)
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
    p = Parser("Forward+backward time and memory of softmax, linear and DyDiLA attention against the number of tokens.")
    p.add_argument("--out-dir", default="viz", help="folder for scaling.csv and scaling.png")
    p.add_argument("--width", type=whole(1), default=192, help="channels of each module")
    p.add_argument("--heads", type=whole(1), default=3, help="heads of each module")
    p.add_argument("--max-tokens", type=whole(256), default=None, help="largest N (default 16384 on CPU, 262144 on "
                   "CUDA; the grids timed are 16 x 16 to 512 x 512)")
    p.add_argument("--compile", action="store_true", help="torch.compile each module first (fuses DyDiLA's "
                   "elementwise passes; compiles once per size, seconds to a minute each)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA only: time CUDA-graph replays of each "
                   "forward+backward, the GPU's own time without Python, dispatcher and launch overhead (which "
                   "bounds small N on a GPU)")
    p.add_argument("--repeats", type=whole(1), default=5, help="at least this many timed rounds per point (median; "
                   "fast points run more rounds, about 3 s)")
    return p


def run(argv):
    args = get_parser().parse_args(argv)
    out = Path(args.out_dir)
    check_width_heads(args.width, args.heads)
    if args.cuda_graphs and not torch.cuda.is_available():
        raise UserError("--cuda-graphs needs a CUDA GPU (it times CUDA-graph replays); drop it on this machine")
    max_tokens = args.max_tokens
    if max_tokens is None:
        max_tokens = 262_144 if torch.cuda.is_available() else 16_384
    n = max(s * s for s in SIDES if s * s <= max_tokens)          # the largest point: input, qkv, output, a margin
    check_fits(4 * 16 * n * args.width, pick_device(), f"timing attention of width {args.width} at {n:,} tokens",
               "use a smaller --width or --max-tokens")
    check_writable(out, "--out-dir")
    out.mkdir(parents=True, exist_ok=True)
    written = scaling(args, out, max_tokens)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


def main(argv=None):
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
