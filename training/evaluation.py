"""
A run's model and what it shows of itself: the model and objective its arguments describe
(load_run rebuilds them from a checkpoint), the validation loss (fixed times, fixed noise), EMA
samples (class-balanced, from a fixed seed), sample grids, and loss.png (the losses; with
sample-quality scores in the log, a second panel).
"""

import argparse
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dydilit as D
from .data import to_float, to_uint8
from .run import UserError, atomic_write, load_checkpoint, read_log

VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)                  # validation: fixed times and fixed noise, same for every run
VAL_NOISE_SEED = 1234


def build_model(spec):
    """The model a spec describes (training.run.run_spec: a preset of dydilit.MODELS with softmax
    (DiT), linear (LiT) or DyDiLA attention and its switches)."""
    switches = {k: not spec[f"no_{k}"] for k in ("dynamic_projection", "dynamic_kernel", "token_differential")}
    return D.MODELS[spec["model"]](input_size=spec["image_size"], in_channels=spec["channels"], num_classes=spec["num_classes"],
                                   attn=spec["attn"], attn_kwargs=switches if spec["attn"] == "dydila" else {})


def build_objective(spec):
    """The objective a spec describes: rectified flow, or DDPM with its noise schedule."""
    return D.FlowMatching() if spec["objective"] == "flow" else D.DDPM(schedule=spec["ddpm_schedule"])


def default_sampler(objective):
    """The sampler when none is asked for: Euler for flow matching, DDIM for DDPM."""
    return "euler" if objective == "flow" else "ddim"


def load_run(path):
    """(model with the EMA weights, in eval mode, on the CPU; objective; the run as a namespace:
    its arguments (train_tiny.py's flags, where it kept them) and its spec; the checkpoint)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["spec"])
    try:
        model.load_state_dict(ckpt["ema"])
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{path}: the weights do not fit the model its spec describes; the checkpoint is damaged") from None
    return model.eval(), build_objective(ckpt["spec"]), argparse.Namespace(**{**ckpt.get("args", {}), **ckpt["spec"]}), ckpt


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


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.no_grad()
def generate(model, objective, n, num_classes, channels, size, device, cfg_scale, steps, sampler, amp=None, batch=250, seed=0):
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
def sample_grid(model, objective, classes, channels, size, device, path, cfg_scale, steps, sampler, amp=None, per_class=8):
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
                             progress=lambda it: tqdm(it, desc=f"sampling {path.name}", leave=False, dynamic_ncols=True))
    img = to_uint8(x)                                                                      # (R*K, c, S, S)
    img = img.view(len(rows), per_class, channels, size, size).permute(0, 3, 1, 4, 2)    # (R, S, K, S, c)
    img = img.reshape(len(rows) * size, per_class * size, channels).numpy()
    fig, ax = plt.subplots(figsize=(per_class * 0.9 + 1.6, len(rows) * 0.9 + 0.4))
    ax.imshow(img[..., 0] if channels == 1 else img, cmap="gray" if channels == 1 else None, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * size for i in range(len(rows))], [classes[c] for c in rows], fontsize=8)
    ax.set_xticks([])
    ax.set_title(path.stem, fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    model.train(was_training)


def plot_losses(log_path, png_path):
    """The losses; with sample-quality scores in the log, a panel with FD-cnn (and FID) of the EMA
    samples, the held-out real images' values dashed; with the copy probe's, a panel of its copy error."""
    log_path, plt = Path(log_path), pyplot()
    rows = read_log(log_path)
    scored = [r for r in rows if "fd_cnn" in r]
    copied = [r for r in rows if "copy_error" in r]
    panels = 1 + bool(scored) + bool(copied)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (fixed t, noise)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=log_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if scored:
        ax = axes.pop(0)
        real = next((r for r in rows if "real_fd_cnn" in r), {})
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
        ax.set(xlabel="step", ylabel="copy error (0: exact copies)", ylim=(0, max(1.1, max(r["copy_error"] for r in copied))),
               title="copy probe")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
