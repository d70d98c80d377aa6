"""
See why linear attention over-smooths and how DyDiLA sharpens it.

    python visualize.py                                  # untrained modules on one image, CPU, about 10 s
    python visualize.py --ckpt runs/dit/ckpt.pt runs/lit/ckpt.pt runs/dydi/ckpt.pt --layer 3 --t 0.2 0.5 0.8

Writes into --out-dir (default ./viz): attention_maps.png, attention_smoothness.png, router_maps.png
(and dydila_parts_<run>.png per DyDiLA run with --ckpt), and explorer.html: one offline page where
pointing at any patch shows every model's attention row, at any layer, head and t. Timing:
tools/bench.py; ablation tables: tools/ablation.py. The measures (training/attention.py):

Smoothness of one attention row a (a distribution over the N keys):
  normalised entropy  H(a) / log N   1 = uniform, the over-smoothed limit; 0 = all weight on one key
  top-5% mass         the weight on the 5% largest entries; 0.05 for a uniform row
Retrieval, for runs of the copy probe (train_tiny.py --probe copy), where each token's content
equals its partner's, the token half the grid below or above it:
  partner mass        the weight on the partner key; 1/N for a uniform row, 1 for exact retrieval
"""

import math
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import dydilit as D
from training.attention import (ATTENTIONS, LABELS, layer_inputs, noised, partner_mass, partners, router_values,
                                row_entropy, summarise, top_mass)
from training.checkpoint import load_run, run_label
from training.cli import (Parser, UserError, check_distinct, check_fits, check_width_heads, check_writable, cli,
                          noise_level, real, seed, whole)
from training.data import (DEBIAN_FASHION_DIR, DEFAULT_DATA_DIR, held_out_image, load_cifar10, load_fashion_mnist,
                           make_synthetic, run_data)
from training.explorer import explorer_model, explorer_page, layer_maps, parts_of, plan_page
from training.figures import pyplot, save_figure

QUERIES = ((3, 3), (8, 8), (4, 12), (12, 5))            # (row, col) on a 16 x 16 token grid; scaled to others
PROBE_QUERIES = ((1, 3), (3, 12), (5, 7), (7, 1))       # the copy probe: queries in the top half


class Rows(NamedTuple):
    """One model's attention, labelled for a figure or a table."""
    label: str
    attention: torch.Tensor          # (1, h, N, N)


class View(NamedTuple):
    """What one trained run shows at one noise level t."""
    run: str                         # the run's folder name
    label: str                       # the model and the run: "DyDi-LiT — runs/dydi"
    t: float
    inputs: list                     # per layer: (attention module, its input (1, N, C))
    figure: object                   # LayerMaps of the figures' layer
    partner: object                  # copy-probe runs: partner mass (layers, heads), mean over the rows; else None


# ----------------------------------------------------------------------------------------
# Inputs: one image, as tokens
# ----------------------------------------------------------------------------------------

def find_image(data_dir, index):
    """(image (c, S, S) in [-1, 1], source name): CIFAR-10 or Fashion-MNIST if present, else synthetic.
    data_dir: --data-dir as given (None: ./data, and Debian's Fashion-MNIST folder)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        what = "is a file, not a folder" if Path(data_dir).exists() else "does not exist"
        raise UserError(f"--data-dir {data_dir} {what}: point it at a folder with CIFAR-10 or Fashion-MNIST, "
                        f"or leave it out (a synthetic image is used when none is found)")
    folder = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    if (folder / "cifar-10-batches-py").is_dir():
        data, name = load_cifar10(folder), "CIFAR-10 test"
    else:
        try:
            data, name = load_fashion_mnist(folder, explicit=False), "Fashion-MNIST test"
        except UserError:
            print(f"no CIFAR-10 or Fashion-MNIST in {folder} or {DEBIAN_FASHION_DIR}: using a synthetic image")
            data, name = make_synthetic(32), "synthetic"
    img, label = held_out_image(data, index, name)
    return img, f"{name} image {index} ({data.classes[label]})"


def image_tokens(img, width, patch=2, seed=0):
    """Patch tokens of an image for untrained modules: a fixed random linear patch embedding plus
    DiT's sin-cos position embedding, layer-normed. (c, S, S) -> (1, N, width), grid (H, W)."""
    c, S, _ = img.shape
    H = W = S // patch
    patches = img.unfold(1, patch, patch).unfold(2, patch, patch)        # (c, H, W, p, p)
    patches = patches.permute(1, 2, 0, 3, 4).reshape(H * W, c * patch * patch)  # (N, c p p)
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(c * patch * patch, width, generator=g) / math.sqrt(c * patch * patch)
    x = patches @ embed + D.sincos_pos_embed(width, H, W)
    return F.layer_norm(x, (width,))[None], (H, W)                       # (1, N, C)


