"""
The ablation table and figure of train_tiny.py runs: rows of runs that differ in attention (and
seeds of one configuration together), their loss curves, validation loss, sample quality (FD-cnn,
classifier accuracy, FID with an Inception file) of each run's final EMA weights, attention entropy
at one layer, and a markdown table with mean and standard deviation over the seeds per row.

    python tools/ablation.py --ckpt runs/{dit,lit,dydi}_s{0,1}/ckpt.pt --t 0.5 --fid-samples 500

Writes ablation.png (and ablation_samples.png, each row's first run's final EMA samples) into --out-dir.
"""

import math
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, one folder up
from training.attention import layer_attention, partner_mass, partners, row_entropy   # noqa: E402
from training.checkpoint import default_sampler, load_run, run_label         # noqa: E402
from training.cli import (Parser, UserError, check_distinct, check_writable, cli, noise_level, seed,   # noqa: E402
                          whole)
from training.data import held_out_image, run_data                           # noqa: E402
from training.evaluation import generate                                     # noqa: E402
from training.figures import pyplot, save_figure                             # noqa: E402
from training.log import read_log                                            # noqa: E402
from training.quality import SampleQuality, describe, load_inception         # noqa: E402


SHARED = ("model", "dataset", "probe", "image_size", "objective", "ddpm_schedule")   # what a table's runs all share
# a row of the table: the runs of one model (training.checkpoint.run_label), its seeds


