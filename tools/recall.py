"""
Associative recall on a token grid: does an attention retrieve one key among N, and does that
fall apart as N outgrows a linear-attention head's d x d state?

    python tools/recall.py                                  # one point (DyDiLA, 64 tokens): about a minute on a CPU
    python tools/recall.py --attn linear --tokens 256 --head-dim 64
    python tools/recall.py --attn dydila-no-dynamic-kernel  # a DyDiLA ablation
    python tools/recall.py --sweep                          # the whole grid, resumable: assets/recall.csv, recall.png

The task (bidirectional multi-query associative recall, MQAR; Zoology, Arora et al. 2023): on an
H x W grid, half the tokens are memory tokens, each with a fresh random key (a unit vector) and one
of V value classes; the other half are queries, each carrying the key of exactly one memory token,
its partner; all places are random. The answer at a query is its partner's value; chance is 1/V.
Nothing carries over between examples and there is no position embedding: positions tell nothing.

The model: an input projection, `depth` pre-norm residual [attention, MLP] blocks and a classifier
head; the attention is the project's own (SoftmaxAttention, LinearAttention, DyDiLA with its
switches: a variant, VARIANTS) and is all that differs between points. Measures on fresh held-out
examples: query accuracy; per layer, each query row's attention on its partner key (partner mass,
as the copy probe's: 1/N uniform, 1 exact retrieval; mean over heads and the best head) and its
entropy / log N.

A worked example, N = 4 tokens on a 2 x 2 grid, key_dim 2, V = 16 values; each input row is
[memory?, query?, key, value one-hot]:

    token  memory? query?  key         value      target  partner
    0      1       0       k_a         one-hot 5  -100    -1
    1      0       1       k_b         zeros      7       3
    2      0       1       k_a         zeros      5       0
    3      1       0       k_b         one-hot 7  -100    -1
"""

import csv
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                     # the project, one folder up
import dydilit as D                                               # noqa: E402
from training.attention import attention_inputs, partner_mass, row_entropy   # noqa: E402
from training.cli import (Parser, UserError, check_fits, check_image_format, check_writable, cli,   # noqa: E402
                          name_of, seed, whole)
from training.figures import pyplot, save_figure                  # noqa: E402
from training.files import atomic_write                           # noqa: E402

# the attention variants: an attention and its keywords (DyDiLA's switches, or a reading of dydilit.READINGS);
# "based": the reference whose feature map grows the state (TaylorAttention)
VARIANTS = {"softmax": ("softmax", {}), "linear": ("linear", {}), "dydila": ("dydila", {}),
            "dydila-no-dynamic-projection": ("dydila", {"dynamic_projection": False}),
            "dydila-no-dynamic-kernel": ("dydila", {"dynamic_kernel": False}),
            "dydila-no-token-differential": ("dydila", {"token_differential": False}),
            **{f"dydila-{r}": ("dydila", {"reading": r}) for r in D.READINGS if r != "ours"},
            "based": ("based", {})}
# the training of every point, the same for every variant: why, in docs/BENCHMARKS.md, "Recall against length and
# state size"
TRAIN = dict(width=64, depth=2, values=16, key_dim=32, steps=1000, batch=32, lr=1e-3, warmup=100)
EVAL_EXAMPLES, MEASURE_EXAMPLES = 256, 16                         # accuracy; attention measures (N x N each)
# the sweep: (variant, tokens, head dim, steps as a multiple of --steps), 3 seeds each. Length and state size;
# then every reading of DyDiLA, ours and linear trained 4 x longer, and the reference that grows the state
SWEEP = ([(v, n, 32, 1) for v in ("softmax", "linear", "dydila") for n in (64, 256, 1024)]
         + [(v, n, 32, 1) for v in list(VARIANTS)[3:6] for n in (64, 256)]
         + [(v, 256, d, 1) for v in ("linear", "dydila") for d in (16, 64)]
         + [(v, n, 32, 1) for v in list(VARIANTS)[6:] for n in (64, 256)]
         + [(v, 256, 32, 4) for v in ("dydila", "linear")])
SEEDS = (0, 1, 2)
FIELDS = ["variant", "tokens", "head_dim", "seed", "steps", "accuracy", "partner_mass", "best_head", "entropy",
          "partner_mass_per_layer", "best_head_per_layer", "seconds", "threads"]


