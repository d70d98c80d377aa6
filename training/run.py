"""
Run plumbing for train_tiny.py, visualize.py and tools/: one-line errors (UserError, and cli(),
the entry point every command line goes through), files written whole or not at all
(atomic_write), devices, precision and whether a run fits in memory, checkpoints that describe
their model (run_spec, save_checkpoint, load_checkpoint, resume_run), one run per folder
(RunLock), the JSONL log and its meter, and Ctrl-C / SIGTERM (GracefulStop).
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import dydilit as D

try:
    import fcntl                                                # the run lock (Linux, macOS)
except ImportError:                                             # Windows: runs are not locked
    fcntl = None


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
    above = nearest_folder(path if folder and path.exists() else path.parent)
    if not above.is_dir():
        raise UserError(f"{flag} {path} lies under {above}, which is a file: pick another {flag}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written (no write permission in {above}): pick another {flag}")


def nearest_folder(path):
    """`path` if it exists, else its nearest existing parent (a file there is returned as it is)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

@contextmanager
def atomic_write(path):
    """Yields a temporary name beside `path` (same suffix); renamed onto `path` when the block ends
    without an error: never half a file (checkpoints, caches, figures, npz, the run's notes). A
    write that fails (a full disk, a read-only folder) is one line naming the file; `path` stays as
    it was and no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                        # torch.save reports a full disk as a RuntimeError
        raise UserError(f"cannot write {path} ({write_failure(e, path.parent)}): "
                        + (f"the previous {path.name} is intact" if path.exists() else "nothing was written")) from None
    finally:
        tmp.unlink(missing_ok=True)


def size(n):
    """Bytes in words: '3.2 GiB', '512.0 MiB'."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def write_failure(e, folder):
    """Why a write failed, in a few words: the system's reason and the free space left."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{e.__class__.__name__}: {str(e).splitlines()[0][:120]}"
    try:
        return f"{reason}; {size(shutil.disk_usage(folder).free)} free there"
    except OSError:
        return reason


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


def available_memory(device):
    """Bytes a run may use: a GPU's total memory, or the memory the host has available now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:                        # Linux: MemAvailable counts reclaimable caches
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(need, device, what, fix):
    """One line, before anything is allocated, when a lower bound `need` (bytes) of what `what`
    takes exceeds the memory of `device`."""
    have = available_memory(device)
    if need > have:
        raise UserError(f"{what} needs at least {size(need)} of memory, and {device.type} has {size(have)}: {fix}")


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

# What builds a run's model and objective, named as train_tiny.py's flags. A checkpoint stores these
# values (its "spec"), so any script rebuilds the model from the file alone.
SPEC_KEYS = ("model", "attn", "no_dynamic_projection", "no_dynamic_kernel", "no_token_differential",
             "image_size", "channels", "num_classes", "objective", "ddpm_schedule")
CHECKPOINT_HOLDS = ("a checkpoint is a dict holding 'spec' (preset, attention, switches, image size, channels, classes, "
                    "objective: training.run.run_spec), the 'model' and 'ema' weights, 'classes' and 'step', "
                    "as training.run.save_checkpoint writes it")


def run_spec(model, attn, image_size, channels, num_classes, no_dynamic_projection=False, no_dynamic_kernel=False,
             no_token_differential=False, objective="flow", ddpm_schedule="linear"):
    """What builds a run's model (model: a preset of dydilit.MODELS) and its objective, as plain
    values: a checkpoint stores it; training.evaluation.build_model and build_objective read it."""
    spec = dict(model=model, attn=attn, no_dynamic_projection=no_dynamic_projection, no_dynamic_kernel=no_dynamic_kernel,
                no_token_differential=no_token_differential, image_size=image_size, channels=channels,
                num_classes=num_classes, objective=objective, ddpm_schedule=ddpm_schedule)
    problem = spec_problem(spec)
    if problem:
        raise ValueError(problem)
    return spec


def spec_problem(spec):
    """What is wrong with a spec (None: nothing)."""
    if not isinstance(spec, dict) or set(spec) != set(SPEC_KEYS):
        return f"its spec must have exactly the keys {', '.join(SPEC_KEYS)}"
    checks = [("model", spec["model"] in D.MODELS, f"one of {sorted(D.MODELS)}"),
              ("attn", spec["attn"] in D.ATTENTIONS, f"one of {sorted(D.ATTENTIONS)}"),
              ("objective", spec["objective"] in ("flow", "ddpm"), "flow or ddpm"),
              ("ddpm_schedule", spec["ddpm_schedule"] in ("linear", "cosine"), "linear or cosine")]
    checks += [(k, type(spec[k]) is int and spec[k] >= 1, "a whole number >= 1") for k in ("image_size", "channels", "num_classes")]
    checks += [(k, type(spec[k]) is bool, "True or False") for k in SPEC_KEYS[2:5]]
    return next((f"its spec has {k}={spec[k]!r}, not {want}" for k, ok, want in checks if not ok), None)


