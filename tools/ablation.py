"""
The ablation table and figure of train_tiny.py runs: rows of runs that differ in attention (and
seeds of one configuration together), their loss curves, validation loss, sample quality (FD-cnn,
classifier accuracy, FID with an Inception file) of each run's final EMA weights, attention entropy
at one layer, and a markdown table with mean and standard deviation over the seeds per row.

    python tools/ablation.py --ckpt runs/{dit,lit,dydi}_s{0,1}/ckpt.pt --t 0.5 --fid-samples 500

Writes ablation.png (and ablation_samples.png, each row's first run's final EMA samples) into --out-dir.
"""

import argparse
import math
import statistics
from contextlib import nullcontext
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # dydilit.py and the scripts live one folder up
import visualize as V                                             # noqa: E402
from training.data import to_float                                # noqa: E402
from training.evaluation import default_sampler, generate, load_run, pyplot   # noqa: E402
from training.quality import SampleQuality, describe, load_inception          # noqa: E402
from training.run import HelpFormatter, UserError, check_writable, cli, read_log   # noqa: E402


SHARED = ("model", "dataset", "probe", "image_size", "objective", "ddpm_schedule")   # what every run of one table shares


def run_label(a):
    """The ablation row a train_tiny run belongs to: its attention and DyDiLA's switches (the runs'
    seeds share a row; everything else is SHARED by every run of a table)."""
    if a.attn != "dydila":
        return {"softmax": "DiT (softmax)", "linear": "LiT (linear)"}[a.attn]
    off = [name for name, flag in (("dynamic projection", a.no_dynamic_projection), ("dynamic kernel", a.no_dynamic_kernel),
                                   ("token differential", a.no_token_differential)) if flag]
    return "DyDi-LiT" + ("".join(f", no {name}" for name in off))


