"""
What a run shows of itself while it trains: the validation loss (fixed times, fixed noise), EMA
samples (class-balanced, from a fixed seed), sample grids, loss.png; and the Evaluator, which does
train_tiny.py's evaluations (checkpoint, validate, score, grid), each a short method of its own.
"""

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dydilit as D
from .checkpoint import build_objective, default_sampler, save_checkpoint
from .cli import UserError, metric_samples
from .data import to_float, to_uint8
from .figures import pyplot, save_figure
from .log import read_log
from .quality import SampleQuality, copy_error, describe

VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)                  # validation: fixed times and fixed noise, same for every run
VAL_NOISE_SEED = 1234
DIVERGED = 100                                          # a validation loss this many times a zero output's: diverged
COPY_SAMPLES = 100                                      # --probe copy: EMA samples whose copy error is logged


class PredictsZero(torch.nn.Module):
    """The model that outputs 0: its validation loss is where every DiT-initialised run starts."""

    def forward(self, x, t, y):
        return torch.zeros_like(x)


@torch.no_grad()
def validation_loss(model, objective, val_x, val_y, amp=None, progress=True):
    """Mean loss over the held-out images at the fixed times VAL_TIMES with fixed noise, and the
    loss at each time. Depends only on the data and the weights: runs of different attentions
    compare fairly. amp: a function returning the context of the forward passes (precision_context's,
    e.g. bf16 autocast); None: full precision. progress: a progress bar."""
    amp = amp or nullcontext
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(VAL_NOISE_SEED)
    per_t = []
    with tqdm(total=len(VAL_TIMES) * math.ceil(len(val_x) / 256), desc="validation", leave=False, dynamic_ncols=True,
              disable=not progress) as bar:
        for tv in VAL_TIMES:
            total = 0.0
            for i in range(0, len(val_x), 256):
                x0 = to_float(val_x[i:i + 256])
                noise = torch.randn(x0.shape, generator=g).to(x0.device)
                t = torch.full((len(x0),), tv, device=x0.device)
                if isinstance(objective, D.DDPM):
                    t = (t * objective.num_timesteps).long().clamp(max=objective.num_timesteps - 1)
                with amp():
                    total += objective.losses(model, x0, val_y[i:i + 256], t, noise)[0].sum().item()
                bar.update(1)
            per_t.append(total / len(val_x))
    model.train(was_training)
    return sum(per_t) / len(per_t), per_t


@torch.no_grad()
def generate(model, objective, n, num_classes, channels, size, device, cfg_scale, steps, sampler, amp=None, batch=250,
             seed=0):
    """n EMA samples with class-balanced labels (0, 1, ..., K-1, 0, 1, ...) from a fixed seed:
    uint8 images (n, c, S, S) and labels (n,). amp: as in validation_loss (None: full precision)."""
    amp = amp or nullcontext
    was_training = model.training
    model.eval()
    labels = torch.arange(n) % num_classes
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in tqdm(range(0, n, batch), desc=f"sampling {n} images", leave=False, dynamic_ncols=True):
        y = labels[i:i + batch].to(device)
        with amp():
            x = objective.sample(model, (len(y), channels, size, size), y, steps=steps, cfg_scale=cfg_scale,
                                 generator=g, sampler=sampler)
        images.append(to_uint8(x))
    model.train(was_training)
    return torch.cat(images), labels


