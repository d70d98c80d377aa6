"""
See why linear attention over-smooths and how DyDiLA sharpens it.

    python visualize.py                                  # untrained modules on one image, CPU, about 10 s
    python visualize.py --ckpt runs/dit/ckpt.pt runs/lit/ckpt.pt runs/dydi/ckpt.pt --layer 3 --t 0.2 0.5 0.8

Writes into --out-dir (default ./viz): attention_maps.png, attention_smoothness.png, router_maps.png
(and dydila_parts_<run>.png per DyDiLA run with --ckpt), and explorer.html: one offline page where
pointing at any patch shows every model's attention row, at any layer, head and t. Timing:
tools/bench.py; ablation tables: tools/ablation.py.

Smoothness of one attention row a (a distribution over the N keys):
  normalised entropy  H(a) / log N   1 = uniform, the over-smoothed limit; 0 = all weight on one key
  top-5% mass         the weight on the 5% largest entries; 0.05 for a uniform row
Retrieval, for runs of the copy probe (train_tiny.py --probe copy), where each token's content
equals its partner's, the token half the grid below or above it:
  partner mass        the weight on the partner key; 1/N for a uniform row, 1 for exact retrieval
"""

import argparse
import base64
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dydilit as D
from training.data import (DEBIAN_FASHION_DIR, DEFAULT_DATA_DIR, load_cifar10, load_data, load_fashion_mnist, make_synthetic,
                           to_float, to_uint8)
from training.evaluation import load_run, pyplot
from training.run import HelpFormatter, UserError, atomic_write, check_writable, cli

MECHANISMS = ("softmax", "linear", "dydila")
LABELS = {"softmax": "softmax (DiT)", "linear": "linear (LiT)", "dydila": "DyDiLA (DyDi-LiT)"}
QUERIES = ((3, 3), (8, 8), (4, 12), (12, 5))            # (row, col) on a 16 x 16 token grid; scaled to others
PROBE_QUERIES = ((1, 3), (3, 12), (5, 7), (7, 1))       # the copy probe: queries in the top half
EXPLORER_TEMPLATE = Path(__file__).resolve().parent / "training" / "explorer.html"


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------

def row_entropy(A):
    """Normalised entropy of each row of A (..., N): H / log N in [0, 1]. Rows summing to 0 give nan."""
    A = A.double()
    s = A.sum(-1, keepdim=True)
    p = A / s
    h = -torch.xlogy(p, p).sum(-1) / math.log(A.shape[-1])
    return h.masked_fill(s.squeeze(-1) == 0, float("nan"))


def top_mass(A, frac=0.05):
    """Share of each row's weight on its top ceil(frac * N) entries. Rows summing to 0 give nan."""
    A = A.double()
    s = A.sum(-1)
    k = max(1, math.ceil(frac * A.shape[-1] - 1e-9))
    return (A.topk(k, dim=-1).values.sum(-1) / s).masked_fill(s == 0, float("nan"))