def ablation(args, out):
    """Runs that differ in attention and seed, side by side: loss curves (mean over seeds, band =
    min..max), validation loss, and mean normalised row entropy at one layer (at each --t), plus
    the table. The entropy uses a held-out image and fixed noise, as --ckpt does. Copy-probe runs
    add their copy error (from the log) and the partner mass of every layer."""
    rows, firsts = {}, []
    loaded = [(path, *load_run(path)[:3]) for path in args.ckpt]
    path0, _, _, a0 = loaded[0]
    for path, model, objective, a in loaded:                             # before any computation
        differ = [k for k in SHARED if vars(a).get(k) != vars(a0).get(k)]
        if differ:
            raise UserError(f"{path} and {path0} differ in " + ", ".join(f"{k} ({vars(a).get(k)!r} and {vars(a0).get(k)!r})"
                            for k in differ) + ": one table compares runs that differ only in attention and seed")
    for path, model, objective, a in loaded:
        if not 0 <= args.layer < len(model.blocks):
            raise UserError(f"--layer {args.layer} is out of range: {path} has layers 0..{len(model.blocks) - 1}")
        log = Path(path).parent / "log.jsonl"
        if not log.exists():
            raise UserError(f"{log} is missing: tools/ablation.py reads each run's log next to its checkpoint")
        records = read_log(log)
        if run_label(a) not in rows:
            firsts.append((run_label(a), path))
        rows.setdefault(run_label(a), []).append((a, model, objective, records))
    # every row is compared at the last validation step that all runs reached (a run stopped early
    # by Ctrl-C / SIGTERM has fewer validation points)
    reached = [{r["step"] for r in rec if "val_loss" in r} for runs in rows.values() for *_, rec in runs]
    val_step = max(set.intersection(*reached), default=None)
    first = next(iter(rows.values()))[0][0]
    probe = getattr(first, "probe", None)
    data = V.run_data(first, args.data_dir)
    i = V.held_out_index(args.index, data, first.dataset)
    x0, y = to_float(data.val_x[i:i + 1]), data.val_y[i:i + 1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    quality = None
    if args.fid_samples:                                                 # every run scored alike: n, steps, seed, cfg
        inception = load_inception(args.fid_inception, torch.device("cpu")) if args.fid_inception else None
        quality = SampleQuality(data, first.dataset, args.cache_dir, torch.device("cpu"), args.fid_samples, inception)
        print(f"held-out real images: {describe(quality.real())}")
    table = []
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if probe else 2, figsize=(18 if probe else 13, 4.5),
                             gridspec_kw={"width_ratios": [3, 2, 2] if probe else [3, 2]})
    a1, a2, a3 = (*axes, None)[:3]
    for i, (label, runs) in enumerate(rows.items()):
        color = f"C{i}"
        curves = [{r["step"]: r["loss"] for r in rec if "loss" in r} for _, _, _, rec in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        losses = torch.tensor([[c[s] for s in steps] for c in curves])   # (seeds, steps)
        a1.plot(steps, losses.mean(0), color=color, label=f"{label} ({len(runs)} seeds)")
        a1.fill_between(steps, losses.amin(0), losses.amax(0), color=color, alpha=0.2)
        entry = {"label": label, "val": [], "entropy": [], "img_s": [], "scores": [], "copy": [], "partner": [], "best_head": []}
        for a, model, objective, rec in runs:
            val = [r for r in rec if "val_loss" in r]
            a1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o", color=color, mfc="none")
            entry["val"].append(next((r["val_loss"] for r in val if r["step"] == val_step), math.nan))
            speed = [r["img_per_s"] for r in rec if "img_per_s" in r][1:]   # the first interval includes warm-up
            entry["img_s"].append(statistics.median(speed) if speed else math.nan)
            ent = []
            for t in args.t:
                attn, x = V.layer_inputs(model, objective, x0, y, t, noise)[args.layer]
                with torch.no_grad():
                    ent.append(V.row_entropy(attn.attention_matrix(x, model.hw)).mean().item())
            entry["entropy"].append(ent)
            if probe:                                                    # retrieval: the copy probe's two measures
                copies = [r for r in rec if "copy_error" in r]
                entry["copy"].append(next((r["copy_error"] for r in copies if r["step"] == val_step),
                                          copies[-1]["copy_error"] if copies else math.nan))
                heads = torch.stack([V.partner_mass_per_head(model, objective, x0, y, t, noise) for t in args.t]).mean(0)
                entry["partner"].append(heads.mean(1).tolist())            # (layers,): mean over heads and --t
                entry["best_head"].append(heads.amax(1).tolist())          # (layers,): the layer's best head
            if quality is not None:
                steps = args.sample_steps or a.sample_steps
                sampler = a.sampler or default_sampler(a.objective)
                images = generate(model, objective, args.fid_samples, model.num_classes, a.channels, a.image_size,
                                  torch.device("cpu"), a.cfg_scale, steps, sampler, nullcontext)
                entry["scores"].append(quality.score(*images))
                print(f"{label}, seed {a.seed}: {describe(entry['scores'][-1])} ({steps} {sampler} steps, cfg {a.cfg_scale:g})")
        e = torch.tensor(entry["entropy"])                                  # (seeds, t)
        for j, t in enumerate(args.t):
            a2.plot([i + 0.12 * (j - (len(args.t) - 1) / 2)] * len(e), e[:, j], "os^dv"[j % 5], color=color, mfc="none",
                    label=f"t = {t:g}" if i == 0 else None)
        a2.plot(i, e.mean(), "_", color=color, ms=22, mew=2)
        if probe:
            layers = torch.tensor(entry["partner"]).mean(0)                  # (layers,): mean over seeds
            a3.plot(range(len(layers)), layers, "o-", color=color, label=label)
        table.append(entry)
    a1.set(xlabel="step", ylabel="training loss", yscale="log",
           title="training loss: mean over seeds, band = min..max; o = validation loss (fixed noise)")
    a1.title.set_fontsize(9)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.set_xticks(range(len(rows)), list(rows), fontsize=9, rotation=20, ha="right")
    a2.set(ylabel="mean row entropy / log N", title=f"attention entropy, layer {args.layer} (dash: mean)")
    a2.title.set_fontsize(9)
    a2.legend(fontsize=8, title="noise level", title_fontsize=8)
    a2.grid(alpha=0.3, axis="y")
    if probe:
        n_tokens = model.hw[0] * model.hw[1]
        a3.axhline(1 / n_tokens, color="gray", ls="--", lw=1, label=f"uniform rows, 1/N = {1 / n_tokens:.3f}")
        a3.set(xlabel="layer", ylabel="attention mass on the partner key",
               title=f"copy probe: partner mass per layer (mean over seeds, t = {', '.join(f'{t:g}' for t in args.t)})")
        a3.title.set_fontsize(9)
        a3.legend(fontsize=7)
        a3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)
    written = ["ablation.png"]
    grids = [(label, Path(p).parent / "samples_final.png") for label, p in firsts]
    if all(g.exists() for _, g in grids):                                # each row's first run's final EMA samples
        fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.4))
        for ax, (label, g) in zip(np.atleast_1d(axes), grids):
            ax.imshow(plt.imread(g))
            ax.set_title(label, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "ablation_samples.png", dpi=110)
        plt.close(fig)
        written.append("ablation_samples.png")
    seeds = max(len(e["val"]) for e in table)
    fmt = lambda v: " / ".join("-" if math.isnan(x) else f"{x:.4f}" for x in v)
    if val_step is None:
        print("note: the runs share no validation step, so the table has no validation loss")
    elif any(max(s) > val_step for s in reached):
        print(f"note: not every run reached its last validation step; all rows are compared at step {val_step}")
    metrics = [("fd_cnn", f"FD-cnn-{args.fid_samples}", "{:.2f}", 1), ("cnn_acc", "accuracy %", "{:.1f}", 100)]
    if args.fid_inception:
        metrics.append(("fid", f"FID-{args.fid_samples}", "{:.2f}", 1))
    metrics = metrics if quality is not None else []
    head = "".join(f" {name} (per seed) | mean ± std |" for _, name, _, _ in metrics)
    if probe:
        head = " copy error (per seed) | mean ± std | partner mass, mean of layers (per seed) | mean ± std |" + head
    print(f"| row | val loss at step {val_step} (per seed) | mean ± std |{head} entropy / log N at t = "
          f"{', '.join(f'{t:g}' for t in args.t)} (per seed) | mean | img/s (per seed) |")
    print("|" + " --- |" * (6 + 2 * len(metrics) + 4 * bool(probe)))
    for e in table:
        v = [x for x in e["val"] if not math.isnan(x)]
        ent = " / ".join(", ".join(f"{x:.3f}" for x in s) for s in e["entropy"])
        cells = [f"{fmt(e['val'])} | {mean_std(v, '{:.4f}')}"]
        if probe:
            partner = [statistics.mean(layers) for layers in e["partner"]]
            cells += [f"{' / '.join(f'{x:.3f}' for x in e['copy'])} | {mean_std(e['copy'], '{:.3f}')}",
                      f"{' / '.join(f'{x:.3f}' for x in partner)} | {mean_std(partner, '{:.3f}')}"]
        for key, _, form, scale in metrics:
            values = [sc[key] * scale for sc in e["scores"]]
            cells.append(f"{' / '.join(form.format(x) for x in values)} | {mean_std(values, form)}")
        ent_mean = statistics.mean(x for s in e["entropy"] for x in s)
        print(f"| {e['label']} | {' | '.join(cells)} | {ent} | {ent_mean:.3f} | {' / '.join(f'{x:.0f}' for x in e['img_s'])} |")
    if probe:
        print(f"partner mass per layer, mean over heads | of the layer's best head (mean over seeds; uniform rows: "
              f"{1 / n_tokens:.3f}):")
        for e in table:
            print(f"  {e['label']:<34} " + " ".join(f"{x:.3f}" for x in torch.tensor(e["partner"]).mean(0).tolist()) + " | "
                  + " ".join(f"{x:.3f}" for x in torch.tensor(e["best_head"]).mean(0).tolist()))
    if seeds < 2:
        print("note: one seed per row, so the spread cannot be told from noise; run each row with 2+ seeds")
    return written


