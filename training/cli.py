"""
The command line and its errors, for train_tiny.py, visualize.py and every tool alike: one-line
errors (UserError; cli(), which every entry point goes through), a parser whose own errors are one
line too (Parser), the values a flag takes (whole, real, seed, noise_level, name_of), and the checks
of files, memory and several flags together (check_writable, check_image_format, check_distinct,
check_fits, check_width_heads; check_train_args and check_sample_args for train_tiny.py). All of it
runs before any work.
"""

import argparse
import math
import os
import re
import signal
import sys
from pathlib import Path

import torch

import dydilit as D
from .device import available_memory, pick_device


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM where the run stops at once (raised by training.signals.GracefulStop)."""

    def __init__(self, signum, note=""):
        super().__init__(signum, note)
        self.signum, self.note = signum, note


def cli(body, *args):
    """Run a command line's body: a UserError becomes one 'error:' line on stderr and exit code 2,
    Ctrl-C one 'stopped by SIGINT' line and 128 + the signal's number."""
    try:
        return body(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as e:
        signum, note = getattr(e, "signum", signal.SIGINT), getattr(e, "note", "")
        print(f"stopped by {signal.Signals(signum).name}{' ' + note if note else ''}", file=sys.stderr, flush=True)
        return 128 + signum


def format_bytes(n):
    """Bytes in words: '3.2 GiB', '512.0 MiB'."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


# ----------------------------------------------------------------------------------------
# The parser and the values of single flags
# ----------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, unless it has none (None, off) or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):                # (0 is a default worth showing: `is False`)
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad value) are one line like every other error:
    a UserError ('--steps: must be a whole number >= 1, got 0'), which cli() prints."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        raise UserError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


def whole(low, high=None, also=()):
    """A flag's type: a whole number in [low, high] (high None: no bound) or one of `also`."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or (n not in also and (n < low or (high is not None and n > high))):
            span = f">= {low:,}" if high is None else f"in [{low:,}, {high:,}]"
            extra = "".join(f" or {a}" for a in also)
            raise argparse.ArgumentTypeError(f"must be a whole number {span}{extra}, got {text}")
        return n
    return parse


def real(low=-math.inf, high=math.inf, open_low=False):
    """A flag's type: a finite number in [low, high] ((low, high] with open_low)."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (x > low if open_low else x >= low) and x <= high):
            if math.isinf(low) and math.isinf(high):
                span = "a finite number"
            elif math.isinf(high):
                span = f"a finite number {'>' if open_low else '>='} {low:g}"
            else:
                span = f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return x
    return parse


seed = whole(0, 2**32 - 1)                                   # what torch.manual_seed and numpy's generators take
noise_level = real(0, 1)                                     # t in [0, 1]; 1 is pure noise


def name_of(choices):
    """A flag's type: one of `choices` (names to type without quotes), said in one line if not."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}: choose one of {', '.join(choices)}")
        return text
    return parse


# ----------------------------------------------------------------------------------------
# Checks of files and of several flags together
# ----------------------------------------------------------------------------------------

def nearest_folder(path):
    """`path` if it exists, else its nearest existing parent (a file there is returned as it is)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def check_writable(path, flag, folder=True):
    """One line, before any work, if `path` (a folder, or a file with folder=False) cannot be
    written: the wrong kind of thing already there, a file among its parents, no permission."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path} is {'a file' if folder else 'a folder'}: give "
                        f"{'a folder' if folder else 'a file name'} that does not exist yet or is one")
    above = nearest_folder(path if folder and path.exists() else path.parent)
    if not above.is_dir():
        raise UserError(f"{flag} {path} lies under {above}, which is a file: pick another {flag}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written (no write permission in {above}): pick another {flag}")