@torch.no_grad()
def sample_grid(model, objective, classes, channels, size, device, path, cfg_scale, steps, sampler, amp=None,
                per_class=8):
    """Rows: up to 10 classes; columns: samples; from a fixed generator. Writes an image file at
    path (str or Path; PNG, or another format matplotlib writes). amp: as in validation_loss."""
    path, amp = Path(path), amp or nullcontext
    plt = pyplot()
    was_training = model.training
    model.eval()
    rows = sorted(set(np.linspace(0, len(classes) - 1, min(10, len(classes))).round().astype(int).tolist()))
    y = torch.tensor([c for c in rows for _ in range(per_class)], device=device)
    with amp():
        x = objective.sample(model, (len(y), channels, size, size), y, steps=steps, cfg_scale=cfg_scale,
                             generator=torch.Generator().manual_seed(0), sampler=sampler,
                             progress=lambda steps: tqdm(steps, desc=f"sampling {path.name}", leave=False,
                                                         dynamic_ncols=True))
    img = to_uint8(x)                                                                      # (R*K, c, S, S)
    img = img.view(len(rows), per_class, channels, size, size).permute(0, 3, 1, 4, 2)    # (R, S, K, S, c)
    img = img.reshape(len(rows) * size, per_class * size, channels).numpy()
    fig, ax = plt.subplots(figsize=(per_class * 0.9 + 1.6, len(rows) * 0.9 + 0.4))
    ax.imshow(img[..., 0] if channels == 1 else img, cmap="gray" if channels == 1 else None, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * size for i in range(len(rows))], [classes[c] for c in rows], fontsize=8)
    ax.set_xticks([])
    ax.set_title(path.stem, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    model.train(was_training)


def plot_losses(log_path, png_path):
    """The losses; with sample-quality scores in the log, a panel with FD-cnn (and FID) of the EMA
    samples, the held-out real images' values dashed; with the copy probe's, a panel of its copy error."""
    log_path, plt = Path(log_path), pyplot()
    records = read_log(log_path)
    scored = [r for r in records if "fd_cnn" in r]
    copied = [r for r in records if "copy_error" in r]
    panels = 1 + bool(scored) + bool(copied)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (fixed t, noise)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=log_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if scored:
        ax = axes.pop(0)
        real = next((r for r in records if "real_fd_cnn" in r), {})
        n = scored[-1]["metric_samples"]
        for key, name, colour in (("fd_cnn", "FD-cnn", "C0"), ("fid", "FID", "C1")):
            points = [(r["step"], r[key]) for r in scored if key in r]
            if points:
                ax.plot(*zip(*points), "o-", color=colour, label=f"{name}-{n}, EMA samples")
                if f"real_{key}" in real:
                    ax.axhline(real[f"real_{key}"], color=colour, ls="--", label=f"{name}, held-out real images")
        ax.set(xlabel="step", ylabel="Fréchet distance (lower is better)", yscale="log",
               title=f"sample quality; accuracy {100 * scored[-1]['cnn_acc']:.1f}% at step {scored[-1]['step']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if copied:
        ax = axes.pop(0)
        ax.plot([r["step"] for r in copied], [r["copy_error"] for r in copied], "o-", color="C2",
                label=f"{copied[-1]['copy_samples']} EMA samples")
        ax.axhline(1, color="gray", ls="--", label="independent halves")
        ax.set(xlabel="step", ylabel="copy error (0: exact copies)", title="copy probe",
               ylim=(0, max(1.1, max(r["copy_error"] for r in copied))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)


class Evaluator:
    """train_tiny.py's evaluations, made on rank 0 while the other ranks wait. An evaluation
    (calling it) writes the checkpoint first, so that a signal after it loses nothing; then
    validates (a diverged run ends), scores EMA samples (the copy probe's copy error, sample
    quality) and draws a grid, each ended at once by a signal (stop.at_once)."""

    def __init__(self, args, spec, data, raw, ema, opt, sampling_model, amp, log, stop, device, main, inception=None,
                 saved_at=None):
        self.args, self.spec, self.data, self.amp, self.log, self.stop, self.device = \
            args, spec, data, amp, log, stop, device
        self.raw, self.ema, self.opt, self.sampling_model = raw, ema, opt, sampling_model   # sampling: the EMA
        self.main, self.inception, self.saved_at = main, inception, saved_at   # saved_at: the step in ckpt_path
        self.out = Path(args.out_dir)
        self.ckpt_path = self.out / "ckpt.pt"
        self.objective, self.sampler = build_objective(spec), args.sampler or default_sampler(spec["objective"])
        self.val_x, self.val_y = data.val_x[:args.val_size].to(device), data.val_y[:args.val_size].to(device)
        self.n_metric = metric_samples(args, device)
        self.zero_loss = self.quality = None         # the zero model's validation loss, the metric: at first use

    def __call__(self, step, checkpoint=True, samples=True, grid=None):
        """One evaluation at `step`; grid: the file name of a sample grid, if one is due."""
        if checkpoint:
            self.saved_at = step                     # on every rank: they decide alike whether the run ends with one
        if self.main:
            if checkpoint:
                self.checkpoint(step)
            with self.stop.at_once():
                if checkpoint:
                    self.validate(step)
                if samples and (self.n_metric or self.args.probe):
                    self.score(step)
                if grid:
                    self.grid(step, grid)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    @property
    def kept(self):
        """What the run keeps if it ends now, in words."""
        if self.saved_at is None:
            return "no checkpoint was written"
        return f"the last checkpoint {self.ckpt_path} is of step {self.saved_at}, before them"

    def checkpoint(self, step):
        save_checkpoint(self.ckpt_path, self.raw, self.ema, self.opt, step, self.spec, self.data.classes,
                        {**vars(self.args), **self.spec})
        if self.stop.signals:
            print(f"interrupted at step {step}: checkpoint saved to {self.ckpt_path}; validating "
                  f"(press Ctrl-C again to skip)", flush=True)

    def validate(self, step):
        """The validation loss of the training weights, logged and plotted; a loss DIVERGED times the
        zero model's (or not finite) ends the run."""
        val, per_t = validation_loss(self.raw, self.objective, self.val_x, self.val_y, self.amp)
        self.log.write(step, val_loss=val, val_loss_per_t=dict(zip(map(str, VAL_TIMES), per_t)))
        plot_losses(self.log.path, self.out / "loss.png")
        tqdm.write(f"step {step}: val loss {val:.4f}, checkpoint {self.ckpt_path}")
        if self.zero_loss is None:
            self.zero_loss = validation_loss(PredictsZero(), self.objective, self.val_x, self.val_y, progress=False)[0]
        if not val < DIVERGED * self.zero_loss:                   # also true for nan and inf
            raise UserError(f"the run diverged: validation loss {val:.3g} at step {step}, against "
                            f"{self.zero_loss:.3g} for a model that outputs 0; {self.ckpt_path} holds these "
                            f"diverged weights. Start again in a new --out-dir with a lower --lr")

    def score(self, step):
        """EMA samples: their copy error (--probe) and their quality (--fid-samples), logged and plotted."""
        a = self.args
        images, labels = generate(self.sampling_model, self.objective, max(self.n_metric, COPY_SAMPLES * bool(a.probe)),
                                  self.spec["num_classes"], self.spec["channels"], a.image_size, self.device,
                                  a.cfg_scale, a.sample_steps, self.sampler, self.amp)
        if a.probe:
            error = copy_error(images, labels)
            self.log.write(step, copy_error=error, copy_samples=len(images))
            tqdm.write(f"step {step}: copy error of {len(images)} EMA samples {error:.3f} "
                       f"(0: exact copies, 1: independent halves)")
        if self.n_metric:
            if self.quality is None:                              # minutes on a CPU the first time: not before
                self.quality = SampleQuality(self.data, a.dataset, a.cache_dir, self.device, self.n_metric,
                                             self.inception)
                real = {f"real_{k}": v for k, v in self.quality.real().items() if k != "metric_samples"}
                self.log.write(step, **real, metric_samples=self.n_metric)
                tqdm.write(f"held-out real images: {describe({**real, 'metric_samples': self.n_metric}, 'real_')}")
            scores = self.quality.score(images[:self.n_metric], labels[:self.n_metric])
            self.log.write(step, **scores)
            tqdm.write(f"step {step}: EMA samples: {describe(scores)}")
        plot_losses(self.log.path, self.out / "loss.png")

    def grid(self, step, name):
        sample_grid(self.sampling_model, self.objective, self.data.classes, self.spec["channels"], self.args.image_size,
                    self.device, self.out / name, self.args.cfg_scale, self.args.sample_steps, self.sampler, self.amp)