def mean_std(values, form):
    """'0.2505 ± 0.0050': the mean and the standard deviation (n - 1) over the seeds."""
    if not values:
        return "-"
    std = form.format(statistics.stdev(values)) if len(values) > 1 else "-"
    return f"{form.format(statistics.mean(values))} ± {std}"


def get_parser():
    p = argparse.ArgumentParser(description="Ablation table and figure of train_tiny.py runs.", formatter_class=HelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT", help="the runs' checkpoints (their log.jsonl next to them)")
    p.add_argument("--out-dir", default="viz", help="folder for ablation.png and ablation_samples.png")
    p.add_argument("--data-dir", default=None, help="where the runs' held-out images are (default: where the runs read them)")
    p.add_argument("--index", type=int, default=0, help="the held-out image whose attention entropy is measured")
    p.add_argument("--layer", type=int, default=None, help="the block whose attention entropy is measured (default: the middle)")
    p.add_argument("--t", type=float, nargs="+", default=[0.5], help="noise levels t in [0, 1] of the entropy")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--fid-samples", type=int, default=0, help="score this many EMA samples of each run (class-balanced, "
                   "each run's guidance scale and sampler): FD-cnn and accuracy, FID with --fid-inception; 0: off")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps of the scored samples (default: each run's)")
    p.add_argument("--fid-inception", default=None, metavar="PATH", help="a TorchScript FID Inception network (see train_tiny.py --help)")
    p.add_argument("--cache-dir", default="./data/cache", help="where the metric classifier and FID statistics are cached")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    return cli(run, args)


def run(args):
    out = Path(args.out_dir)
    if any(not 0 <= t <= 1 for t in args.t):
        raise UserError(f"--t takes noise levels in [0, 1], got {args.t}")
    if args.fid_samples < 0 or args.fid_samples == 1 or (args.sample_steps is not None and args.sample_steps < 1):
        raise UserError("--fid-samples must be 0 (off) or >= 2 and --sample-steps >= 1")
    if args.fid_inception and not args.fid_samples:
        raise UserError("--fid-inception needs samples to score: add --fid-samples N")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must lie in [0, 2**32), got {args.seed}")
    check_writable(out, "--out-dir")
    if args.layer is None:
        args.layer = len(load_run(args.ckpt[0])[0].blocks) // 2
    out.mkdir(parents=True, exist_ok=True)
    written = ablation(args, out)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
