"""Helpers shared by the scripts' tests: each test in its own folder, a tiny run's flags, small
files in the real dataset formats, tiny finished runs, a checkpoint written from a notebook, a
stand-in for the FID Inception network, and the check of a one-line error."""

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                   # dydilit.py, the scripts and training/

import train_tiny as T                                          # noqa: E402
from training.checkpoint import build_model, run_spec, save_checkpoint   # noqa: E402
from training.data import ImageData                             # noqa: E402

# a DyDi-LiT-T/4 on 16 x 16 synthetic images: seconds per run on a CPU
TINY = ["--dataset", "synthetic", "--model", "DyDiLiT-T/4", "--image-size", "16", "--batch-size", "8",
        "--val-size", "16", "--sample-steps", "2", "--log-every", "2"]


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path, monkeypatch):
    """No test reads or writes the folder pytest runs in (a user's runs/, viz/ or data/ are there)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Four finished tiny runs: LiT, DyDi-LiT, DyDi-LiT without the dynamic kernel (2 steps each),
    and a second DyDi-LiT seed that ran 4 steps; {name: checkpoint path}."""
    root = tmp_path_factory.mktemp("runs")
    runs, cwd = {}, os.getcwd()
    os.chdir(root)
    try:
        for name, flags in (("linear", ["--attn", "linear", "--steps", "2"]), ("dydila", ["--steps", "2"]),
                            ("static", ["--no-dynamic-kernel", "--steps", "2"]),
                            ("dydila_s1", ["--seed", "1", "--steps", "4", "--eval-every", "2"])):
            assert T.main([*TINY, *flags, "--sample-every", "2", "--out-dir", str(root / name)]) == 0
            runs[name] = str(root / name / "ckpt.pt")
    finally:
        os.chdir(cwd)
    return runs


@pytest.fixture(scope="session")
def probe_runs(tmp_path_factory):
    """Two finished copy-probe runs of 2 steps, LiT and DyDi-LiT: {attn: checkpoint path}."""
    root = tmp_path_factory.mktemp("probe_runs")
    runs, cwd = {}, os.getcwd()
    os.chdir(root)
    try:
        for attn in ("linear", "dydila"):
            assert T.main([*TINY, "--probe", "copy", "--attn", attn, "--steps", "2", "--out-dir", str(root / attn)]) == 0
            runs[attn] = str(root / attn / "ckpt.pt")
    finally:
        os.chdir(cwd)
    return runs


def one_line_error(capsys, *facts):
    """The command ended with one 'error:' line on stderr (after any progress bar) holding each of
    facts (a flag's name, a number, a path); returns that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    assert all(str(fact) in lines[-1] for fact in facts), (facts, lines[-1])
    return lines[-1]


def never(what):
    """A stand-in that fails the test if it is called."""
    def called(*a, **k):
        raise AssertionError(f"{what} was called")
    return called


def library_checkpoint(path, preset="DyDiLiT-T/4", attn="dydila", args=None, image_size=16):
    """A checkpoint written by training.checkpoint.save_checkpoint from a notebook: no train_tiny.py run behind it."""
    spec = run_spec(preset, attn, image_size=image_size, channels=3, num_classes=10)
    torch.manual_seed(0)
    model = build_model(spec)
    save_checkpoint(path, model, model, torch.optim.SGD(model.parameters(), lr=0.1), 7, spec,
                    [f"class {c}" for c in range(10)], args)
    return str(path)


def run_py(script, args, cwd, env=None, **kw):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kw)


def log_rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def write_cifar_folder(folder, n=6):
    """CIFAR-10's python version: five pickled training batches and a test batch of n images each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [(i + j) % 10 for j in range(n)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def write_idx(path, array):
    """An IDX file (MNIST format), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def metric_data(n_train=600, n_val=200):
    """Fabricated two-class images: class 0 bright on the left half, class 1 on the right."""
    def draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        x = torch.randint(0, 60, (n, 1, 16, 16), generator=g)
        x[y == 0, :, :, :8] += 150
        x[y == 1, :, :, 8:] += 150
        return x.to(torch.uint8), y
    (tx, ty), (vx, vy) = draw(n_train, 0), draw(n_val, 1)
    return ImageData(tx, ty, vx, vy, ["left", "right"], flip=False)


class StandIn(torch.nn.Module):
    """A scripted stand-in for the FID Inception network: (n, 3, 299, 299) -> (n, 2048)."""

    def __init__(self, out=2048):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, out)

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))