def check_image_format(path, flag):
    """One line unless matplotlib writes images of `path`'s suffix (.png, .jpg, .pdf, .svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(f"{flag} {path}: {'.' + suffix if suffix else 'a name without a suffix'} is no image format "
                        f"matplotlib writes; end it in .png, .jpg, .pdf or .svg")


def check_distinct(paths, flag):
    """One line if a file is given twice (a run would count as two seeds, or be drawn twice)."""
    seen = {}
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            raise UserError(f"{flag} names {path} twice (also as {seen[key]}): give each run once")
        seen[key] = path


def check_width_heads(width, heads):
    """One line unless --heads divides --width (an attention module splits its width into heads)."""
    if width % heads:
        raise UserError(f"--width {width} is not divisible by --heads {heads}: pick heads that divide the width")


def check_sampler(sampler, objective, flag="--sampler"):
    """One line if a sampler does not belong to the objective."""
    if sampler in ("euler", "heun") and objective == "ddpm" or sampler in ("ancestral", "ddim") and objective == "flow":
        raise UserError(f"{flag} {sampler} does not belong to the objective {objective}: "
                        f"flow takes euler or heun, ddpm takes ancestral or ddim")


def check_fits(need, device, what, fix):
    """One line, before anything is allocated, when a lower bound `need` (bytes) of what `what`
    takes exceeds the memory of `device`."""
    have = available_memory(device)
    if need > have:
        raise UserError(f"{what} needs at least {format_bytes(need)} of memory, and {device.type} has "
                        f"{format_bytes(have)}: {fix}")


# ----------------------------------------------------------------------------------------
# train_tiny.py's flags together
# ----------------------------------------------------------------------------------------

GPU_SIZED = ("model", "steps", "batch_size")            # flags whose defaults are sized for one GPU
ACTIVATIONS = 8                                         # (B, N, C) float32 tensors a block keeps for the backward, >=
CPU_RECIPE_MINUTES = 25                                 # its wall clock on 2 cores (docs/BENCHMARKS.md, The CPU recipe)
CPU_RECIPE = ("python train_tiny.py --dataset fashion-mnist --model DyDiLiT-T/4 --batch-size 32 --steps 1200 "
              "--eval-every 400 --sample-every 600 --val-size 256 --sample-steps 20 --fid-samples 500")


def metric_samples(args, device):
    """Samples scored at each evaluation: --fid-samples as given; by default 10,000 on CUDA in runs
    long enough to evaluate, else 0 (off)."""
    if args.fid_samples is not None:
        return args.fid_samples
    return 10000 if device.type == "cuda" and args.steps >= args.eval_every else 0


def check_sample_args(args):
    """--sample-from's flags: what to write, and where."""
    for flag, path in (("--npz", args.npz), ("--grid", args.grid)):
        if path:
            check_writable(path, flag, folder=False)
    if args.grid:
        check_image_format(args.grid, "--grid")


def check_train_args(args, gpu_defaults):
    """A training run's flags together, and its outputs: one line each, before any work.
    gpu_defaults: none of GPU_SIZED was given."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must be divisible by the "
                        f"{world} processes")
    if args.fid_inception and not metric_samples(args, pick_device()):
        raise UserError("--fid-inception needs samples to score: add --fid-samples N (0 is the default on a CPU "
                        "and for runs shorter than --eval-every)")
    check_sampler(args.sampler, args.objective)
    switches = [f"--{k.replace('_', '-')}" for k in ("no_dynamic_projection", "no_dynamic_kernel",
                                                     "no_token_differential") if vars(args)[k]]
    if args.reading != "ours" and (args.attn != "dydila" or switches):
        raise UserError(f"--reading {args.reading} is a reading of the whole of DyDiLA: use it with --attn dydila and "
                        f"without {', '.join(switches) or '--no-... switches'}")
    if args.dataset in ("cifar10", "fashion-mnist") and args.image_size != 32:
        raise UserError(f"--image-size {args.image_size} does not match {args.dataset}'s 32 x 32 images: "
                        f"use --image-size 32")
    patch = int(args.model.split("/")[1])
    if args.image_size % patch:
        raise UserError(f"image size {args.image_size} is not divisible by the patch size {patch} of {args.model}: "
                        f"use a multiple of {patch}")
    if args.probe and (args.image_size // 2) % patch:
        raise UserError(f"--probe copy needs the patch size {patch} to divide half the image, "
                        f"{args.image_size / 2:g} pixels, so that each token has a partner: use an image size "
                        f"that is a multiple of {2 * patch}")
    check_writable(args.out_dir, "--out-dir")
    if args.dataset == "subin" or args.fid_samples or (args.fid_samples is None and torch.cuda.is_available()):
        check_writable(args.cache_dir, "--cache-dir")     # decoded images, the metric classifier: written minutes in
    if gpu_defaults and not args.resume and pick_device().type == "cpu":
        raise UserError(f"no GPU found, and the defaults (DyDiLiT-S/2, batch 128, 10,000 steps) would take many "
                        f"hours on a CPU. The CPU recipe (about {CPU_RECIPE_MINUTES} minutes on 2 cores): "
                        f"{CPU_RECIPE}; or give --model, --steps or --batch-size to run as asked")
    dims = D.MODELS[args.model].keywords                  # a step keeps at least ACTIVATIONS (B, N, C) per block
    per_process, tokens = args.batch_size // world, (args.image_size // patch) ** 2
    check_fits(4 * ACTIVATIONS * per_process * tokens * dims["hidden_size"] * dims["depth"], pick_device(),
               f"a training step of {per_process:,} images of {args.image_size} x {args.image_size} ({tokens:,} "
               f"tokens) on {args.model}", "use a smaller --batch-size or --image-size")