def ablation(args, out, runs):
    """Runs that differ in attention and seed, side by side: loss curves (mean over seeds, band =
    min..max), validation loss, and mean normalised row entropy at one layer (at each --t), plus
    the table. The entropy uses a held-out image and fixed noise, as --ckpt does. Copy-probe runs
    add their copy error (from the log) and the partner mass of every layer."""
    rows, firsts = {}, []
    layer = len(runs[0].model.blocks) // 2 if args.layer is None else args.layer
    a0 = runs[0].args
    for run in runs:                                                     # before any computation
        differ = [k for k in SHARED if vars(run.args).get(k) != vars(a0).get(k)]
        if differ:
            raise UserError(f"{run.path} and {runs[0].path} differ in " + ", ".join(
                f"{k} ({vars(run.args).get(k)!r} and {vars(a0).get(k)!r})" for k in differ)
                + ": one table compares runs that differ only in attention and seed")
    for run in runs:
        if not 0 <= layer < len(run.model.blocks):
            raise UserError(f"--layer {layer} is out of range: {run.path} has layers 0..{len(run.model.blocks) - 1}")
        log = run.path.parent / "log.jsonl"
        if not log.exists():
            raise UserError(f"{log} is missing: tools/ablation.py reads each run's log next to its checkpoint")
        records = read_log(log)
        if not any("loss" in r for r in records):
            raise UserError(f"{log} holds no training loss: it is empty, cut or not a train_tiny.py log")
        label = run_label(run.args)
        if label not in rows:
            firsts.append((label, run.path))
        rows.setdefault(label, []).append((run.args, run.model, run.objective, records))
    # every row is compared at the last validation step that all runs reached (a run stopped early
    # by Ctrl-C / SIGTERM has fewer validation points)
    reached = [{r["step"] for r in rec if "val_loss" in r} for seeds in rows.values() for *_, rec in seeds]
    val_step = max(set.intersection(*reached), default=None)
    first = next(iter(rows.values()))[0][0]
    probe = getattr(first, "probe", None)
    data = run_data(first, args.data_dir)
    img, label = held_out_image(data, args.index, first.dataset)
    x0, y = img[None], torch.tensor([label])
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
    for i, (label, seeds) in enumerate(rows.items()):
        color = f"C{i}"
        curves = [{r["step"]: r["loss"] for r in rec if "loss" in r} for _, _, _, rec in seeds]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        losses = torch.tensor([[c[s] for s in steps] for c in curves])   # (seeds, steps)
        a1.plot(steps, losses.mean(0), color=color, label=f"{label} ({len(seeds)} seeds)")
        a1.fill_between(steps, losses.amin(0), losses.amax(0), color=color, alpha=0.2)
        entry = {"label": label, **{k: [] for k in ("val", "entropy", "img_s", "scores", "copy", "partner",
                                                    "best_head")}}
        for a, model, objective, rec in seeds:
            val = [r for r in rec if "val_loss" in r]
            a1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o", color=color, mfc="none")
            entry["val"].append(next((r["val_loss"] for r in val if r["step"] == val_step), math.nan))
            speed = [r["img_per_s"] for r in rec if "img_per_s" in r][1:]   # the first interval includes warm-up
            entry["img_s"].append(statistics.median(speed) if speed else math.nan)
            attention = [layer_attention(model, objective, x0, y, t, noise) for t in args.t]   # (depth, h, N, N) per t
            entry["entropy"].append([row_entropy(A[layer]).mean().item() for A in attention])
            if probe:                                                    # retrieval: the copy probe's two measures
                copies = [r for r in rec if "copy_error" in r]
                entry["copy"].append(next((r["copy_error"] for r in copies if r["step"] == val_step),
                                          copies[-1]["copy_error"] if copies else math.nan))
                heads = torch.stack([partner_mass(A, partners(model.hw)).mean(-1) for A in attention]).mean(0)
                entry["partner"].append(heads.mean(1).tolist())            # (layers,): mean over heads and --t
                entry["best_head"].append(heads.amax(1).tolist())          # (layers,): the layer's best head
            if quality is not None:
                sample_steps = a.sample_steps if args.sample_steps is None else args.sample_steps
                sampler = a.sampler or default_sampler(a.objective)
                images = generate(model, objective, args.fid_samples, model.num_classes, a.channels, a.image_size,
                                  torch.device("cpu"), a.cfg_scale, sample_steps, sampler, nullcontext)
                entry["scores"].append(quality.score(*images))
                print(f"{label}, seed {a.seed}: {describe(entry['scores'][-1])} ({sample_steps} {sampler} steps, "
                      f"cfg {a.cfg_scale:g})")
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
    a2.set(ylabel="mean row entropy / log N", title=f"attention entropy, layer {layer} (dash: mean)")
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
    save_figure(fig, out / "ablation.png", dpi=110)
    written = ["ablation.png"]
    grids = [(label, Path(p).parent / "samples_final.png") for label, p in firsts]
    if all(g.exists() for _, g in grids):                                # each row's first run's final EMA samples
        fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.4))
        for ax, (label, g) in zip(np.atleast_1d(axes), grids):
            ax.imshow(plt.imread(g))
            ax.set_title(label, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        save_figure(fig, out / "ablation_samples.png", dpi=110)
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
        speeds = " / ".join(f"{x:.0f}" for x in e["img_s"])
        print(f"| {e['label']} | {' | '.join(cells)} | {ent} | {ent_mean:.3f} | {speeds} |")
    if probe:
        print(f"partner mass per layer, mean over heads | of the layer's best head (mean over seeds; uniform rows: "
              f"{1 / n_tokens:.3f}):")
        for e in table:
            mean, best = (torch.tensor(e[k]).mean(0).tolist() for k in ("partner", "best_head"))
            print(f"  {e['label']:<34} " + " ".join(f"{x:.3f}" for x in mean) + " | "
                  + " ".join(f"{x:.3f}" for x in best))
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
    p = Parser("Ablation table and figure of train_tiny.py runs.")
    p.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT", help="the runs' checkpoints (their log.jsonl "
                   "next to them)")
    p.add_argument("--out-dir", default="viz", help="folder for ablation.png and ablation_samples.png")
    p.add_argument("--data-dir", default=None, help="where the runs' held-out images are (default: where the runs "
                   "read them)")
    p.add_argument("--index", type=whole(0), default=0, help="the held-out image whose attention entropy is measured")
    p.add_argument("--layer", type=whole(0), default=None, help="the block whose attention entropy is measured "
                   "(default: the middle)")
    p.add_argument("--t", type=noise_level, nargs="+", default=[0.5], help="noise levels t in [0, 1] of the entropy")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise")
    p.add_argument("--fid-samples", type=whole(2, also=(0,)), default=0, help="score this many EMA samples of each "
                   "run (class-balanced, each run's guidance scale and sampler): FD-cnn and accuracy, FID with "
                   "--fid-inception; 0: off")
    p.add_argument("--sample-steps", type=whole(1), default=None, help="sampler steps of the scored samples "
                   "(default: each run's)")
    p.add_argument("--fid-inception", default=None, metavar="PATH", help="a TorchScript FID Inception network (see "
                   "train_tiny.py --help)")
    p.add_argument("--cache-dir", default="./data/cache", help="where the metric classifier and FID statistics are "
                   "cached")
    return p


def run(argv):
    args = get_parser().parse_args(argv)
    out = Path(args.out_dir)
    if args.fid_inception and not args.fid_samples:
        raise UserError("--fid-inception needs samples to score: add --fid-samples N")
    check_distinct(args.ckpt, "--ckpt")
    check_writable(out, "--out-dir")
    runs = [load_run(path) for path in args.ckpt]
    out.mkdir(parents=True, exist_ok=True)
    written = ablation(args, out, runs)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


def main(argv=None):
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