def save_checkpoint(path, model, ema, opt, step, spec, classes, args=None):
    """Plain types only (loadable with weights_only=True): the raw modules' weights, the optimizer,
    the step, the spec (run_spec: what builds the model and objective), the class names, the random
    state, and a run's other arguments (args, a dict: the data, the training flags)."""
    problem = spec_problem(spec) or (None if len(classes) == spec["num_classes"] else
                                     f"it names {len(classes)} classes for a model of {spec['num_classes']}")
    if problem:
        raise ValueError(f"save_checkpoint: {problem}")
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "spec": dict(spec), "classes": list(classes), "args": dict(args or {}),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """A checkpoint as a dict with its "spec" (save_checkpoint's, or a train_tiny.py checkpoint that
    kept its spec among its args), or a one-line error that says what a checkpoint must hold."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # cut, corrupt, not a torch file, or pickled objects
        raise UserError(f"cannot load checkpoint {path} ({e.__class__.__name__}): the file is cut, corrupt or not a "
                        f"checkpoint; {CHECKPOINT_HOLDS}") from None
    if isinstance(ckpt, dict) and "spec" not in ckpt and isinstance(ckpt.get("args"), dict) \
            and all(k in ckpt["args"] for k in SPEC_KEYS):
        ckpt["spec"] = {k: ckpt["args"][k] for k in SPEC_KEYS}     # a train_tiny.py checkpoint from before "spec"
    if not isinstance(ckpt, dict):
        problem = f"it holds a {type(ckpt).__name__}"
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        problem = "it holds a bare state_dict (weights, and nothing that says which model they belong to)"
    else:
        missing = [k for k in ("spec", "model", "ema", "classes", "step") if k not in ckpt]
        problem = (f"it has no {', '.join(repr(k) for k in missing)}" if missing else
                   "its 'args' are not a dict" if not isinstance(ckpt.get("args", {}), dict) else spec_problem(ckpt["spec"]))
    if problem:
        raise UserError(f"{path} is not a dydilit checkpoint: {problem}; {CHECKPOINT_HOLDS}")
    return ckpt


def resume_run(path, model, ema, opt, expect):
    """Continue a run: its checkpoint's weights into model and ema, its optimizer state into opt,
    its random state into torch; returns its step. expect: values the checkpoint must have been
    written with (its spec and data, e.g. {**spec, "dataset": "cifar10"}), checked before anything
    is loaded."""
    ckpt = load_checkpoint(path)
    have = {**ckpt.get("args", {}), **ckpt["spec"]}
    changed = [k for k in expect if have.get(k) != expect[k]]
    if changed:
        raise UserError(f"{path} is from another model: it has " + ", ".join(f"{k}={have.get(k)!r}" for k in changed) +
                        " but this run asks for " + ", ".join(f"{k}={expect[k]!r}" for k in changed) +
                        "; pass the same flags or another --out-dir")
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model ({str(e).splitlines()[0]}); use another --out-dir") from None
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and len(rng.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ckpt["step"]


class RunLock:
    """One run per folder: the file run.lock in it, locked (flock) for the run's lifetime and
    holding its pid. The system drops the lock when the process ends, however it ends, so a
    run.lock left by a killed run is recognised (its lock is free) and taken over, with a note."""

    def __init__(self, folder, flag="--out-dir"):
        self.path, self.flag, self.fd = Path(folder) / "run.lock", flag, None

    def __enter__(self):
        if fcntl is None:
            return self
        self.made = not self.path.parent.exists()              # then it goes again if the run leaves nothing in it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "its pid unknown"
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another run ({holder}): wait for it to end, stop it, "
                                f"or pick another {self.flag}") from None
            except OSError as e:                                # a file system without locks (some network mounts)
                os.close(fd)
                print(f"note: {self.path.parent} cannot be locked ({e.strerror}): make sure no other run writes there")
                return self
            try:                                                # the file a run just unlinked as it ended: open it again
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        left = os.read(fd, 200).decode(errors="replace").strip()
        if left:
            print(f"note: {self.path} was left by a run that has ended ({left}): taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            if self.made and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


# ----------------------------------------------------------------------------------------
# The log
# ----------------------------------------------------------------------------------------

class JsonLog:
    """log.jsonl: one JSON object per line, appended (the only writer; rank 0 only with DDP)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled

    def write(self, step, **fields):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": step, **fields}) + "\n")
            except OSError as e:
                raise UserError(f"cannot append to {self.path} ({write_failure(e, self.path.parent)})") from None

    def trim(self, step):
        """Before a resumed run writes: drop a cut last line (a run killed while writing it) and the
        records after the checkpoint's step (steps the resumed run takes again), saying so."""
        if not self.enabled or not self.path.exists():
            return
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        cut = bool(text) and not text.endswith("\n")
        lines = lines[:-1] if cut else lines
        kept = [line for line in lines if (json_or_none(line) or {}).get("step", 0) <= step]
        notes = []
        if cut:
            notes.append("dropped its cut last line (the run was stopped while writing it)")
        if len(kept) < len(lines):
            notes.append(f"dropped {len(lines) - len(kept)} records after step {step}, which this run takes again")
        if notes:
            with atomic_write(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
            print(f"note: {self.path}: " + "; ".join(notes))


def json_or_none(line):
    """A log line's record, or None for a line that is not a JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_log(path):
    """The records of a log.jsonl. Lines that are not JSON objects (a line cut by a killed run, a
    foreign file) are skipped with one warning."""
    path = Path(path)
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        record = json_or_none(line) if line.strip() else {}
        if record is None or (record and "step" not in record):
            bad.append(number)
        elif record:
            records.append(record)
    if bad:
        print(f"warning: {path}: skipped {len(bad)} unreadable line{'s' * (len(bad) > 1)} (line {', '.join(map(str, bad[:3]))}"
              f"{', ...' if len(bad) > 3 else ''})", file=sys.stderr)
    return records


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