def partners(hw):
    """The copy probe's partner of each token: the same column, half the grid below or above. -> (N,)"""
    H, W = hw
    i = torch.arange(H * W)
    return ((i // W + H // 2) % H) * W + i % W


def partner_mass(A, hw):
    """Share of each row's weight on its partner key, A (..., N, N) -> (..., N): 1/N for a uniform
    row, 1 for a row that retrieves exactly its partner. Rows summing to 0 give nan."""
    A = A.double()
    s = A.sum(-1)
    i = torch.arange(A.shape[-1])
    return (A[..., i, partners(hw)] / s).masked_fill(s == 0, float("nan"))


def summarise(A):
    """Dict of smoothness numbers over all rows (and heads) of A (B, h, N, N)."""
    h, m = row_entropy(A).flatten(), top_mass(A).flatten()
    ok = ~torch.isnan(h)
    return {"entropy_mean": h[ok].mean().item(), "entropy_median": h[ok].median().item(),
            "top5_mass_mean": m[ok].mean().item(), "rows": int(ok.numel()), "zero_rows": int((~ok).sum())}


# ----------------------------------------------------------------------------------------
# Inputs: one image, as tokens
# ----------------------------------------------------------------------------------------

def find_image(data_dir, index):
    """(image (c, S, S) in [-1, 1], source name): CIFAR-10 or Fashion-MNIST if present, else synthetic.
    data_dir: --data-dir as given (None: ./data, and Debian's Fashion-MNIST folder)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist: point it at a folder with CIFAR-10 or Fashion-MNIST, "
                          f"or leave it out (a synthetic image is used when none is found)")
    folder = Path(data_dir or DEFAULT_DATA_DIR)
    if (folder / "cifar-10-batches-py").is_dir():
        data, name = load_cifar10(folder), "CIFAR-10 test"
    else:
        try:
            data, name = load_fashion_mnist(folder, explicit=False), "Fashion-MNIST test"
        except UserError:
            print(f"no CIFAR-10 or Fashion-MNIST in {folder} or {DEBIAN_FASHION_DIR}: using a synthetic image")
            data, name = make_synthetic(32), "synthetic"
    i = held_out_index(index, data, name)
    return to_float(data.val_x[i]), f"{name} image {i} ({data.classes[int(data.val_y[i])]})"


def run_data(a, data_dir):
    """The data of a run (load_run's namespace a; train_tiny's flags where the run kept them, at
    least its dataset): from --data-dir if given, else where the run read it if that folder still
    exists, else the default places."""
    kept = vars(a)
    if data_dir is None and kept.get("data_dir") is not None and Path(kept["data_dir"]).is_dir():
        data_dir = kept["data_dir"]
    return load_data(a.dataset, data_dir, a.image_size, a.num_classes, kept.get("class_list"),
                     kept.get("cache_dir", "./data/cache"), probe=kept.get("probe"))


def held_out_index(index, data, name):
    if not 0 <= index < len(data.val_x):
        raise UserError(f"--index {index} is out of range: the {name} held-out set has images 0..{len(data.val_x) - 1}")
    return index


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


def attention_maps_figure(path, img, patch, queries, rows, hw, head, title, mark_partners=False):
    """rows: list of (label, A (1, h, N, N)). One figure row per label, one column per query;
    one colour scale per row. mark_partners: circle each query's copy-probe partner key."""
    plt = pyplot()
    n = len(queries)
    fig, axes = plt.subplots(len(rows), n + 1, figsize=(2.2 * (n + 1) + 0.6, 2.2 * len(rows) + 0.4), squeeze=False,
                             layout="constrained")
    for i, (label, A) in enumerate(rows):
        show_image(axes[i, 0], img, queries, patch, "queries" if i == 0 else "")
        axes[i, 0].text(-0.08, 0.5, label.replace(": ", "\n"), transform=axes[i, 0].transAxes, rotation=90,
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
    fig.suptitle(f"{title}: attention rows on the {hw[0]}x{hw[1]} token grid (head {head}); one colour scale per row{marks}",
                 fontsize=12)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def smoothness_figure(path, results, title):
    """results: list of (label, A). Entropy and top-5% mass distributions over all rows and heads."""
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
            dash = ["-", "--", ":", "-."][sum(1 for l in labels[:labels.index(label)] if l.split(" t=")[0] == group) % 4]
            ax.hist(c, bins=60, range=(lo, hi), density=True, histtype="step", lw=2, ls=dash,
                    color=f"C{groups.index(group)}", label=f"{label}: mean {c.mean():.3f}")
        ax.set_xlim(lo, hi)
        ax.set_title(heading, fontsize=10)
        ax.set_ylabel("density of rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: every row of every head", fontsize=10)
    if a2.get_xlim()[0] <= 0.05:
        a2.axvline(0.05, color="gray", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results, probe_hw=None):
    """Smoothness of each (label, A); with probe_hw (the token grid of copy-probe runs) the partner mass too."""
    print(f"{'mechanism':<34} {'H/logN mean':>11} {'median':>7} {'top-5% mass':>11} {'zero rows':>9}"
          + (f" {'partner mass':>12}" if probe_hw else ""))
    for label, A in results:
        s = summarise(A)
        print(f"{label:<34} {s['entropy_mean']:>11.3f} {s['entropy_median']:>7.3f} {s['top5_mass_mean']:>11.3f} "
              f"{s['zero_rows']:>4}/{s['rows']}" + (f" {partner_mass(A, probe_hw).nanmean().item():>12.3f}" if probe_hw else ""))


ROUTERS = {"proj": "projector", "kernel": "exponent g", "lambda": "λ"}   # the three designs' routers, per side


def router_values(attn):
    """What each router's choices stand for: {name: (n,) values}: projector numbers 1..n_P,
    the current exponents g, the current lambdas (routers that exist only)."""
    values = {"kernel_q": attn.kernel_q.exponents, "kernel_k": attn.kernel_k.exponents}
    if attn.differential is not None:
        values.update(lambda_q=attn.differential.lambda_q, lambda_k=attn.differential.lambda_k)
        values.update({name: torch.arange(1.0, len(side.projectors) + 1)
                       for name, side in (("proj_q", attn.redundancy_q), ("proj_k", attn.redundancy_k))})
    return {name: v.detach().float() for name, v in values.items()}


def router_figure(path, img, patch, entries):
    """entries: list of (title, DyDiLA module, its input tokens x (1, N, C), hw). Per entry two rows
    (queries, keys) of each router's choice per token on the token grid: the projector (one
    colour each), the chosen exponent g and the chosen lambda (a colour scale over the bank's
    values). A static design's panel says so. Prints a warning for a collapsed router (> 95% of
    the tokens on one choice)."""
    plt = pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    fig, axes = plt.subplots(2 * len(entries), 1 + len(ROUTERS), figsize=(3.0 * (1 + len(ROUTERS)), 2.9 * 2 * len(entries)),
                             squeeze=False, layout="constrained")
    for i, (title, attn, x, hw) in enumerate(entries):
        routing, values = attn.routing(x), router_values(attn)
        for side, row in (("q", 2 * i), ("k", 2 * i + 1)):
            ax = axes[row, 0]
            if side == "q":
                show_image(ax, img, [], patch, title)
            else:
                ax.axis("off")
            for j, (design, name) in enumerate(ROUTERS.items()):
                key, ax = f"{design}_{side}", axes[row, j + 1]
                ax.axis("off")
                heading = f"{name}, {'queries' if side == 'q' else 'keys'}"
                if key not in routing:
                    ax.set_title(f"{heading}\n(static: no router)", fontsize=10)
                    continue
                choice = routing[key][0]                                # (N,)
                share = torch.bincount(choice, minlength=len(values[key])).max().item() / choice.numel()
                if share > 0.95:
                    print(f"warning: {title}: router '{key}' sends {100 * share:.0f}% of tokens to one choice (collapsed)")
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
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# The explorer page
# ----------------------------------------------------------------------------------------

def layer_maps(attn, x, hw):
    """What the explorer shows of one attention module on its input x (1, N, C): its maps
    {"attention": (h, N, N)} (DyDiLA also "base", "redundancy": attention_parts), and for DyDiLA the
    query side's routing {name: (N,)} and banks {name: values}."""
    maps, routing, banks = {"attention": attn.attention_matrix(x, hw)[0]}, {}, {}
    if isinstance(attn, D.DyDiLA):
        parts = attn.attention_parts(x, hw)
        maps.update({k: parts[k][0] for k in ("base", "redundancy") if k in parts})
        routing = {k: v[0] for k, v in attn.routing(x).items() if k.endswith("_q")}
        values = router_values(attn)
        banks = {k: values[k].tolist() for k in ("kernel_q", "lambda_q") if k in values}
    return maps, routing, banks


def explorer_model(label, grid, hw, probe=False):
    """One model of the page from grid[t][layer] = layer_maps(...) (every t, every layer): its maps
    stacked (T, depth, h, N, N), each row quantised to uint8 of its maximum, with each row's exact
    numbers (entropy / log N, top-5% mass; with probe, copy-probe runs, the partner mass); its routing
    (T, depth, N); its banks per layer. The layout is described in training/explorer.html."""
    def stacked(pick):                                                            # grid -> one (T, depth, ...) tensor
        return torch.stack([torch.stack([pick(cell) for cell in layers]) for layers in grid])

    model = {"label": label, "depth": len(grid[0]), "heads": grid[0][0][0]["attention"].shape[0], "maps": {}}
    for part in grid[0][0][0]:
        A = stacked(lambda cell: cell[0][part]).double()                          # (T, depth, h, N, N)
        rowmax = A.amax(-1)                                                       # (T, depth, h, N)
        full = torch.cat([A, A.mean(2, keepdim=True)], 2)                          # (T, depth, h + 1, N, N): + the heads' mean
        model["maps"][part] = {"rows": b64((A / rowmax.clamp_min(1e-300)[..., None] * 255).round(), np.uint8),
                               "rowmax": b64(rowmax, np.float32),
                               "entropy": b64(row_entropy(full), np.float32), "top5": b64(top_mass(full), np.float32)}
        if probe:
            model["maps"][part]["partner"] = b64(partner_mass(full, hw), np.float32)
    if grid[0][0][1]:                                                             # DyDiLA: routing and banks
        model["routing"] = {k: b64(stacked(lambda cell: cell[1][k]), np.uint8) for k in grid[0][0][1]}
        model["banks"] = {k: [cell[2][k] for cell in grid[0]] for k in grid[0][0][2]}
    return model


def b64(tensor, dtype):
    """A tensor as base64 of its little-endian bytes, row-major (what the page's decode() reads)."""
    return base64.b64encode(np.ascontiguousarray(tensor.numpy(), dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def explorer_page(path, images, ts, layer, head, models, hw, probe=False):
    """Writes the page: the template training/explorer.html with its data. images: per t the image
    the models saw, (c, S, S) in [-1, 1]; ts: the noise levels ([None]: untrained modules); layer,
    head: the figures' (the page's defaults); models: explorer_model(...) each."""
    data = {"grid": list(hw), "patch": images[0].shape[-1] // hw[1], "size": images[0].shape[-1],
            "channels": images[0].shape[0], "ts": list(ts), "layer": layer, "head": head,
            "images": [b64(to_uint8(img).permute(1, 2, 0), np.uint8) for img in images],
            "partners": partners(hw).tolist() if probe else None, "models": models}
    page = EXPLORER_TEMPLATE.read_text().replace("/*DATA*/", json.dumps(data).replace("</", "<\\/"))
    with atomic_write(path) as tmp:
        tmp.write_text(page)


# ----------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------

def untrained(args, out):
    """The three mechanisms, same width, same seed (so the same Q and K), on one image's tokens."""
    img, source = find_image(args.data_dir, args.index)
    x, hw = image_tokens(img, args.width, seed=args.seed)
    queries = scaled_queries(hw)
    results, modules, explorer = [], {}, []
    with torch.no_grad():
        for kind in MECHANISMS:
            torch.manual_seed(args.seed)                      # qkv is built first in each: identical Q, K, V weights
            modules[kind] = D.ATTENTIONS[kind](args.width, args.heads).eval()
            grid = [[layer_maps(modules[kind], x, hw)]]       # one t, one layer: the module
            results.append((LABELS[kind], grid[0][0][0]["attention"][None]))
            explorer.append(explorer_model(LABELS[kind], grid, hw))
    explorer_page(out / "explorer.html", [img], [None], 0, args.head, explorer, hw)
    print(f"untrained modules (width {args.width}, {args.heads} heads, seed {args.seed}) on {source}")
    title = "untrained, same Q/K weights"
    attention_maps_figure(out / "attention_maps.png", img, 2, queries, results, hw, args.head, title)
    smoothness_figure(out / "attention_smoothness.png", results, title)
    print_table(results)
    dy = modules["dydila"]
    router_figure(out / "router_maps.png", img, 2, [("untrained DyDiLA", dy, x, hw)])
    return ["attention_maps.png", "attention_smoothness.png", "router_maps.png", "explorer.html"]


def noised(objective, x0, t, noise):
    """x0 noised to t as the objective does it, and the model's time input: x_t, t (1,)."""
    if isinstance(objective, D.DDPM):
        steps = torch.full((1,), min(objective.num_timesteps - 1, round(t * objective.num_timesteps)))
        return objective.q_sample(x0, steps, noise), steps.float() / objective.num_timesteps
    tt = torch.full((1,), float(t))
    return objective.interpolate(x0, tt, noise), tt


def layer_inputs(model, objective, x0, y, t, noise):
    """Run the model on x_t; for every block, its attention module and that module's input."""
    xt, tt = noised(objective, x0, t, noise)
    seen = []

    def keep_input(module, inputs):                         # returns None: the inputs pass through unchanged
        seen.append((module, inputs[0]))
    handles = [block.attn.register_forward_pre_hook(keep_input) for block in model.blocks]
    with torch.no_grad():
        model(xt, tt, y)
    for handle in handles:
        handle.remove()
    return seen


def partner_mass_per_head(model, objective, x0, y, t, noise):
    """Mean partner mass (over the rows) of every head of every layer on a copy-probe image x0 noised
    to t: (layers, heads) tensor."""
    with torch.no_grad():
        return torch.stack([partner_mass(attn.attention_matrix(x, model.hw), model.hw)[0].nanmean(-1)
                            for attn, x in layer_inputs(model, objective, x0, y, t, noise)])


def from_checkpoints(args, out):
    runs = [(p, *load_run(p)[:3]) for p in args.ckpt]
    first = runs[0][3]
    check_comparable(runs, args)                           # before any computation
    try:
        data = run_data(first, args.data_dir)
    except UserError as e:
        raise UserError(f"the checkpoints' dataset is needed for real samples: {e}") from None
    i = held_out_index(args.index, data, first.dataset)
    img = to_float(data.val_x[i])
    x0, y = img[None], data.val_y[i:i + 1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    maps, routers, parts, retrieval, explorer = [], [], [], [], []
    hw, probe = runs[0][1].hw, getattr(first, "probe", None)
    for path, model, objective, a in runs:
        name, grid = f"{a.attn} ({Path(path).parent.name})", []  # grid: every t and layer, for the explorer
        for t in args.t:
            inputs = layer_inputs(model, objective, x0, y, t, noise)
            with torch.no_grad():
                grid.append([layer_maps(attn, x, hw) for attn, x in inputs])
            attn, x = inputs[args.layer]
            shown = grid[-1][args.layer][0]                                  # the figures' layer
            if probe:
                retrieval.append((f"{name} t={t:g}", partner_mass_per_head(model, objective, x0, y, t, noise)))
            maps.append((f"{name} t={t:g}", shown["attention"][None]))
            if isinstance(attn, D.DyDiLA):
                routers.append((f"{name} t={t:g}", attn, x, hw))
                parts.append((Path(path).parent.name, t, {"base": shown["base"][None], **({"redundancy": shown["redundancy"][None]}
                              if "redundancy" in shown else {}), "differential": shown["attention"][None]}))
        explorer.append(explorer_model(name, grid, hw, probe=bool(probe)))
    images = [noised(runs[0][2], x0, t, noise)[0][0] for t in args.t]  # the first run's objective noises the image
    explorer_page(out / "explorer.html", images, args.t, args.layer, args.head, explorer, hw, probe=bool(probe))
    patch = first.image_size // hw[0]
    queries = scaled_queries(hw, PROBE_QUERIES if probe else QUERIES)
    print(f"{len(runs)} checkpoint(s), layer {args.layer}, t = {args.t}, on {first.dataset} validation image {i} "
          f"({data.classes[int(y)]})")
    written = ["attention_maps.png", "attention_smoothness.png", "explorer.html"]
    title = f"trained, layer {args.layer}"
    attention_maps_figure(out / "attention_maps.png", img, patch, queries, maps, hw, args.head, title, mark_partners=bool(probe))
    smoothness_figure(out / "attention_smoothness.png", maps, title)
    print_table(maps, hw if probe else None)
    if retrieval:
        print(f"partner mass per layer, all heads and rows (uniform: 1/N = {1 / (hw[0] * hw[1]):.3f}; exact retrieval: 1), "
              f"and of each layer's best head:")
        for label, heads in retrieval:
            layers = heads.mean(1)
            print(f"{label:<34} " + " ".join(f"{v:.3f}" for v in layers) + f"   mean {layers.mean():.3f}   best heads "
                  + " ".join(f"{v:.3f}" for v in heads.amax(1)))
    if routers:
        router_figure(out / "router_maps.png", img, patch, routers)
        written.append("router_maps.png")
        for run in dict.fromkeys(run for run, _, _ in parts):          # one figure per DyDiLA run
            rows = [(f"t={t:g}: {part}", A) for r, t, p in parts if r == run for part, A in p.items()]
            name = f"dydila_parts_{run}.png"
            attention_maps_figure(out / name, img, patch, queries, rows, hw, args.head, f"{run}: DyDiLA's parts, layer {args.layer}")
            written.append(name)
    return written


def check_comparable(runs, args):
    """One line, before any computation, unless the runs (path, model, objective, namespace) can be
    drawn side by side: each names its data, all share it and one token grid, --layer and --head exist."""
    path0, model0, _, first = runs[0]
    for path, model, objective, a in runs:
        if "dataset" not in vars(a):
            raise UserError(f"{path} does not name the data it was trained on (no 'dataset' among its args): visualize.py "
                            f"draws the attention on one of its held-out images; save it with args={{'dataset': ...}}")
        data, data0 = (a.dataset, a.image_size, vars(a).get("probe")), (first.dataset, first.image_size, vars(first).get("probe"))
        if data != data0:
            raise UserError(f"{path} was trained on {data[0]} at {data[1]}px (probe {data[2]}), {path0} on {data0[0]} at "
                            f"{data0[1]}px (probe {data0[2]}): compare runs on the same data")
        if model.hw != model0.hw:
            raise UserError(f"{path} sees a {model.hw[0]}x{model.hw[1]} token grid ({a.model}), {path0} a "
                            f"{model0.hw[0]}x{model0.hw[1]} grid ({first.model}): attention rows compare on one grid; "
                            f"draw these runs apart")
        if not 0 <= args.layer < len(model.blocks):
            raise UserError(f"--layer {args.layer} is out of range: {path} has layers 0..{len(model.blocks) - 1}")
        if not 0 <= args.head < model.blocks[0].attn.num_heads:
            raise UserError(f"--head {args.head} is out of range: {path} has heads 0..{model.blocks[0].attn.num_heads - 1}")


def get_parser():
    p = argparse.ArgumentParser(description="Attention maps, smoothness and router maps of softmax, linear and DyDiLA attention.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="viz", help="folder for the PNGs")
    p.add_argument("--data-dir", default=None, help="where a CIFAR-10 or Fashion-MNIST image is looked for, also for --ckpt runs (default: "
                   f"{DEFAULT_DATA_DIR} and Debian's {DEBIAN_FASHION_DIR}; else a synthetic image)")
    p.add_argument("--index", type=int, default=0, help="which held-out image to use")
    p.add_argument("--head", type=int, default=0, help="the head whose attention maps are drawn (numbers use all heads)")
    p.add_argument("--width", type=int, default=192, help="channels of the untrained modules")
    p.add_argument("--heads", type=int, default=3, help="heads of the untrained modules")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained modules and of the noise")
    p.add_argument("--ckpt", nargs="+", default=None, metavar="CKPT", help="train_tiny.py checkpoints to visualise instead")
    p.add_argument("--layer", type=int, default=None, help="with --ckpt: the block whose attention is shown (default: the middle)")
    p.add_argument("--t", type=float, nargs="+", default=[0.2, 0.5, 0.8], help="with --ckpt: noise levels t in [0, 1] (1 = pure noise)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    return cli(run, args)


def run(args):
    out = Path(args.out_dir)
    if args.heads < 1 or args.width % args.heads:
        raise UserError(f"--width {args.width} is not divisible by --heads {args.heads}")
    if not args.ckpt and not 0 <= args.head < args.heads:
        raise UserError(f"--head {args.head} is out of range: the modules have heads 0..{args.heads - 1}")
    if any(not 0 <= t <= 1 for t in args.t):
        raise UserError(f"--t takes noise levels in [0, 1], got {args.t}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must lie in [0, 2**32), got {args.seed}")
    check_writable(out, "--out-dir")
    if args.ckpt and args.layer is None:
        args.layer = len(load_run(args.ckpt[0])[0].blocks) // 2
    out.mkdir(parents=True, exist_ok=True)
    written = from_checkpoints(args, out) if args.ckpt else untrained(args, out)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
