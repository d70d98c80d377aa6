"""
What a run writes to disk: files whole or not at all (atomic_write; a failed write is one line and
leaves the previous file intact), one run per folder (RunLock), and file digests.
"""

import hashlib
import os
import shutil
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .cli import UserError, format_bytes

try:
    import fcntl                                                # the run lock (Linux, macOS)
except ImportError:                                             # Windows: runs are not locked
    fcntl = None


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


def write_failure(e, folder):
    """Why a write failed, in a few words: the system's reason and the free space left."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else \
        f"{e.__class__.__name__}: {str(e).splitlines()[0][:120]}"
    try:
        return f"{reason}; {format_bytes(shutil.disk_usage(folder).free)} free there"
    except OSError:
        return reason


def file_digest(path, algorithm="md5"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunLock:
    """One run per folder: the file run.lock in it, locked (flock) for the run's lifetime and
    holding its pid. The system drops the lock when the process ends, however it ends, so a
    run.lock left by a killed run is recognised (its lock is free) and taken over, with a note."""

    def __init__(self, folder, flag="--out-dir"):
        self.path, self.flag, self.fd = Path(folder) / "run.lock", flag, None
        self.made = not self.path.parent.exists()              # then it goes again if the run leaves nothing in it

    def __enter__(self):
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "its pid unknown"
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another run ({holder}): wait for it to end, "
                                f"stop it, or pick another {self.flag}") from None
            except OSError as e:                                # a file system without locks (some network mounts)
                os.close(fd)
                print(f"note: {self.path.parent} cannot be locked ({e.strerror}): make sure no other run writes there")
                return self
            try:                                                # a file a run just unlinked as it ended: open again
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        left = os.read(fd, 200).decode(errors="replace").strip()
        if left:
            print(f"note: {self.path} was left by a run that has ended ({left}): taking it over")
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            if self.made and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


@contextmanager
def own_run_folder(folder, resume):
    """One run per --out-dir: its lock for the run's lifetime (rank 0 takes it under torchrun). With
    it held, a run there is continued only with --resume, and --resume needs a run there."""
    with RunLock(folder) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        ckpt = Path(folder) / "ckpt.pt"
        if resume and not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}; start without --resume, or point --out-dir at the run")
        if not resume and ckpt.exists():
            raise UserError(f"{folder} already holds a run (ckpt.pt): add --resume to continue it, "
                            f"or pick another --out-dir")
        yield


def write_text(path, text):
    """A small text file, written whole."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