# ----------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------

def grid(tokens):
    """The H x W grid of N tokens: N must be an even square (half memory, half queries)."""
    side = math.isqrt(tokens)
    if tokens < 4 or side * side != tokens or tokens % 2:
        raise UserError(f"--tokens {tokens} must be an even square (64, 256, 1024, ...): the tokens lie on a square "
                        f"grid, half of them memory, half queries")
    return side, side


def recall_batch(batch, hw, values, key_dim, generator):
    """(inputs (B, N, 2 + key_dim + values), targets (B, N) with -100 at memory tokens, partner
    (B, N) the partner's position of each query and -1 at memory tokens). Each input row is
    [memory?, query?, key, value one-hot (zeros for a query)]."""
    N = hw[0] * hw[1]
    M = N // 2                                                    # memory tokens = queries
    g = generator
    places = torch.rand(batch, N, generator=g).argsort(1)         # random places: memory first, then queries
    memory, query = places[:, :M], places[:, M:]                  # (B, M) positions each
    keys = F.normalize(torch.randn(batch, M, key_dim, generator=g), dim=-1)     # fresh keys (B, M, key_dim)
    value = torch.randint(0, values, (batch, M), generator=g)     # (B, M)
    asked = torch.rand(batch, M, generator=g).argsort(1)          # query j asks memory token asked[j]
    b = torch.arange(batch)[:, None]
    x = torch.zeros(batch, N, 2 + key_dim + values)
    x[b, memory, 0] = 1
    x[b, memory, 2:2 + key_dim] = keys
    x[b, memory, 2 + key_dim + value] = 1
    x[b, query, 1] = 1
    x[b, query, 2:2 + key_dim] = keys[b, asked]
    targets = torch.full((batch, N), -100)
    targets[b, query] = value[b, asked]
    partner = torch.full((batch, N), -1)
    partner[b, query] = memory[b, asked]
    return x, targets, partner


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

class TaylorAttention(D.LinearAttention):
    """The reference whose feature map grows the state at the same width: LiT's linear attention (its
    normaliser and DWC) with Based's second-order Taylor features (Arora et al. 2024) in place of ReLU,

        phi(z) = [1, z / d^(1/4), vec(z z^T) / (sqrt(2 d))],   phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d) > 0,

    the first terms of exp(q.k / sqrt(d)): a state of (1 + d + d^2) x d per head, where ReLU keeps d x d."""

    def features(self, x):
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)   # 3 x (B, h, N, d)

        def taylor(z):                                            # (B, h, N, d) -> (B, h, N, 1 + d + d^2)
            z = z.float()
            second = (z[..., :, None] * z[..., None, :]).flatten(-2) / (2 ** 0.5 * d ** 0.5)
            return torch.cat([torch.ones_like(z[..., :1]), z / d ** 0.25, second], dim=-1)
        return taylor(q), taylor(k), v


class Block(nn.Module):
    """Pre-norm residual [attention, MLP]."""

    def __init__(self, width, heads, attn, attn_kwargs):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = TaylorAttention(width, heads) if attn == "based" else D.make_attention(attn, width, heads,
                                                                                           **attn_kwargs)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)                      # (B, N, C)
        return x + self.mlp(self.norm2(x))


def check_head_dim(head_dim, width=TRAIN["width"]):
    if width % head_dim:
        raise UserError(f"--head-dim {head_dim} does not divide the width {width}: use one of "
                        f"{', '.join(str(d) for d in range(1, width + 1) if width % d == 0)}")


