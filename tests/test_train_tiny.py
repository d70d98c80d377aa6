"""train_tiny.py and training/: the real loaders on small fabricated files, runs, what a short
run pays for, Ctrl-C and SIGTERM at every stage, exact resume, DDP, sample quality, one-line errors."""

import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import dydilit as D
import train_tiny as T
import training.data as TD
import training.evaluation as TE
import training.quality as TQ
from conftest import (ROOT, TINY, StandIn, log_rows, metric_data, never, one_line_error, write_cifar_folder,
                      write_idx)
from training.attention import partners
from training.cli import CPU_RECIPE, UserError


def wait_to_be_stopped(what):
    """A stand-in for something long that a signal must end at once."""
    def long(*a, **k):
        for _ in range(3000):                                   # 30 s: must not run to its end
            time.sleep(0.01)
        raise AssertionError(f"the signal did not stop {what}")
    return long


# --- a run, and what a short run pays for ---------------------------------------------------

def test_synthetic_smoke_run_writes_checkpoint_log_and_grids(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TQ, "metric_classifier", never("the metric classifier"))   # a CPU run scores nothing by default
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "6", "--eval-every", "3", "--sample-every", "3", "--out-dir", str(out)]) == 0
    for name in ("ckpt.pt", "log.jsonl", "samples_0000003.png", "samples_final.png", "loss.png", "classes.txt"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)      # plain types only
    assert ckpt["step"] == 6 and ckpt["args"]["attn"] == "dydila" and len(ckpt["classes"]) == 10
    assert set(ckpt) >= {"model", "ema", "opt", "step", "args", "rng"}
    rows = log_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in train_rows)
    assert len(train_rows[0]["loss_per_t_bin"]) == 4
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert not [r for r in rows if "fd_cnn" in r or "real_fd_cnn" in r]
    err = capsys.readouterr().err
    assert "validation" in err and "sampling samples_final.png" in err   # long waits show progress
    # one command draws a grid from the checkpoint
    grid = tmp_path / "grid.png"
    assert T.main(["--sample-from", str(out / "ckpt.pt"), "--grid", str(grid), "--sample-steps", "2"]) == 0
    assert grid.stat().st_size > 0 and "sampling grid.png" in capsys.readouterr().err


def test_a_run_shorter_than_sample_every_ends_without_a_grid_and_says_how_to_draw_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    assert not list(out.glob("samples_*.png")) and (out / "ckpt.pt").exists()
    done = capsys.readouterr().out.splitlines()[-1]
    assert done.startswith("done: 2 steps") and "--sample-every" in done and f"--sample-from {out / 'ckpt.pt'}" in done


