"""
Sampling from a checkpoint, `python train_tiny.py --sample-from CKPT`: a sample grid from its EMA
weights, or with --npz its samples as the ADM evaluation suite reads them (arr_0: uint8
N x H x W x 3, arr_1: labels). DiT and nanoGPT keep this in a short sample.py of their own.
"""

import shutil
from pathlib import Path

import numpy as np
import torch

from .checkpoint import default_sampler, load_run
from .cli import UserError, check_fits, check_sampler, format_bytes, nearest_folder
from .device import compiles, pick_device, precision_context
from .evaluation import generate, sample_grid
from .files import atomic_write


def sample_from(args):
    """A sample grid (or --npz samples) from --sample-from's EMA weights; train_tiny.py's flags."""
    if not Path(args.sample_from).exists():
        raise UserError(f"--sample-from {args.sample_from}: no such file")
    run = load_run(args.sample_from)
    check_sampler(args.sampler, run.args.objective)
    if args.npz:
        check_npz_fits(args.npz, args.num_samples, run.args.image_size, run.args.channels)
    sampler = args.sampler or default_sampler(run.args.objective)
    device = pick_device()
    model = run.model.to(device)
    model = torch.compile(model) if compiles(args.compile, device) else model
    amp = precision_context(args.precision, device)[0]
    size, channels = run.args.image_size, run.args.channels
    what = f"step {run.step}, cfg {args.cfg_scale}, {args.sample_steps} {sampler} steps"
    if args.npz:
        images, labels = generate(model, run.objective, args.num_samples, len(run.classes), channels, size, device,
                                  args.cfg_scale, args.sample_steps, sampler, amp)
        write_npz(args.npz, images, labels)
        print(f"wrote {args.npz}: arr_0 {(len(images), size, size, 3)} uint8, arr_1 labels ({what})")
        return 0
    target = Path(args.grid) if args.grid else run.path.with_name(f"grid_{run.path.stem}_cfg{args.cfg_scale:g}.png")
    sample_grid(model, run.objective, run.classes, channels, size, device, target, args.cfg_scale, args.sample_steps,
                sampler, amp)
    print(f"wrote {target} ({what})")
    return 0


def check_npz_fits(path, n, size, channels):
    """One line, before sampling, if n samples fit neither in memory (the samples, their RGB copy)
    nor on the disk of `path` (the RGB copy)."""
    pixels = n * size ** 2
    check_fits(pixels * (2 * channels + 3), torch.device("cpu"), f"--num-samples {n:,} at {size} x {size}",
               "write fewer samples per file")
    free = shutil.disk_usage(nearest_folder(Path(path).parent)).free
    if 3 * pixels > free:
        raise UserError(f"--npz {path} would take {format_bytes(3 * pixels)} and its disk has {format_bytes(free)} "
                        f"free: free space, or write fewer --num-samples")


def write_npz(path, images, labels):
    """uint8 images (n, c, S, S) and labels as the ADM evaluation suite reads them."""
    images = images.expand(-1, 3, -1, -1)           # choice (README item 16): grey as RGB, for the suite's Inception
    with atomic_write(path) as tmp, open(tmp, "wb") as f:   # a file object: np.savez adds no .npz suffix
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy(), arr_1=labels.numpy())   # (n, S, S, 3) uint8
