"""
Run plumbing for train_tiny.py, visualize.py and tools/: one-line errors (UserError, and cli(),
the entry point every command line goes through), files written whole (atomic_write), devices and
precision, checkpoints, the JSONL log and its meter, and
Ctrl-C / SIGTERM (GracefulStop).
"""

import argparse
import hashlib
import json
import os
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------
# Errors and the command line
# ----------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM where the run stops at once (raised by GracefulStop)."""

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, unless it has none (None, off) or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):                # (0 is a default worth showing: compare by identity)
            return action.help
        return super()._get_help_string(action)


def check_writable(path, flag, folder=True):
    """One line, before any work, if `path` (a folder, or a file with folder=False) cannot be
    written: the wrong kind of thing already there, a file among its parents, no permission."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path} is {'a file' if folder else 'a folder'}: give {'a folder' if folder else 'a file name'} "
                        f"that does not exist yet or is one")
    above = path if folder and path.exists() else path.parent
    while not above.exists():                                   # the nearest existing parent
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} {path} lies under {above}, which is a file: pick another {flag}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written (no write permission in {above}): pick another {flag}")


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

@contextmanager
def atomic_write(path):
    """Yields a temporary name beside `path` (same suffix); renamed onto `path` when the block ends
    without an error: never half a file (checkpoints, caches, figures, npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path, algorithm="md5"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Devices, precision, the model
# ----------------------------------------------------------------------------------------

def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed():
    """(ddp, rank, world size, device): DDP when torchrun set RANK (nccl on CUDA, gloo on a CPU)."""
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def precision_context(precision, device):
    """(autocast factory, autocast dtype or None, name): "auto" is bf16 autocast on CUDA, fp32
    elsewhere. TF32 matmuls on CUDA unless fp32 is asked for explicitly."""
    name = precision
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if name == "fp32":
        return nullcontext, None, name
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), torch.bfloat16, name


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def save_checkpoint(path, model, ema, opt, step, config, classes):
    """Plain types only (loadable with weights_only=True): the raw modules' weights, the optimizer,
    the step, the run's arguments (config, a dict), the class names and the random state."""
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "args": dict(config), "classes": list(classes),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """A train_tiny.py checkpoint as a dict, or a one-line error."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # truncated, not a checkpoint, or pickled objects
        raise UserError(f"cannot load checkpoint {path} ({e.__class__.__name__}): the file is corrupt or not "
                        f"from train_tiny.py") from None


# ----------------------------------------------------------------------------------------
# The log
# ----------------------------------------------------------------------------------------

class JsonLog:
    """log.jsonl: one JSON object per line, appended (the only writer; rank 0 only with DDP)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled

    def write(self, step, **fields):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **fields}) + "\n")


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Meter:
    """The numbers of one log line, over the steps since the last: mean loss, loss per quarter of
    t, images per second of training (paused() over evaluations), peak memory, skipped steps."""

    def __init__(self, device):
        self.device = device
        self.skipped_in_a_row = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._reset()

    def _reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.bins = torch.zeros(2, 4, device=self.device, dtype=torch.float64)   # per-t-bin sums and counts
        self.steps = self.skipped = self.images = 0
        self.start = time.perf_counter()

    def add(self, stats, images):
        """One training step's stats (dydilit.training_step) over `images` images."""
        self.images += images
        self.grad_norm = stats["grad_norm"]
        if stats["skipped"]:                                    # a non-finite loss or gradient: no update was made
            self.skipped, self.skipped_in_a_row = self.skipped + 1, self.skipped_in_a_row + 1
            return
        self.skipped_in_a_row = 0
        self.steps += 1
        self.loss += stats["loss"]
        bins = (stats["t"].float() * 4).long().clamp(0, 3)
        self.bins[0].index_add_(0, bins, stats["losses"].double())
        self.bins[1].index_add_(0, bins, torch.ones_like(stats["losses"], dtype=torch.float64))

    def pop(self):
        """The log fields since the last pop(); starts the next interval."""
        dt = time.perf_counter() - self.start
        sums, counts = self.bins.tolist()
        mem = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        record = {"loss": self.loss.item() / self.steps if self.steps else None,
                  "loss_per_t_bin": [s / c if c else None for s, c in zip(sums, counts)],
                  "img_per_s": self.images / dt, "peak_mem_gb": mem, "grad_norm": self.grad_norm.item(),
                  "skipped_steps": self.skipped}
        self._reset()
        return record

    @contextmanager
    def paused(self):
        """Time spent inside does not count as training time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t


# ----------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ----------------------------------------------------------------------------------------

class GracefulStop:
    """Ctrl-C and SIGTERM for a training run, from launch to the end (a context manager).

    Until training() and inside at_once() (validation, scoring, sample grids) a signal stops at
    once: it raises Stopped. During training the first signal only asks the loop to end when its
    step ends (the run then checkpoints and validates); a second raises Stopped wherever the run
    is. With DDP, agree() makes every rank stop at the same step."""

    def __init__(self, ddp=False, note=""):
        self.signals, self.ddp, self.note, self.urgent = [], ddp, note, True

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        self.signals.append(signum)
        if self.urgent or len(self.signals) > 1:
            raise Stopped(signum, self.note)

    def training(self):
        """From here a first signal waits for the end of the step."""
        self.urgent, self.note = False, "at once: the last checkpoint stays"

    @contextmanager
    def at_once(self):
        """A block that a signal ends at once; the run then stops (self.signals says so)."""
        urgent, self.urgent = self.urgent, True
        try:
            yield
        except Stopped:
            pass
        finally:
            self.urgent = urgent

    def agree(self, device):
        """Whether to stop now; with DDP a signal on any rank stops every rank."""
        if self.ddp:
            flag = torch.tensor(float(bool(self.signals)), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self.signals:
                self.signals.append(signal.SIGTERM)
        return bool(self.signals)