def test_nothing_of_the_metrics_is_built_before_the_first_step(tmp_path, monkeypatch):
    steps, seen = [], []
    real_step = D.training_step

    def step(*a, **k):
        steps.append(1)
        return real_step(*a, **k)

    def classifier(data, *a, **k):                              # when is it built, and is the checkpoint there?
        seen.append((len(steps), torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"]))
        return TQ.MetricCNN(3, 10), (np.zeros(128), np.eye(128)), 0.0   # an untrained stand-in: no minutes of training

    monkeypatch.setattr(D, "training_step", step)
    monkeypatch.setattr(TQ, "metric_classifier", classifier)
    argv = [*TINY, "--steps", "4", "--eval-every", "2", "--fid-samples", "12", "--out-dir", str(tmp_path / "run")]
    assert T.main(argv) == 0
    assert seen == [(2, 2)]                                     # once, at the first scoring, after its checkpoint
    rows = log_rows(tmp_path / "run")
    assert [r["step"] for r in rows if "real_fd_cnn" in r] == [2]   # the held-out floor, scored then too
    assert [r["step"] for r in rows if "fd_cnn" in r] == [2, 4]


@pytest.mark.slow
def test_scoring_changes_no_weights(tmp_path, monkeypatch):
    """The metric classifier's init and training, sampling and scoring draw no random numbers of the run's."""
    monkeypatch.setattr(TQ, "CNN_STEPS", 5)
    argv = [*TINY, "--steps", "4", "--eval-every", "2", "--cache-dir", str(tmp_path / "cache")]
    assert T.main([*argv, "--fid-samples", "8", "--out-dir", str(tmp_path / "scored")]) == 0
    assert T.main([*argv, "--out-dir", str(tmp_path / "plain")]) == 0
    scored, plain = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("scored", "plain"))
    assert [r["step"] for r in log_rows(tmp_path / "scored") if "fd_cnn" in r] == [2, 4]
    for name, w in plain["model"].items():
        assert torch.equal(scored["model"][name], w), name


@pytest.mark.slow
def test_interrupt_then_resume_matches_uninterrupted_run(tmp_path):
    args = [*TINY, "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000", "--steps", "30",
            "--warmup", "1", "--lr", "1e-3"]                 # the weights move fast: any divergence shows
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *args, "--out-dir", "a"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "a" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= stopped < 30
    assert T.main([*args, "--out-dir", str(tmp_path / "a"), "--resume"]) == 0      # in this process: no start-up to wait for
    assert T.main([*args, "--out-dir", str(tmp_path / "b")]) == 0
    a = {r["step"]: r for r in log_rows(tmp_path / "a") if "loss" in r}
    b = {r["step"]: r for r in log_rows(tmp_path / "b") if "loss" in r}
    assert max(a) == max(b) == 30
    assert a[30]["loss"] < 0.8 * a[1]["loss"]                 # it learned, so the comparison is not trivial
    for step in range(1, 31):                                 # before the stop, and after the resume
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    va = [r["val_loss"] for r in log_rows(tmp_path / "a") if "val_loss" in r][-1]
    vb = [r["val_loss"] for r in log_rows(tmp_path / "b") if "val_loss" in r][-1]
    assert va == pytest.approx(vb, rel=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_train_and_stop_together(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, "--steps", "400", "--eval-every", "2", "--sample-every", "1000", "--out-dir", "ddp"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *args], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for r in (0, 1)]
    log = tmp_path / "ddp" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and sum('"val_loss"' in line for line in log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)                       # a signal on one rank stops both, at the same step
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs
    assert "device cpu x2" in outs[0][0] and "stopped at step" in outs[0][0]
    assert 4 <= torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["step"] < 400


def test_validation_loss_is_identical_for_identical_weights():
    data = TD.make_synthetic(16)
    model = D.MODELS["DyDiLiT-T/4"](input_size=16, num_classes=10, attn="linear")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    a = TE.validation_loss(model, D.FlowMatching(), data.val_x[:32], data.val_y[:32], nullcontext)
    b = TE.validation_loss(model, D.FlowMatching(), data.val_x[:32], data.val_y[:32], nullcontext)
    assert a == b and len(a[1]) == len(TE.VAL_TIMES)


def test_batches_are_a_function_of_step_and_shard_across_ranks():
    data = TD.make_synthetic(8, n_train=20, n_val=4)
    full = TD.Batches(data, 8, seed=3)
    xs = [full.get(s)[1] for s in range(5)]                  # 40 labels = two epochs of 20
    again = TD.Batches(data, 8, seed=3)
    assert torch.equal(again.get(4)[1], xs[4])               # no state: step 4 straight away
    perm0, perm1 = full.perm(0), full.perm(1)
    assert torch.equal(torch.cat(xs)[:20], data.train_y[perm0]) and torch.equal(torch.cat(xs)[20:], data.train_y[perm1])
    halves = [TD.Batches(data, 8, seed=3, rank=r, world=2).get(2)[1] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), xs[2])


@pytest.mark.slow
def test_img_per_s_counts_every_step_of_the_interval(tmp_path, monkeypatch):
    step = D.training_step

    def slow_step(*a, **kw):                                    # every step takes at least 200 ms
        time.sleep(0.2)
        return step(*a, **kw)
    monkeypatch.setattr(D, "training_step", slow_step)
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "6", "--log-every", "3", "--eval-every", "2", "--out-dir", str(out)]) == 0
    speeds = [r["img_per_s"] for r in log_rows(out) if "img_per_s" in r]
    assert len(speeds) == 2 and all(v <= 3 * 8 / (3 * 0.2) for v in speeds)    # 3 steps of 8 images in >= 600 ms


# --- the real loaders on small files in the true formats ---------------------------------

