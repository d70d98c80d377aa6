"""
Ctrl-C and SIGTERM for a training run, from launch to the end: GracefulStop.
"""

import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .cli import Stopped


class GracefulStop:
    """Ctrl-C and SIGTERM for a training run, from launch to the end (a context manager).

    Until training() and inside at_once() (validation, scoring, sample grids) a signal stops at
    once: it raises Stopped. During training the first signal only asks the loop to end when its
    step ends (the run then checkpoints and validates); a second raises Stopped wherever the run
    is. Under DDP (torch.distributed initialised), agree() makes every rank stop at the same step."""

    def __init__(self, note=""):
        self.signals, self.note, self.urgent = [], note, True

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
        """Whether to stop now; under DDP a signal on any rank stops every rank."""
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor(float(bool(self.signals)), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self.signals:
                self.signals.append(signal.SIGTERM)
        return bool(self.signals)
