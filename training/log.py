"""
The run's log: log.jsonl, one JSON object per line (JsonLog writes it, read_log reads any), and the
Meter that makes a training log line and stops a run whose steps keep failing.
"""

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .cli import UserError
from .files import atomic_write, write_failure

MAX_SKIPS_IN_A_ROW = 3                                  # non-finite steps in a row before the run stops


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
        print(f"warning: {path}: skipped {len(bad)} unreadable line{'s' * (len(bad) > 1)} "
              f"(line {', '.join(map(str, bad[:3]))}{', ...' if len(bad) > 3 else ''})", file=sys.stderr)
    return records


class Meter:
    """The numbers of one log line, over the steps since the last: mean loss, loss per quarter of
    t, images per second of training (paused() over evaluations), peak memory, skipped steps. A
    run whose loss or gradient is not finite MAX_SKIPS_IN_A_ROW steps in a row ends in add()."""

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

    def add(self, stats, images, step, kept):
        """Step `step`'s stats (dydilit.training_step) over `images` images. kept: what the run
        keeps if it ends here (its last checkpoint, in words)."""
        self.images += images
        self.grad_norm = stats["grad_norm"]
        if not stats["skipped"]:
            self.skipped_in_a_row = 0
            self.steps += 1
            self.loss += stats["loss"]
            bins = (stats["t"].float() * 4).long().clamp(0, 3)
            self.bins[0].index_add_(0, bins, stats["losses"].double())
            self.bins[1].index_add_(0, bins, torch.ones_like(stats["losses"], dtype=torch.float64))
            return
        self.skipped, self.skipped_in_a_row = self.skipped + 1, self.skipped_in_a_row + 1   # no update was made
        if self.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise UserError(f"the loss or gradient was not finite for {MAX_SKIPS_IN_A_ROW} steps in a row (up to step "
                            f"{step}), so no update was made; {kept} (try a lower --lr or --precision fp32)")

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