def test_cifar10_reads_the_python_batches_folder(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    data = TD.load_cifar10(tmp_path)
    assert data.train_x.shape == (30, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.val_x.shape == (6, 3, 32, 32) and data.flip and data.classes[0] == "airplane"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(data.train_x[6].flatten(), torch.from_numpy(raw[b"data"][0]))   # channel-major rows
    assert data.train_y[6:12].tolist() == raw[b"labels"]


def make_cifar_tarball(tmp_path):
    src = tmp_path / "src"
    write_cifar_folder(src / "cifar-10-batches-py")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tarball = data_dir / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return data_dir, tarball


def test_cifar10_extracts_a_verified_tarball(tmp_path, monkeypatch):
    data_dir, tarball = make_cifar_tarball(tmp_path)
    monkeypatch.setattr(TD, "CIFAR10_MD5", TD.file_digest(tarball))
    data = TD.load_cifar10(data_dir)
    assert data.train_x.shape == (30, 3, 32, 32)
    assert (data_dir / "cifar-10-batches-py" / "test_batch").exists()
    assert set(p.name for p in data_dir.iterdir()) == {"cifar-10-python.tar.gz", "cifar-10-batches-py"}  # no temp left


def test_cifar10_md5_mismatch_is_a_clear_error_and_extracts_nothing(tmp_path, capsys):
    data_dir, tarball = make_cifar_tarball(tmp_path)         # its MD5 is not the official one
    with pytest.raises(UserError, match=f"{TD.file_digest(tarball)}.*{TD.CIFAR10_MD5}"):
        TD.load_cifar10(data_dir)
    assert set(p.name for p in data_dir.iterdir()) == {"cifar-10-python.tar.gz"}
    # through the command line: one line on stderr, exit code 2
    assert T.main(["--data-dir", str(data_dir), "--steps", "1", "--out-dir", str(tmp_path / "run")]) == 2
    one_line_error(capsys, tarball, "MD5")


def test_cifar10_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(TD, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")   # refused at once, offline
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz.*data/"):
        TD.load_cifar10(tmp_path / "data", explicit=False)    # the default ./data: created for the download
    assert not any((tmp_path / "data").iterdir())           # no partial download left behind


def test_cifar10_corrupt_batch_is_a_clear_error(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        TD.load_cifar10(tmp_path)


def test_fashion_mnist_reads_idx_gz_and_pads_to_32(tmp_path, monkeypatch):
    monkeypatch.setattr(TD, "FASHION_DIRS", [])                # only the fabricated files
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:3])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    data = TD.load_fashion_mnist(tmp_path)
    assert data.train_x.shape == (7, 1, 32, 32) and data.val_x.shape == (3, 1, 32, 32) and not data.flip
    assert torch.equal(data.train_x[:, 0, 2:30, 2:30], torch.from_numpy(imgs.astype(np.uint8)))
    assert data.train_x[:, :, :2].sum() == 0 and data.train_y.tolist() == list(range(7))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        TD.load_fashion_mnist(tmp_path)
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(UserError, match="dataset-fashion-mnist"):     # where to get it
        TD.load_fashion_mnist(tmp_path)


def test_data_dir_fallbacks_are_announced_and_explicit_folders_must_exist(tmp_path, monkeypatch, capsys):
    debian = tmp_path / "debian"
    debian.mkdir()
    images, labels = np.zeros((3, 28, 28), np.uint8), np.arange(3, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(debian / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(debian / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(TD, "FASHION_DIRS", [str(debian)])
    TD.load_fashion_mnist(tmp_path / "data", explicit=False)
    assert str(debian) in capsys.readouterr().out
    with pytest.raises(UserError, match="--data-dir .*nowhere does not exist"):
        TD.load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(UserError, match="--data-dir .*nowhere does not exist"):
        TD.load_cifar10(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()                  # nothing created


@pytest.mark.parametrize("dataset", ["cifar10", "fashion-mnist", "subin"])
def test_a_data_dir_that_is_a_file_is_said_to_be_one(dataset, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="--data-dir .*a_file is a file"):
        TD.load_data(dataset, tmp_path / "a_file")


def jpegs(folder, n, rng, size=(20, 20)):
    from PIL import Image
    folder.mkdir(parents=True)
    for j in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{j:03d}.JPEG")


def test_subin_reads_class_folders_skips_corrupt_files_and_caches(tmp_path, capsys):
    root, rng = tmp_path / "train", np.random.default_rng(0)
    for c, wnid in enumerate(["n02", "n01", "n03"]):
        jpegs(root / wnid, 52 if c == 0 else 3, rng, size=(40, 30))
    (root / "n01" / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "n01" / "notes.txt").write_text("ignored")
    data = TD.load_subin(root, 2, None, 16, tmp_path / "cache")
    assert data.classes == ["n01", "n02"]                    # the first two in sorted order
    assert "skipped 1 unreadable files of 56" in capsys.readouterr().out    # the count and the total
    # held out: every 50th image of a class, and the last of a class with 2 to 49 (n01: 4 files, 3 readable)
    assert data.train_x.shape == (53, 3, 16, 16) and data.val_x.shape == (2, 3, 16, 16)
    assert data.train_y.tolist().count(0) == 2 and data.val_y.tolist() == [0, 1]
    again = TD.load_subin(root, 2, None, 16, tmp_path / "cache")   # from the cache
    cached = list((tmp_path / "cache").iterdir())
    assert torch.equal(again.train_x, data.train_x) and len(cached) == 1
    cached[0].write_bytes(b"damaged")
    with pytest.raises(UserError, match="cached Sub-IN images .*delete it"):
        TD.load_subin(root, 2, None, 16, tmp_path / "cache")
    listed = tmp_path / "classes.txt"
    listed.write_text("n03\nn01\n")
    assert TD.load_subin(root, 2, str(listed), 16, tmp_path / "cache").classes == ["n03", "n01"]
    listed.write_text("n09\n")
    with pytest.raises(UserError, match="--class-list .*n09"):
        TD.load_subin(root, 2, str(listed), 16, tmp_path / "cache")


def test_subin_holds_out_an_image_of_every_small_class_and_refuses_empty_ones(tmp_path):
    root, rng = tmp_path / "train", np.random.default_rng(0)
    for wnid, n in (("n01", 3), ("n02", 1), ("n03", 12)):
        jpegs(root / wnid, n, rng)
    data = TD.load_subin(root, 3, None, 8, tmp_path / "cache")
    assert data.val_y.tolist() == [0, 2] and len(data.train_y) == 2 + 1 + 11   # n02's single image trains
    jpegs(tmp_path / "one" / "n01", 1, rng)
    with pytest.raises(UserError, match="no validation image"):
        TD.load_subin(tmp_path / "one", 1, None, 8, tmp_path / "cache")
    (root / "n00").mkdir()
    with pytest.raises(UserError, match="n00 has no images"):
        TD.load_subin(root, 4, None, 8, tmp_path / "cache")


# --- the copy probe: every token's answer in one far key ---------------------------------------

def test_the_copy_probe_makes_every_token_equal_its_partner_half_the_grid_away():
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    probe = TD.copy_probe(images)
    assert probe.shape == images.shape and probe.dtype == torch.uint8
    half = (images[:, :, 0::2].float() + images[:, :, 1::2].float()) / 2       # A: rows averaged in pairs
    torch.testing.assert_close(probe[:, :, :16].float(), half, atol=0.5, rtol=0)
    for patch in (2, 4):                                        # as tokens: token i == token partners(i)
        H = 32 // patch
        tokens = probe.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).reshape(5, H * H, -1)
        assert torch.equal(tokens, tokens[:, partners((H, H))])
        assert int(partners((H, H))[0]) == (H // 2) * H        # token (0, 0)'s partner: (H/2, 0), H/2 rows away


def test_copy_error_is_zero_for_real_probe_images_and_about_one_for_independent_halves():
    data = TD.load_data("synthetic", image_size=16, probe="copy")
    x, y = data.val_x, data.val_y
    assert TQ.copy_error(x, y) == 0
    shuffled = x.clone()                                        # each bottom from another image of the same class
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        shuffled[idx, :, 8:] = x[idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(int(c)))], :, 8:]
    assert 0.9 < TQ.copy_error(shuffled, y) < 1.1


@pytest.mark.slow
def test_a_copy_probe_run_logs_the_copy_error_of_its_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--probe", "copy", "--steps", "2", "--out-dir", str(out)]) == 0
    rows = [r for r in log_rows(out) if "copy_error" in r]
    assert [r["step"] for r in rows] == [2] and rows[0]["copy_samples"] == TE.COPY_SAMPLES
    assert 0 < rows[0]["copy_error"] < 2
    assert any(line.startswith("step 2: copy error") for line in capsys.readouterr().out.splitlines())
    assert torch.load(out / "ckpt.pt", weights_only=True)["args"]["probe"] == "copy"
    assert T.main([*TINY, "--steps", "4", "--out-dir", str(out), "--resume"]) == 2   # the probe is part of the model's data
    one_line_error(capsys, "probe='copy'", "probe=None")


# --- Ctrl-C and SIGTERM: from launch, during training, during the first scoring ---------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_the_first_step_ends_the_run_with_one_line(sig, tmp_path, monkeypatch, capsys):
    def loading(*a, **k):                                       # the signal arrives while the data loads
        os.kill(os.getpid(), sig)
        return wait_to_be_stopped("the data loading")()

    def default_handler(signum, frame):                         # what the process would do without a handler of its own
        raise AssertionError(f"train_tiny left {signal.Signals(signum).name} to the default handler before the first step")

    monkeypatch.setattr(T, "load_data", loading)
    monkeypatch.setattr(D, "training_step", never("a training step"))
    previous = signal.signal(signal.SIGTERM, default_handler)
    try:
        code = T.main([*TINY, "--steps", "5", "--out-dir", str(tmp_path / "run")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 128 + sig
    assert err.count("\n") == 1 and err.startswith(f"stopped by {sig.name} ") and "nothing was written" in err
    assert not (tmp_path / "run").exists()


def test_a_signal_writes_the_checkpoint_before_validating(tmp_path, monkeypatch, capsys):
    seen = []
    real_step, real_validation = D.training_step, TE.validation_loss

    def step(*a, **k):
        out = real_step(*a, **k)
        if len(seen) == 2:                                      # during step 3: the signal arrives
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append("step")
        return out

    def validation(model, *a, **k):                             # the checkpoint is already on disk
        if not isinstance(model, TE.PredictsZero):              # (the reference of the divergence check)
            seen.append(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"])
        return real_validation(model, *a, **k)

    monkeypatch.setattr(D, "training_step", step)
    monkeypatch.setattr(TE, "validation_loss", validation)
    handler = signal.getsignal(signal.SIGTERM)
    code = T.main([*TINY, "--steps", "50", "--eval-every", "1000", "--sample-every", "1000", "--out-dir", str(tmp_path / "run")])
    assert code == 128 + signal.SIGTERM and seen == ["step"] * 3 + [3]
    assert any(line.startswith("interrupted at step 3") for line in capsys.readouterr().out.splitlines())
    assert [r["step"] for r in log_rows(tmp_path / "run") if "val_loss" in r] == [3]   # validated after saving
    assert (tmp_path / "run" / "loss.png").exists()
    assert signal.getsignal(signal.SIGTERM) is handler          # the handlers are restored


@pytest.mark.slow
def test_a_second_signal_skips_the_validation(tmp_path, monkeypatch):
    real_step = D.training_step

    def step(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)                     # Ctrl-C during the first step
        return real_step(*a, **k)

    def validation(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)                     # Ctrl-C again while it validates
        return wait_to_be_stopped("the validation")()

    monkeypatch.setattr(D, "training_step", step)
    monkeypatch.setattr(TE, "validation_loss", validation)
    code = T.main([*TINY, "--steps", "50", "--out-dir", str(tmp_path / "run")])
    assert code == 128 + signal.SIGINT
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 1
    log = tmp_path / "run" / "log.jsonl"
    assert not log.exists() or not [r for r in log_rows(tmp_path / "run") if "val_loss" in r]


@pytest.mark.slow
def test_a_signal_during_a_sample_grid_saves_at_once(tmp_path, monkeypatch):
    def grid(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return wait_to_be_stopped("the sample grid")()

    monkeypatch.setattr(TE, "sample_grid", grid)
    monkeypatch.setattr(TE, "validation_loss", lambda *a, **k: (1.0, [1.0] * len(TE.VAL_TIMES)))
    code = T.main([*TINY, "--steps", "50", "--eval-every", "1000", "--sample-every", "2", "--out-dir", str(tmp_path / "run")])
    assert code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_a_signal_during_the_first_scoring_ends_the_run_and_keeps_its_checkpoint(tmp_path, monkeypatch, capsys):
    def classifier(*a, **k):                                    # Ctrl-C while the metric classifier trains
        os.kill(os.getpid(), signal.SIGINT)
        return wait_to_be_stopped("the metric classifier's training")()

    monkeypatch.setattr(TQ, "metric_classifier", classifier)
    out = tmp_path / "run"
    code = T.main([*TINY, "--steps", "50", "--eval-every", "2", "--fid-samples", "12", "--out-dir", str(out)])
    assert code == 128 + signal.SIGINT
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert any(line.startswith("stopped at step 2") for line in capsys.readouterr().out.splitlines())


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_the_run_stops_with_good_weights(tmp_path, monkeypatch, capsys):
    real_step, calls = D.training_step, []

    def step(model, objective, opt, x0, y, **k):
        calls.append(1)
        if len(calls) in (2, 5, 6, 7):                          # step 2 alone, then three in a row from step 5
            x0 = x0 * float("nan")
        return real_step(model, objective, opt, x0, y, **k)

    monkeypatch.setattr(D, "training_step", step)
    out = tmp_path / "run"
    code = T.main([*TINY, "--steps", "20", "--log-every", "1", "--eval-every", "3", "--sample-every", "100", "--out-dir", str(out)])
    assert code == 2
    one_line_error(capsys, "not finite", "3 steps", "step 7", out / "ckpt.pt", "step 6")
    rows = {r["step"]: r for r in log_rows(out) if "loss" in r}
    assert rows[2]["skipped_steps"] == 1 and rows[2]["loss"] is None and math.isfinite(rows[3]["loss"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and all(torch.isfinite(p).all() for p in ckpt["model"].values())
    assert (out / "loss.png").exists()                         # written with each checkpoint


# --- sample quality: the Fréchet distance, the metric classifier, FID, npz export -----------

def test_frechet_distance_matches_the_closed_forms():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))            # commuting covariances Q diag Q^T:
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)        # FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    a[:2] = 0                                                    # and one of them singular (rank 4)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert TQ.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-6)   # sqrt of a rounding-size eigenvalue: ~1e-8
    # non-commuting 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (real, non-negative eigenvalues)
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    m = s1 @ s2
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert TQ.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-9)
    f = rng.standard_normal((50, 80))                            # identical sets, fewer samples than features: 0
    assert abs(TQ.frechet_distance(*TQ.gaussian_stats(f), *TQ.gaussian_stats(f))) < 1e-5     # tr S = 80: 1e-7 relative
    assert TQ.frechet_distance(*TQ.gaussian_stats(f), *TQ.gaussian_stats(f + 1)) == pytest.approx(80, rel=1e-6)


def test_inception_input_is_tensorflow_1_bilinear_of_the_pixels():
    img = torch.randint(0, 256, (2, 1, 5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = TQ.inception_input(img)
    assert x.shape == (2, 3, 299, 299) and torch.equal(x[:, 0], x[:, 2])      # grey repeated to RGB

    def tf1_bilinear(a, out):                                    # independent: source pixel j * in / out, clamped
        h, w = a.shape
        ys, xs = np.arange(out) * h / out, np.arange(out) * w / out
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
        bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
        return top * (1 - fy) + bottom * fy

    expected = (tf1_bilinear(img[1, 0].double().numpy(), 299) - 128) / 128
    assert np.allclose(x[1, 1].double().numpy(), expected, atol=1e-4)


@pytest.mark.slow
def test_metric_classifier_learns_is_cached_and_tells_real_from_noise(tmp_path, monkeypatch):
    monkeypatch.setattr(TQ, "CNN_STEPS", 60)
    data = metric_data()
    q = TQ.SampleQuality(data, "fab", tmp_path / "cache", torch.device("cpu"), 100)
    assert q.cnn_heldout_acc > 0.95
    real = q.real()
    swapped = q.score(data.val_x[:100], 1 - data.val_y[:100])   # right images, wrong labels
    noise = q.score(torch.randint(0, 256, (100, 1, 16, 16), dtype=torch.uint8), data.val_y[:100])
    assert real["cnn_acc"] > 0.95 and swapped["cnn_acc"] < 0.05 and real["metric_samples"] == 100
    assert real["fd_cnn"] == pytest.approx(swapped["fd_cnn"])   # the distance does not look at labels
    assert noise["fd_cnn"] > 10 * real["fd_cnn"]
    assert "fid" not in real
    cached = list((tmp_path / "cache").glob("metric-cnn-fab-16px-600-*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(TQ.torch.optim, "AdamW", None)          # a second time: read from the cache, no training
    again = TQ.SampleQuality(data, "fab", tmp_path / "cache", torch.device("cpu"), 100)
    assert again.real() == pytest.approx(real)
    cached[0].write_bytes(b"broken")
    with pytest.raises(UserError, match="cached metric classifier .*delete it"):
        TQ.SampleQuality(data, "fab", tmp_path / "cache", torch.device("cpu"), 100)


@pytest.mark.slow
def test_training_logs_fd_cnn_accuracy_and_fid_and_plots_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TQ, "CNN_STEPS", 20)
    monkeypatch.setattr(TQ, "FID_REFERENCE_MIN", 50)
    torch.manual_seed(0)
    net = tmp_path / "inception.pt"
    torch.jit.script(StandIn()).save(str(net))
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "4", "--eval-every", "2", "--out-dir", str(out),
            "--fid-samples", "12", "--fid-inception", str(net), "--cache-dir", str(tmp_path / "cache")]
    assert T.main(argv) == 0
    assert any(line.startswith("held-out real images: FD-cnn-12 ") for line in capsys.readouterr().out.splitlines())
    rows = [r for r in log_rows(out) if "fd_cnn" in r]
    assert [r["step"] for r in rows] == [2, 4]                  # each evaluation and the end
    for r in rows:
        assert r["metric_samples"] == 12 and 0 <= r["cnn_acc"] <= 1 and r["fd_cnn"] > 0 and r["fid"] > 0
    real = next(r for r in log_rows(out) if "real_fd_cnn" in r)
    assert {"real_fid", "real_cnn_acc"} <= set(real) and real["metric_samples"] == 12 and real["step"] == 2
    assert len(list((tmp_path / "cache").glob("fid-ref-synthetic-16px-50-*.pt"))) == 1
    from PIL import Image
    assert Image.open(out / "loss.png").size[0] == 1100        # the second panel: sample quality


@pytest.mark.slow
def test_sample_from_writes_the_adm_npz_format(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    npz = tmp_path / "samples" / "s"                            # no .npz suffix: the name stays as given
    assert T.main(["--sample-from", str(out / "ckpt.pt"), "--npz", str(npz), "--num-samples", "25", "--sample-steps", "2"]) == 0
    z = np.load(npz)
    assert sorted(z.files) == ["arr_0", "arr_1"]
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (25, 16, 16, 3)
    assert z["arr_1"].tolist() == [i % 10 for i in range(25)]   # class-balanced labels
    assert "(25, 16, 16, 3)" in capsys.readouterr().out.splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["s"]   # no temporary file left


# --- bad input ends with one clear line and exit code 2 ---------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """The run must end before it loads any data or builds any model."""
    monkeypatch.setattr(T, "load_data", never("load_data"))
    monkeypatch.setattr(T, "build_model", never("build_model"))


@pytest.mark.parametrize("argv, facts", [
    (["--model", "DyDiLiT-T/4", "--image-size", "18"], ["18", "patch size 4"]),
    (["--sampler", "ddim"], ["--sampler ddim", "flow"]),
    (["--dataset", "fashion-mnist", "--image-size", "64", "--model", "DyDiLiT-T/4"], ["--image-size 64", "32"]),
    (["--resume"], ["--resume", "ckpt.pt"]),
    (["--sample-from", "nothing.pt"], ["--sample-from", "nothing.pt"]),
    (["--fid-samples", "0", "--fid-inception", "x.pt"], ["--fid-inception", "--fid-samples"]),
    (["--fid-inception", "x.pt"], ["--fid-inception", "--fid-samples"]),   # the CPU default is 0
    (["--fid-samples", "4", "--fid-inception", "missing.pt"], ["--fid-inception missing.pt"]),
    (["--fid-samples", "4", "--fid-inception", "text.pt"], ["--fid-inception text.pt"]),
    (["--fid-samples", "4", "--fid-inception", "wrong.pt"], ["--fid-inception wrong.pt", "(2, 7)", "2048"]),
    (["--npz", "s.npz"], ["--npz", "--sample-from"]),
    (["--grid", "g.png"], ["--grid", "--sample-from"]),
    (["--out-dir", "a_file"], ["--out-dir", "a_file"]),
    (["--out-dir", "a_file/run"], ["--out-dir", "a_file/run"]),
    (["--sample-from", "nothing.pt", "--grid", "a_file/g.png"], ["--grid", "a_file/g.png"]),
    (["--sample-from", "nothing.pt", "--npz", "a_folder"], ["--npz", "a_folder"]),
    (["--probe", "copy", "--image-size", "20"], ["--probe copy", "patch size 4", "10"]),
])
def test_bad_input_ends_before_any_work_with_one_line(argv, facts, tmp_path, capsys, no_work):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "text.pt").write_text("not a network")
    if "wrong.pt" in argv:
        torch.jit.script(StandIn(out=7)).save(str(tmp_path / "wrong.pt"))
    assert T.main([*TINY, "--out-dir", str(tmp_path / "run"), *argv]) == 2
    one_line_error(capsys, *facts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU defaults run as they are on a GPU")
def test_the_gpu_defaults_on_a_cpu_stop_with_the_cpu_recipe(tmp_path, capsys, no_work):
    assert T.main(["--out-dir", str(tmp_path / "a")]) == 2
    one_line_error(capsys, "no GPU", CPU_RECIPE)
    assert T.main(["--out-dir", str(tmp_path / "a"), "--dataset", "synthetic", "--lr", "1e-4"]) == 2   # other flags: still the defaults' size
    one_line_error(capsys, "no GPU", CPU_RECIPE)


@pytest.mark.slow
def test_a_small_held_out_set_or_dataset_is_announced(tmp_path, monkeypatch, capsys):
    load = T.load_data

    def five_training_images(*a, **k):
        data = load(*a, **k)
        data.train_x, data.train_y, data.val_x, data.val_y = data.train_x[:5], data.train_y[:5], data.val_x[:9], data.val_y[:9]
        return data

    monkeypatch.setattr(T, "load_data", five_training_images)
    assert T.main([*TINY, "--steps", "1", "--val-size", "600", "--out-dir", str(tmp_path / "run")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert any("--val-size 600" in n and " 9 " in n for n in notes)
    assert any("--batch-size 8" in n and " 5 " in n for n in notes)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_a_data_dir_that_does_not_exist_is_one_line(dataset, tmp_path, capsys):
    argv = ["--dataset", dataset, "--image-size", "32", "--data-dir", "/nonexistent/dir"]
    assert T.main([*TINY, "--out-dir", str(tmp_path / "run"), *argv]) == 2
    one_line_error(capsys, "--data-dir", "/nonexistent/dir")


@pytest.mark.slow
def test_a_second_run_in_a_finished_runs_folder_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert T.main([*TINY, "--steps", "4", "--out-dir", str(out)]) == 2
    one_line_error(capsys, out, "ckpt.pt", "--resume")


@pytest.mark.slow
def test_resume_with_another_model_names_what_differs(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert T.main([*TINY, "--steps", "4", "--attn", "linear", "--out-dir", str(out), "--resume"]) == 2
    one_line_error(capsys, "attn='dydila'", "attn='linear'")


@pytest.mark.slow
def test_a_reading_trains_is_kept_in_the_checkpoint_and_resumes_only_as_itself(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--reading", "c", "--out-dir", str(out)]) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["spec"]["reading"] == "c" and any(".kernel_q_r." in name for name in ckpt["model"])  # [C]'s 4 kernels
    capsys.readouterr()
    assert T.main([*TINY, "--steps", "4", "--out-dir", str(out), "--resume"]) == 2
    one_line_error(capsys, "reading='c'", "reading='ours'")


def test_help_explains_every_flag_without_empty_defaults():
    text = " ".join(T.get_parser().format_help().split())      # unwrapped
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 0.0003)" in text and "noise (default: 0)" in text         # a zero default is still shown