class RecallModel(nn.Module):
    def __init__(self, variant, head_dim, width, depth, values, key_dim):
        super().__init__()
        check_head_dim(head_dim, width)
        attn, kw = VARIANTS[variant]
        self.embed = nn.Linear(2 + key_dim + values, width)
        self.blocks = nn.ModuleList(Block(width, width // head_dim, attn, kw) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, values)

    def forward(self, x, hw):
        h = self.embed(x)                                         # (B, N, C), no position embedding
        for block in self.blocks:
            h = block(h, hw)
        return self.head(self.norm(h))                            # (B, N, values)


# ----------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def measure(model, hw, tr, seed):
    """Query accuracy on EVAL_EXAMPLES fresh examples; on MEASURE_EXAMPLES more, per layer, the
    partner mass (mean over heads, and the best head's) and the query rows' entropy / log N. The
    summary is the layer that retrieves most (retrieval needs one): its partner mass, its best
    head's, its entropy."""
    model.eval()
    g = torch.Generator().manual_seed(10_000 + seed)              # held out: a generator training never uses
    right = total = 0
    for _ in range(EVAL_EXAMPLES // 32):
        x, y, _ = recall_batch(32, hw, tr["values"], tr["key_dim"], g)
        pred = model(x, hw).argmax(-1)
        right += (pred == y)[y >= 0].sum().item()
        total += (y >= 0).sum().item()
    x, _, partner = recall_batch(MEASURE_EXAMPLES, hw, tr["values"], tr["key_dim"], g)
    with attention_inputs(model.blocks) as inputs:
        model(x, hw)
    queries = (partner >= 0)[:, None, :]                          # (B, 1, N): the query rows
    mean, best, entropy = [], [], []
    for attn, x_in in inputs:
        A = attn.attention_matrix(x_in, hw)                       # (B, h, N, N)
        rows = queries.expand(A.shape[:3])                        # (B, h, N)
        mass = partner_mass(A, partner.clamp(min=0)[:, None])[rows].view(len(x), A.shape[1], -1)   # (B, h, N / 2)
        mass = mass.mean((0, 2))                                  # (h,) over examples and queries
        mean.append(mass.mean().item())
        best.append(mass.max().item())
        entropy.append(row_entropy(A)[rows].nanmean().item())    # the query rows with weight
    top = max(range(len(mean)), key=mean.__getitem__)             # the layer that retrieves most
    return dict(accuracy=right / total, partner_mass=mean[top], best_head=best[top], entropy=entropy[top],
                partner_mass_per_layer=mean, best_head_per_layer=best)


def train_point(variant, tokens, head_dim, seed, tr=TRAIN, progress=False):
    """Trains one point from its seed and measures it: a dict of FIELDS."""
    hw = grid(tokens)
    torch.manual_seed(seed)
    model = RecallModel(variant, head_dim, tr["width"], tr["depth"], tr["values"], tr["key_dim"])
    opt = torch.optim.AdamW(D.optimizer_groups(model, VARIANTS[variant][1].get("reading", "ours")), lr=tr["lr"],
                            weight_decay=0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    steps = range(tr["steps"])
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"{variant}, N={tokens}, d={head_dim}, seed {seed}", dynamic_ncols=True)
    for step in steps:
        for group in opt.param_groups:                            # linear warmup, then cosine to 0
            schedule = min((step + 1) / tr["warmup"], 0.5 * (1 + math.cos(math.pi * step / tr["steps"])))
            group["lr"] = tr["lr"] * group["lr_scale"] * schedule
        x, y, _ = recall_batch(tr["batch"], hw, tr["values"], tr["key_dim"], g)
        loss = F.cross_entropy(model(x, hw).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress and step % 50 == 0:
            steps.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    return dict(variant=variant, tokens=tokens, head_dim=head_dim, seed=seed, steps=tr["steps"],
                **measure(model, hw, tr, seed), seconds=seconds, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------
# The sweep: a list of points (SWEEP x SEEDS), run by a small launcher, resumable
# ----------------------------------------------------------------------------------------

def read_points(path, steps=None):
    """The finished points of the sweep's CSV: {(variant, tokens, head_dim, seed, steps): record}. steps:
    the --steps every point was trained for, times its multiple in SWEEP (None: one count, whatever it
    is). A last line cut by a stopped write is left out with a note (the sweep runs that point again);
    anything else that is not a point of this sweep is one line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
    except UnicodeDecodeError:
        raise UserError(f"--csv {path} is not a CSV file of recall points (not text): give the sweep's CSV") from None
    if lines and not lines[-1].endswith("\n"):
        print(f"note: {path}: its last line was cut by a stopped write; leaving that point out")
        lines = lines[:-1]
    rows = list(csv.DictReader(lines))
    if not lines or lines[0].strip().split(",") != FIELDS:
        raise UserError(f"--csv {path} is not a CSV file of recall points: its first line must name the fields "
                        f"{','.join(FIELDS)}")
    try:
        points = {(r["variant"], int(r["tokens"]), int(r["head_dim"]), int(r["seed"]), int(r["steps"])): r
                  for r in rows}
        for r in rows:
            float(r["accuracy"]), float(r["partner_mass"])
    except (TypeError, ValueError) as e:
        raise UserError(f"--csv {path} holds a line that is no recall point ({e}): remove it") from None
    bases = [base_steps(*key[:3], key[4]) for key in points]       # the --steps each point could have had
    common = set.intersection(*bases) if bases else set()
    if bases and (not common or (steps is not None and steps not in common)):
        counts = sorted({key[4] for key in points})
        raise UserError(f"--csv {path} holds points of {', '.join(map(str, counts))} training steps"
                        + (f", not {steps}" if steps is not None else "") + ": one sweep trains every point alike "
                        "(or a multiple of it, as SWEEP says); pick another --csv")
    return points


def base_steps(variant, tokens, head_dim, steps):
    """The --steps a point of `steps` training steps belongs to: its steps over its multiples in SWEEP."""
    multiples = {m for v, n, d, m in SWEEP if (v, n, d) == (variant, tokens, head_dim)} or {1}
    return {steps // m for m in multiples if steps % m == 0}


def run_point(point):
    """One point of the sweep (in a worker process), formatted as a CSV record."""
    variant, tokens, head_dim, seed, steps = point
    record = train_point(variant, tokens, head_dim, seed, {**TRAIN, "steps": steps})
    return {**record, **{k: " ".join(f"{m:.4f}" for m in record[k]) for k in ("partner_mass_per_layer",
                                                                             "best_head_per_layer")}}


def sweep(args):
    """Every point of SWEEP x SEEDS not yet in the CSV, --jobs at a time, each in a worker process on one
    thread; each finished point is appended to the CSV at once (a stopped sweep continues)."""
    from tqdm import tqdm
    path = Path(args.csv)
    done = read_points(path, args.steps) if path.exists() else {}
    todo = sorted(((v, n, d, s, m * args.steps) for v, n, d, m in SWEEP for s in SEEDS
                   if (v, n, d, s, m * args.steps) not in done),
                  key=lambda p: (-p[1] ** 2 * p[4], p[3]))        # the longest first: two jobs end together
    print(f"{len(done)} of {len(SWEEP) * len(SEEDS)} points in {path}; {len(todo)} to go, {args.jobs} at a time")
    with atomic_write(path) as tmp:                               # the finished points, and no cut line
        tmp.write_text(",".join(FIELDS) + "\n" + "".join(",".join(r[k] for k in FIELDS) + "\n" for r in done.values()))
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),   # fresh processes,
                               initializer=torch.set_num_threads, initargs=(1,))               # one thread each
    try:
        futures = [pool.submit(run_point, point) for point in todo]
        with tqdm(total=len(todo), desc="recall sweep", dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                record = future.result()
                with open(path, "a", newline="") as f:
                    csv.DictWriter(f, FIELDS, lineterminator="\n").writerow(record)
                bar.update(1)
                bar.write(f"{record['variant']}, N={record['tokens']}, d={record['head_dim']}, seed {record['seed']}, "
                          f"{record['steps']} steps: accuracy {record['accuracy']:.3f}, partner mass "
                          f"{record['partner_mass']:.3f} ({record['seconds']:.0f} s)")
    finally:                                                      # Ctrl-C: unfinished points are run again next time
        pool.shutdown(wait=False, cancel_futures=True)
    return figure(path, Path(args.figure))


def figure(path, png):
    """Accuracy against N (one line per variant, the seed spread as a band), partner mass against N,
    accuracy against head dim at 256 tokens, and (once the sweep has them) every reading of DyDiLA and
    the reference that grows the state at 64 and 256 tokens; the table in markdown on stdout."""
    points = read_points(path)
    if not points:
        raise UserError(f"--csv {path} holds no points yet: run --sweep first")
    base = min(set.intersection(*(base_steps(*key[:3], key[4]) for key in points)))   # the sweep's --steps
    table = {}
    for (v, n, d, _, steps), r in points.items():
        table.setdefault((v, n, d, steps // base), []).append(r)
    readings = [k for k in table if k[0] in list(VARIANTS)[6:] or k[3] > 1]
    plt = pyplot()
    fig, axes = plt.subplots(1, 4 if readings else 3, figsize=(21 if readings else 16, 4.6))
    mean_range = lambda rs, f: (statistics.mean(float(r[f]) for r in rs), min(float(r[f]) for r in rs),
                                max(float(r[f]) for r in rs))
    for i, variant in enumerate(list(VARIANTS)[:6]):
        for ax, field in ((axes[0], "accuracy"), (axes[1], "partner_mass")):
            ns = sorted({n for (v, n, d, m) in table if v == variant and d == 32 and m == 1})
            if ns:
                mid, lo, hi = zip(*(mean_range(table[(variant, n, 32, 1)], field) for n in ns))
                ax.plot(ns, mid, "o-" if i < 3 else "s--", color=f"C{i}", label=variant, ms=5)
                ax.fill_between(ns, lo, hi, color=f"C{i}", alpha=0.15)
        ds = sorted({d for (v, n, d, m) in table if v == variant and n == 256 and m == 1})
        if len(ds) > 1:
            mid, lo, hi = zip(*(mean_range(table[(variant, 256, d, 1)], "accuracy") for d in ds))
            axes[2].plot(ds, mid, "o-", color=f"C{i}", label=variant)
            axes[2].fill_between(ds, lo, hi, color=f"C{i}", alpha=0.15)
    chance = 1 / TRAIN["values"]
    axes[0].axhline(chance, color="gray", ls=":", lw=1, label=f"chance, 1/{TRAIN['values']}")
    axes[0].set(xscale="log", xlabel="tokens N (half of them key-value pairs)", ylabel="query accuracy",
                title="recall against length (head dim 32; band: 3 seeds' range)")
    ns = sorted({n for (_, n, _, _) in table})
    axes[1].plot(ns, [1 / n for n in ns], color="gray", ls=":", lw=1, label="uniform rows, 1/N")
    axes[1].set(xscale="log", yscale="log", xlabel="tokens N", ylabel="attention on the partner key",
                title="partner mass (the layer that retrieves most, mean over heads)")
    axes[2].axhline(chance, color="gray", ls=":", lw=1)
    axes[2].set(xscale="log", xlabel="head dim d (state d x d per head; width 64)", ylabel="query accuracy",
                title="recall against state size at N = 256")
    for ax, ticks in zip(axes, (ns, ns, sorted({d for (_, _, d, _) in table}))):
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.minorticks_off()
    if readings:
        readings_panel(axes[3], table, chance)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.title.set_fontsize(10)
    for ax in (axes[0], axes[2]):
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    print_table(table, base)
    print(f"wrote {png}")
    return 0


def readings_panel(ax, table, chance):
    """Accuracy at 64 and 256 tokens (head dim 32) of linear, DyDiLA and every reading of it (4 x: trained
    four times longer), and of the reference that grows the state; bars: the seeds' range."""
    rows = [(v, m) for v in ["linear", "dydila", *list(VARIANTS)[6:]] for m in (1, 4) if (v, 256, 32, m) in table
            or (v, 64, 32, m) in table]
    for j, n in enumerate((64, 256)):
        xs = [x + (j - 0.5) * 0.3 for x, (v, m) in enumerate(rows) if (v, n, 32, m) in table]
        got = [(table[(v, n, 32, m)]) for v, m in rows if (v, n, 32, m) in table]
        mid = [statistics.mean(float(r["accuracy"]) for r in rs) for rs in got]
        err = [[y - min(float(r["accuracy"]) for r in rs) for y, rs in zip(mid, got)],
               [max(float(r["accuracy"]) for r in rs) - y for y, rs in zip(mid, got)]]
        ax.errorbar(xs, mid, yerr=err, fmt="o", color=f"C{j}", capsize=3, label=f"N = {n}")
    ax.axhline(chance, color="gray", ls=":", lw=1)
    ax.set_xticks(range(len(rows)), [v.removeprefix("dydila-") + (" 4x" if m > 1 else "") for v, m in rows],
                  rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="query accuracy", ylim=(0, 1.02), title="readings of DyDiLA, and a feature map that grows the state")


def print_table(table, base):
    print("| variant | tokens | head dim | steps | accuracy (per seed) | mean | partner mass (per seed) | mean | "
          "entropy / log N | s per point |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    order = list(VARIANTS)
    for (variant, n, d, m), rs in sorted(table.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][3], kv[0][2] != 32,
                                                                         kv[0][2], kv[0][1])):
        rs = sorted(rs, key=lambda r: int(r["seed"]))
        acc, mass = [float(r["accuracy"]) for r in rs], [float(r["partner_mass"]) for r in rs]
        print(f"| {variant} | {n} | {d} | {m * base} | {' / '.join(f'{a:.3f}' for a in acc)} | "
              f"{statistics.mean(acc):.3f} | {' / '.join(f'{x:.3f}' for x in mass)} | {statistics.mean(mass):.3f} | "
              f"{statistics.mean(float(r['entropy']) for r in rs):.3f} | "
              f"{statistics.mean(float(r['seconds']) for r in rs):.0f} |")


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def get_parser():
    p = Parser("Associative recall (MQAR) on a token grid: one point, or the sweep over length and state size.")
    p.add_argument("--attn", type=name_of(list(VARIANTS)), default="dydila", metavar="VARIANT",
                   help=f"the attention variant of the point: {', '.join(VARIANTS)}")
    p.add_argument("--tokens", type=whole(4), default=64, help="N, an even square: the grid is sqrt(N) x sqrt(N), "
                   "N/2 key-value pairs")
    p.add_argument("--head-dim", type=whole(1), default=32, help=f"head dim d (width {TRAIN['width']} / d heads; a "
                   "linear head keeps a d x d state)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the model and the training examples")
    p.add_argument("--steps", type=whole(1), default=TRAIN["steps"], help="training steps (the sweep: the default for "
                   "every point)")
    p.add_argument("--threads", type=whole(1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the point as one JSON line")
    p.add_argument("--sweep", action="store_true", help="run every point of the sweep not yet in --csv (3 seeds "
                   "each), then draw --figure and print the table; stop it any time, it continues where it stopped")
    p.add_argument("--jobs", type=whole(1), default=2, help="with --sweep: points at a time, one thread each")
    p.add_argument("--csv", default=str(ROOT / "assets" / "recall.csv"), help="the sweep's points, one line each")
    p.add_argument("--figure", default=str(ROOT / "assets" / "recall.png"), help="the sweep's figure (an image file)")
    p.add_argument("--plot", action="store_true", help="only draw --figure and print the table from --csv")
    return p


def run(argv):
    args = get_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.sweep or args.plot:
        for flag, path in (("--csv", args.csv), ("--figure", args.figure)):
            check_writable(path, flag, folder=False)
        check_image_format(args.figure, "--figure")
        if args.plot and not Path(args.csv).exists():
            raise UserError(f"--csv {args.csv}: no such file; run --sweep first")
        return figure(Path(args.csv), Path(args.figure)) if args.plot else sweep(args)
    hw = grid(args.tokens)
    check_head_dim(args.head_dim)
    heads = TRAIN["width"] // args.head_dim                       # the measure's N x N weights, float64, and a copy
    check_fits(2 * 8 * MEASURE_EXAMPLES * heads * (hw[0] * hw[1]) ** 2, torch.device("cpu"),
               f"measuring {MEASURE_EXAMPLES} examples of --tokens {args.tokens}", "use fewer --tokens")
    point = train_point(args.attn, args.tokens, args.head_dim, args.seed, {**TRAIN, "steps": args.steps},
                        progress=not args.json)
    if args.json:
        print(json.dumps(point))
        return 0
    print(f"{point['variant']}, N = {point['tokens']} ({point['tokens'] // 2} key-value pairs), head dim "
          f"{point['head_dim']}, seed {point['seed']}, {args.steps} steps in {point['seconds']:.0f} s:")
    print(f"  query accuracy {point['accuracy']:.3f} (chance {1 / TRAIN['values']:.3f})")
    print(f"  partner mass per layer (uniform 1/N = {1 / point['tokens']:.4f}; exact retrieval 1): mean over heads "
          + " ".join(f"{m:.3f}" for m in point["partner_mass_per_layer"]) + ", best head "
          + " ".join(f"{m:.3f}" for m in point["best_head_per_layer"]))
    print(f"  the layer that retrieves most: partner mass {point['partner_mass']:.3f}, best head "
          f"{point['best_head']:.3f}, query rows' entropy / log N {point['entropy']:.3f}")
    return 0


def main(argv=None):
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