def scaled_queries(hw, queries=QUERIES):
    H, W = hw
    return [(min(H - 1, r * H // 16), min(W - 1, c * W // 16)) for r, c in queries]


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------

def show_image(ax, img, queries, patch, title):
    from matplotlib.patches import Rectangle
    arr = ((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
    for k, (r, c) in enumerate(queries):
        ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, color=f"C{k}", lw=2))
        ax.text(c * patch + patch + 0.5, r * patch - 0.5, str(k + 1), color=f"C{k}", fontsize=10, weight="bold")
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def wrapped(text, width):
    """Long labels (a run's path) on several lines, so that a figure keeps its width."""
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in text.split("\n"))


def attention_maps_figure(path, img, patch, queries, rows, hw, head, title, mark_partners=False):
    """rows: Rows each. One figure row per label, one column per query; one colour scale per row.
    mark_partners: circle each query's copy-probe partner key."""
    plt = pyplot()
    n = len(queries)
    fig, axes = plt.subplots(len(rows), n + 1, figsize=(2.2 * (n + 1) + 0.6, 2.2 * len(rows) + 0.4), squeeze=False,
                             layout="constrained")
    for i, (label, A) in enumerate(rows):
        show_image(axes[i, 0], img, queries, patch, "queries" if i == 0 else "")
        axes[i, 0].text(-0.08, 0.5, wrapped(label.replace(": ", "\n"), 36), transform=axes[i, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=10)
        maps = [A[0, head, r * hw[1] + c].reshape(hw).float() for r, c in queries]
        vmax = max(m.max().item() for m in maps)
        for k, ((r, c), m) in enumerate(zip(queries, maps)):
            ax = axes[i, k + 1]
            im = ax.imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax)
            ax.plot(c, r, marker="s", mfc="none", mec=f"C{k}", ms=6, mew=1.5)
            ent = row_entropy(m.flatten()[None]).item()
            heading = f"query {k + 1}: H/logN {ent:.2f}"
            if mark_partners:
                p = int(partners(hw)[r * hw[1] + c])
                ax.plot(p % hw[1], p // hw[1], marker="o", mfc="none", mec="cyan", ms=9, mew=1.5)
                heading = f"q{k + 1}: H/logN {ent:.2f}, partner {m.flatten()[p].item() / m.sum().item():.2f}"
            ax.set_title(heading, fontsize=10 if not mark_partners else 9)
            ax.axis("off")
        fig.colorbar(im, ax=axes[i, -1], fraction=0.046, pad=0.04)
    marks = "; circle: the partner key" if mark_partners else ""
    fig.suptitle(f"{title}: attention rows on the {hw[0]}x{hw[1]} token grid (head {head}); one colour scale per "
                 f"row{marks}", fontsize=12)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def smoothness_figure(path, results, title):
    """results: Rows each. Entropy and top-5% mass distributions over all rows and heads."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.2 + 0.25 * len(results)))
    labels = [label for label, _ in results]
    ents = [row_entropy(A).flatten() for _, A in results]
    tops = [top_mass(A).flatten() for _, A in results]
    for ax, vals, heading in ((a1, ents, "row entropy / log N   (1 = uniform, over-smoothed)"),
                              (a2, tops, "attention mass on the top 5% of keys   (uniform = 0.05)")):
        clean = [v[~torch.isnan(v)].numpy() for v in vals]
        lo, hi = min(np.percentile(c, 0.5) for c in clean), max(np.percentile(c, 99.5) for c in clean)
        lo, hi = max(0.0, lo - 0.1 * (hi - lo)), min(1.0, hi + 0.1 * (hi - lo))
        groups = list(dict.fromkeys(label.split(" t=")[0] for label in labels))   # one colour per model, a dash per t
        for label, c in zip(labels, clean):
            group = label.split(" t=")[0]
            earlier = sum(1 for other in labels[:labels.index(label)] if other.split(" t=")[0] == group)
            dash = ["-", "--", ":", "-."][earlier % 4]
            ax.hist(c, bins=60, range=(lo, hi), density=True, histtype="step", lw=2, ls=dash,
                    color=f"C{groups.index(group)}", label=f"{wrapped(label, 44)}: mean {c.mean():.3f}")
        ax.set_xlim(lo, hi)
        ax.set_title(heading, fontsize=10)
        ax.set_ylabel("density of rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: every row of every head", fontsize=10)
    if a2.get_xlim()[0] <= 0.05:
        a2.axvline(0.05, color="gray", ls=":", lw=1)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def print_table(results, probe_hw=None):
    """Smoothness of each Rows; with probe_hw (the token grid of copy-probe runs) the partner mass too."""
    print(f"{'mechanism':<34} {'H/logN mean':>11} {'median':>7} {'top-5% mass':>11} {'zero rows':>9}"
          + (f" {'partner mass':>12}" if probe_hw else ""))
    for label, A in results:
        s = summarise(A)
        partner = f" {partner_mass(A, partners(probe_hw)).mean().item():>12.3f}" if probe_hw else ""
        print(f"{label:<34} {s['entropy_mean']:>11.3f} {s['entropy_median']:>7.3f} {s['top5_mass_mean']:>11.3f} "
              f"{s['zero_rows']:>4}/{s['rows']}{partner}")


ROUTERS = {"proj": "projector", "kernel": "exponent g", "lambda": "λ"}   # the three designs' routers, per side


def router_figure(path, img, patch, entries, head=0):
    """entries: list of (title, DyDiLA module, its input tokens x (1, N, C), hw). Per entry two rows
    (queries, keys) of each router's choice per token on the token grid: the projector (one
    colour each), the chosen exponent g and the chosen lambda (a colour scale over the bank's
    values); routers that choose per head ([C]'s routing) at head `head`. A static design's panel
    says so. Prints a warning for a collapsed router (> 95% of the tokens on one choice)."""
    plt = pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    fig, axes = plt.subplots(2 * len(entries), 1 + len(ROUTERS), squeeze=False, layout="constrained",
                             figsize=(3.0 * (1 + len(ROUTERS)), 2.9 * 2 * len(entries)))
    for i, (title, attn, x, hw) in enumerate(entries):
        routing, values = attn.routing(x), router_values(attn)
        for side, row in (("q", 2 * i), ("k", 2 * i + 1)):
            ax = axes[row, 0]
            if side == "q":
                show_image(ax, img, [], patch, wrapped(title, 34))
            else:
                ax.axis("off")
            for j, (design, name) in enumerate(ROUTERS.items()):
                key, ax = f"{design}_{side}", axes[row, j + 1]
                ax.axis("off")
                heading = f"{name}, {'queries' if side == 'q' else 'keys'}"
                if key not in routing:
                    ax.set_title(f"{heading}\n(static: no router)", fontsize=10)
                    continue
                choice = routing[key][0]                                # (N,); per head ([C]'s routing): (h, N)
                choice = choice[head] if choice.dim() == 2 else choice
                share = torch.bincount(choice, minlength=len(values[key])).max().item() / choice.numel()
                if share > 0.95:
                    print(f"warning: {title}: router '{key}' sends {100 * share:.0f}% of tokens to one choice "
                          f"(collapsed)")
                ax.set_title(f"{heading}\n(top choice: {100 * share:.0f}% of tokens)", fontsize=10)
                if design == "proj":                                    # categories: one colour per projector
                    n = len(values[key])
                    im = ax.imshow(choice.view(hw).numpy(), cmap=ListedColormap([f"C{k}" for k in range(n)]),
                                   norm=BoundaryNorm(np.arange(-0.5, n), n), interpolation="nearest")
                    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, ticks=range(n))
                    bar.ax.set_yticklabels([f"W^{k + 1}" for k in range(n)], fontsize=9)
                else:                                                   # the chosen value per token
                    v = values[key]
                    im = ax.imshow(v[choice].view(hw).numpy(), cmap="viridis", vmin=v.min().item(),
                                   vmax=max(v.max().item(), v.min().item() + 1e-6), interpolation="nearest")
                    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
                    bar.ax.tick_params(labelsize=9)
                bar.set_label(name, fontsize=9)
    save_figure(fig, path, dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------

def untrained(args, out):
    """The three attention variants, same width, same seed (so the same Q and K), on one image's tokens."""
    img, source = find_image(args.data_dir, args.index)
    x, hw = image_tokens(img, args.width, seed=args.seed)
    modules = {}
    for kind in ATTENTIONS:
        torch.manual_seed(args.seed)                          # qkv is built first in each: identical Q, K, V weights
        modules[kind] = D.make_attention(kind, args.width, args.heads, reading=args.reading if kind == "dydila"
                                         else "ours").eval()
    labels = {**LABELS, **({"dydila": f"DyDiLA, reading {args.reading}"} if args.reading != "ours" else {})}
    with torch.no_grad():
        results = [Rows(labels[kind], layer_maps(modules[kind], x, hw).maps["attention"][None]) for kind in ATTENTIONS]
    plan = plan_page([(1, args.heads, parts_of(m)) for m in modules.values()], 1, hw, 0, args.page_mb, args.page_bits)
    explorer = [explorer_model(labels[kind], [[(modules[kind], x)]], hw, plan) for kind in ATTENTIONS]
    explorer_page(out / "explorer.html", [img], [None], 0, args.head, explorer, hw, plan)
    print(f"untrained modules (width {args.width}, {args.heads} heads, seed {args.seed}) on {source}")
    print(f"explorer.html: {plan.summary}")
    title = "untrained, same Q/K weights"
    attention_maps_figure(out / "attention_maps.png", img, 2, scaled_queries(hw), results, hw, args.head, title)
    smoothness_figure(out / "attention_smoothness.png", results, title)
    print_table(results)
    router_figure(out / "router_maps.png", img, 2, [("untrained DyDiLA", modules["dydila"], x, hw)], args.head)
    return ["attention_maps.png", "attention_smoothness.png", "router_maps.png", "explorer.html"]


def from_checkpoints(args, out):
    """Trained runs on one held-out image noised to each t: the page at every layer, the figures at one."""
    runs = [load_run(path) for path in args.ckpt]
    layer = len(runs[0].model.blocks) // 2 if args.layer is None else args.layer
    check_comparable(runs, layer, args.head)               # before any computation
    img, label, source = held_out(runs[0].args, args.data_dir, args.index)
    x0, y = img[None], torch.tensor([label])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    hw, probe = runs[0].model.hw, bool(vars(runs[0].args).get("probe"))
    views = [look(run, t, x0, y, noise, layer, probe) for run in runs for t in args.t]
    print(f"{len(runs)} checkpoint(s), layer {layer}, t = {args.t}, on {source}")
    plan = plan_page([(len(r.model.blocks), r.model.blocks[0].attn.num_heads, parts_of(r.model.blocks[0].attn))
                      for r in runs], len(args.t), hw, layer, args.page_mb, args.page_bits, probe)
    explorer = [explorer_model(views[i].label, [v.inputs for v in views[i:i + len(args.t)]], hw, plan, probe=probe)
                for i in range(0, len(views), len(args.t))]        # a model per run, its layers at every t
    images = [noised(runs[0].objective, x0, t, noise)[0][0] for t in args.t]   # the first run's objective noises it
    explorer_page(out / "explorer.html", images, args.t, layer, args.head, explorer, hw, plan, probe=probe)
    print(f"explorer.html: {plan.summary}")
    return [*trained_figures(out, views, img, hw, layer, args.head, probe), "explorer.html"]


def held_out(run_args, data_dir, index):
    """(image (c, S, S) in [-1, 1], its label, its name): held-out image `index` of a run's data."""
    try:
        data = run_data(run_args, data_dir)
    except UserError as e:
        raise UserError(f"the checkpoints' dataset is needed for real samples: {e}") from None
    img, label = held_out_image(data, index, run_args.dataset)
    return img, label, f"{run_args.dataset} validation image {index} ({data.classes[label]})"


def trained_figures(out, views, img, hw, layer, head, probe):
    """The views' attention rows and smoothness at one layer, and their table (with the copy probe's
    partner mass); DyDiLA's router maps and, per DyDiLA run, its parts. Returns the files' names."""
    patch, queries = img.shape[-1] // hw[0], scaled_queries(hw, PROBE_QUERIES if probe else QUERIES)
    maps = [Rows(f"{v.label} t={v.t:g}", v.figure.maps["attention"][None]) for v in views]
    title = f"trained, layer {layer}"
    attention_maps_figure(out / "attention_maps.png", img, patch, queries, maps, hw, head, title, mark_partners=probe)
    smoothness_figure(out / "attention_smoothness.png", maps, title)
    print_table(maps, hw if probe else None)
    if probe:
        print_partner_mass(views, hw)
    dydila = [v for v in views if isinstance(v.inputs[layer][0], D.DyDiLA)]
    if not dydila:
        return ["attention_maps.png", "attention_smoothness.png"]
    router_figure(out / "router_maps.png", img, patch, [(f"{v.label} t={v.t:g}", *v.inputs[layer], hw) for v in dydila],
                  head)
    parts = []
    for run in dict.fromkeys(v.run for v in dydila):       # one figure per DyDiLA run: its parts at each t
        rows = [Rows(f"t={v.t:g}: {part}", A[None]) for v in dydila if v.run == run
                for part, A in figure_parts(v.figure.maps).items()]
        attention_maps_figure(out / f"dydila_parts_{run}.png", img, patch, queries, rows, hw, head,
                              f"{run}: DyDiLA's parts, layer {layer}")
        parts.append(f"dydila_parts_{run}.png")
    return ["attention_maps.png", "attention_smoothness.png", "router_maps.png", *parts]


@torch.no_grad()
def look(run, t, x0, y, noise, layer, probe):
    """A View of run at noise level t: every layer's input, the figures' layer in full, and (copy-probe
    runs) each layer's partner mass, one layer at a time."""
    inputs, hw = layer_inputs(run.model, run.objective, x0, y, t, noise), run.model.hw
    partner = torch.stack([partner_mass(attn.attention_matrix(x, hw)[0], partners(hw)).mean(-1)
                           for attn, x in inputs]) if probe else None                  # (layers, heads)
    return View(run.path.parent.name, f"{run_label(run.args)} — {run.path.parent}", t, inputs,
                layer_maps(*inputs[layer], hw), partner)


def figure_parts(maps):
    """DyDiLA's parts in the order they are made: the kernels alone, the redundancy, the differential."""
    return {"base": maps["base"], **({"redundancy": maps["redundancy"]} if "redundancy" in maps else {}),
            "differential": maps["attention"]}


def print_partner_mass(views, hw):
    """Each view's partner mass per layer (mean over heads and rows) and of each layer's best head."""
    print(f"partner mass per layer, all heads and rows (uniform: 1/N = {1 / (hw[0] * hw[1]):.3f}; exact retrieval: "
          f"1), and of each layer's best head:")
    for v in views:
        layers = v.partner.mean(1)
        print(f"{v.label + f' t={v.t:g}':<34} " + " ".join(f"{m:.3f}" for m in layers) + f"   mean {layers.mean():.3f}"
              "   best heads " + " ".join(f"{m:.3f}" for m in v.partner.amax(1)))


def check_comparable(runs, layer, head):
    """One line, before any computation, unless the runs can be drawn side by side: each names its
    data, all share it and one token grid, --layer and --head exist."""
    first = runs[0]
    for run in runs:
        a = run.args
        if "dataset" not in vars(a):
            raise UserError(f"{run.path} does not name the data it was trained on (no 'dataset' among its args): "
                            f"visualize.py draws the attention on one of its held-out images; save it with "
                            f"args={{'dataset': ...}}")
        data, data0 = ((r.args.dataset, r.args.image_size, vars(r.args).get("probe")) for r in (run, first))
        if data != data0:
            raise UserError(f"{run.path} was trained on {data[0]} at {data[1]}px (probe {data[2]}), {first.path} on "
                            f"{data0[0]} at {data0[1]}px (probe {data0[2]}): compare runs on the same data")
        if run.model.hw != first.model.hw:
            raise UserError(f"{run.path} sees a {run.model.hw[0]}x{run.model.hw[1]} token grid ({a.model}), "
                            f"{first.path} a {first.model.hw[0]}x{first.model.hw[1]} grid ({first.args.model}): "
                            f"attention rows compare on one grid; draw these runs apart")
        if not 0 <= layer < len(run.model.blocks):
            raise UserError(f"--layer {layer} is out of range: {run.path} has layers 0..{len(run.model.blocks) - 1}")
        if not 0 <= head < run.model.blocks[0].attn.num_heads:
            raise UserError(f"--head {head} is out of range: {run.path} has heads "
                            f"0..{run.model.blocks[0].attn.num_heads - 1}")


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def get_parser():
    p = Parser("Attention maps, smoothness and router maps of softmax, linear and DyDiLA attention.")
    p.add_argument("--out-dir", default="viz", help="folder for the PNG figures and explorer.html")
    p.add_argument("--data-dir", default=None, help="where a CIFAR-10 or Fashion-MNIST image is looked for, also for "
                   f"--ckpt runs (default: {DEFAULT_DATA_DIR} and Debian's {DEBIAN_FASHION_DIR}; else a synthetic "
                   "image)")
    p.add_argument("--index", type=whole(0), default=0, help="which held-out image to use")
    p.add_argument("--head", type=whole(0), default=0, help="the head whose attention maps are drawn (numbers use "
                   "all heads)")
    p.add_argument("--width", type=whole(1), default=192, help="channels of the untrained modules")
    p.add_argument("--heads", type=whole(1), default=3, help="heads of the untrained modules")
    p.add_argument("--seed", type=seed, default=0, help="seed of the untrained modules and of the noise")
    p.add_argument("--reading", default="ours", choices=list(D.READINGS), help="the untrained DyDiLA under another "
                   "reading of the paper (dydilit.READINGS; --ckpt runs keep their own): [C]'s c-init, c-routing, "
                   "c-output, or c, all three; signed rows (c-output, c) are measured and drawn by magnitude")
    p.add_argument("--ckpt", nargs="+", default=None, metavar="CKPT", help="train_tiny.py checkpoints to visualise "
                   "instead")
    p.add_argument("--layer", type=whole(0), default=None, help="with --ckpt: the block whose attention is shown "
                   "(default: the middle)")
    p.add_argument("--t", type=noise_level, nargs="+", default=[0.2, 0.5, 0.8], help="with --ckpt: noise levels t "
                   "in [0, 1] (1 = pure noise)")
    p.add_argument("--page-mb", type=real(0, open_low=True), default=5, help="explorer.html's size budget: it stores, "
                   "in this order, the mean of the heads at --layer (and DyDiLA's parts there), the mean at the other "
                   "layers, each head at --layer, then the rest, as far as this many MB allow; it prints what it "
                   "stored and left out")
    p.add_argument("--page-bits", type=int, choices=(4, 8), default=4, help="bits per stored attention weight in "
                   "explorer.html (of each row's maximum; the numbers shown are exact)")
    return p


def run(argv):
    args = get_parser().parse_args(argv)
    out = Path(args.out_dir)
    check_width_heads(args.width, args.heads)
    if args.width % 4:                                       # the tokens carry DiT's 2-D sin-cos position embedding
        raise UserError(f"--width {args.width} must be a multiple of 4 (a quarter each for sin and cos of the "
                        f"column and the row of the position embedding)")
    if not args.ckpt and args.head >= args.heads:
        raise UserError(f"--head {args.head} is out of range: the modules have heads 0..{args.heads - 1}")
    if not args.ckpt:                                        # the modules' weights and one head's N x N rows
        check_fits(4 * 16 * args.width ** 2 + 8 * args.heads * 256 ** 2, torch.device("cpu"),
                   f"untrained modules of width {args.width}", "use a smaller --width")
    check_distinct(args.ckpt or [], "--ckpt")
    check_writable(out, "--out-dir")
    out.mkdir(parents=True, exist_ok=True)
    written = from_checkpoints(args, out) if args.ckpt else untrained(args, out)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


def main(argv=None):
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
