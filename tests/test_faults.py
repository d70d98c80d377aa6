"""The faults users hit, each reproduced: two runs in one folder, a full disk, foreign and cut files,
runs that cannot be compared, sizes that cannot fit, a dying decoder, a GPU check started from
another folder or cut short by its deadline. Each ends with one line and loses nothing (or works)."""

import csv
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dydilit as D
import train_tiny as T
import training.data as TD
import training.evaluation as TE
import training.sample as TS
import visualize as V
from conftest import ROOT, TINY, library_checkpoint, log_rows, never, one_line_error, run_py
from tools import ablation, gpu_check
from training.checkpoint import build_model, load_run, resume_run, run_spec, save_checkpoint
from training.cli import UserError
from training.files import RunLock
from training.log import read_log


def no_space(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- one run per folder ----------------------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_ends_at_startup_naming_the_first_runs_pid(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "load_data", never("load_data"))
    with RunLock(tmp_path / "run"):                             # a run holds the folder (this process)
        assert T.main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "run")]) == 2
        one_line_error(capsys, tmp_path / "run", f"pid {os.getpid()}")
    assert not (tmp_path / "run").exists()                      # the lock left nothing behind


def test_resume_on_a_folder_in_use_names_the_lock_before_the_missing_checkpoint(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        assert T.main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "run"), "--resume"]) == 2
        assert "--resume" not in one_line_error(capsys, f"pid {os.getpid()}")


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text("pid 999999 on elsewhere, started 2026-01-01 00:00:00")   # no process holds it
    assert T.main([*TINY, "--steps", "1", "--val-size", "8", "--out-dir", str(out)]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: "))
    assert str(out / "run.lock") in note and "pid 999999" in note
    assert not (out / "run.lock").exists() and (out / "ckpt.pt").exists()


def test_sampling_from_a_run_in_progress_needs_no_lock(tmp_path):
    ckpt = library_checkpoint(tmp_path / "run" / "ckpt.pt")
    with RunLock(tmp_path / "run"):
        assert T.main(["--sample-from", ckpt, "--grid", str(tmp_path / "run" / "g.png"), "--sample-steps", "1"]) == 0
    assert (tmp_path / "run" / "g.png").stat().st_size > 0


@pytest.mark.slow
def test_two_processes_on_one_folder_the_second_ends_naming_the_first(tmp_path):
    args = [*TINY, "--steps", "100000", "--eval-every", "100000", "--sample-every", "100000", "--out-dir", "run"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *args], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "run" / "run.lock").exists():
            time.sleep(0.05)
        second = run_py("train_tiny.py", args, tmp_path)
        lines = second.stderr.splitlines()
        assert second.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert f"pid {first.pid}" in lines[0]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM             # stopped before or after its first step: either way
    assert not (tmp_path / "run" / "run.lock").exists()         # its lock went with it


# --- a full disk, a folder that cannot be written, a format that cannot be written -------------

@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save, saves = torch.save, []

    def save(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 2:                                     # the second checkpoint: the disk fills up half-way
            Path(path).write_bytes(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2612288 vs 2612176")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "4", "--eval-every", "2", "--out-dir", str(out)]) == 2
    one_line_error(capsys, out / "ckpt.pt", "RuntimeError")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2          # the previous checkpoint, whole
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "ckpt.pt", "classes.txt", "log.jsonl", "loss.png"]


def test_a_full_disk_under_a_grid_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    assert T.main(["--sample-from", ckpt, "--grid", str(tmp_path / "out" / "g.png"), "--sample-steps", "1"]) == 2
    one_line_error(capsys, tmp_path / "out" / "g.png", os.strerror(errno.ENOSPC))
    assert not list((tmp_path / "out").iterdir())                # no partial file, no temporary one


def test_a_full_disk_under_an_npz_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(np, "savez", no_space)
    assert T.main(["--sample-from", ckpt, "--npz", str(tmp_path / "out" / "s.npz"), "--num-samples", "4",
                   "--sample-steps", "1"]) == 2
    one_line_error(capsys, tmp_path / "out" / "s.npz", os.strerror(errno.ENOSPC))
    assert not list((tmp_path / "out").iterdir())


def test_a_grid_in_a_format_matplotlib_cannot_write_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(TS, "sample_grid", never("sampling"))
    assert T.main(["--sample-from", ckpt, "--grid", "g.xyz"]) == 2
    one_line_error(capsys, "--grid", "g.xyz", ".png")


def test_an_npz_larger_than_the_free_disk_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(TS, "generate", never("sampling"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000}))
    assert T.main(["--sample-from", ckpt, "--npz", "s.npz", "--num-samples", "1000"]) == 2
    one_line_error(capsys, "--npz", "s.npz", "0.7 MiB", "0.0 MiB")


@pytest.mark.parametrize("argv", [["--dataset", "subin", "--data-dir", "."], ["--fid-samples", "10"]])
def test_a_cache_dir_that_is_a_file_is_refused_before_loading(argv, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(T, "load_data", never("load_data"))      # the cache is written minutes in
    assert T.main([*TINY, *argv, "--cache-dir", "a_file", "--out-dir", "run"]) == 2
    one_line_error(capsys, "--cache-dir", "a_file")


# --- foreign, damaged and cut files ------------------------------------------------------------

def test_a_library_checkpoint_loads_with_its_spec(tmp_path):
    run = load_run(library_checkpoint(tmp_path / "plain.pt"))    # no args at all
    assert (run.args.model, run.args.attn, run.step) == ("DyDiLiT-T/4", "dydila", 7)
    assert isinstance(run.objective, D.FlowMatching) and run.model.hw == (4, 4)


def test_a_checkpoint_from_before_the_readings_loads_as_dydila_itself(tmp_path):
    path = library_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["spec"]["reading"]                                  # written before specs named a reading
    torch.save(ckpt, path)
    run = load_run(path)
    assert run.args.reading == "ours" and type(run.model.blocks[0].attn) is D.DyDiLA


def test_a_library_checkpoint_samples(tmp_path):
    plain = library_checkpoint(tmp_path / "plain.pt")
    assert T.main(["--sample-from", plain, "--grid", "g.png", "--sample-steps", "1"]) == 0
    assert Path("g.png").stat().st_size > 0


def test_a_library_checkpoint_without_its_dataset_is_not_visualised(tmp_path, capsys):
    plain = library_checkpoint(tmp_path / "plain.pt")
    assert V.main(["--ckpt", plain, "--out-dir", "viz"]) == 2
    one_line_error(capsys, "plain.pt", "'dataset'")


@pytest.mark.slow
def test_a_library_checkpoint_naming_its_dataset_is_visualised(tmp_path):
    named = library_checkpoint(tmp_path / "named.pt", args={"dataset": "synthetic"})
    assert V.main(["--ckpt", named, "--out-dir", "viz", "--t", "0.5"]) == 0
    assert Path("viz/explorer.html").stat().st_size > 0


@pytest.mark.parametrize("content, facts", [
    (lambda: {"x_embedder.weight": torch.zeros(3)}, ["bare state_dict"]),
    (lambda: {"model": {}, "ema": {}, "step": 1}, ["'spec'", "'classes'"]),
    (lambda: [1, 2, 3], ["list"]),
    (lambda: {"spec": {"model": "DiT-XL/2"}, "model": {}, "ema": {}, "classes": [], "step": 0}, ["spec", "keys"]),
    (b"\x89PNG\r\n\x1a\n not a checkpoint", ["cannot load checkpoint"]),   # another tool's file: an image
    (b"tokens,accuracy\n64,0.5\n", ["cannot load checkpoint"]),          # a CSV
    (b"", ["cannot load checkpoint"]),                                   # an empty file
])
def test_a_foreign_file_as_a_checkpoint_is_one_line_saying_what_a_checkpoint_holds(content, facts, tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content(), path)
    assert T.main(["--sample-from", str(path)]) == 2
    one_line_error(capsys, path, *facts, "save_checkpoint")


@pytest.mark.parametrize("entry", ["resume", "visualize", "ablation"])
def test_every_reader_of_checkpoints_says_what_a_checkpoint_holds(entry, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "ckpt.pt"
    path.write_bytes(b"tokens,accuracy\n64,0.5\n")                       # another tool's file: a CSV
    main, argv = {"resume": (T.main, [*TINY, "--out-dir", str(tmp_path / "run"), "--resume"]),
                  "visualize": (V.main, ["--ckpt", str(path)]),
                  "ablation": (ablation.main, ["--ckpt", str(path)])}[entry]
    assert main(argv) == 2
    one_line_error(capsys, path, "cannot load checkpoint", "save_checkpoint")


def test_a_cut_checkpoint_is_one_line(tmp_path, capsys):
    path = Path(library_checkpoint(tmp_path / "ckpt.pt"))
    path.write_bytes(path.read_bytes()[:5000])                  # a copy stopped half-way
    assert T.main(["--sample-from", str(path)]) == 2
    one_line_error(capsys, path, "cannot load checkpoint")


@pytest.mark.slow
def test_resume_drops_a_cut_last_log_line_and_ends_with_its_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--eval-every", "2", "--log-every", "1", "--out-dir", str(out)]) == 0
    with open(out / "log.jsonl", "a") as f:                     # killed while writing a line of step 3
        f.write('{"step": 3, "loss": 1.1, "lo')
    capsys.readouterr()
    assert T.main([*TINY, "--steps", "4", "--eval-every", "2", "--log-every", "1", "--out-dir", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert any(line.startswith(f"note: {out / 'log.jsonl'}") and "cut" in line for line in captured.out.splitlines())
    assert "warning" not in captured.err
    assert [r["step"] for r in log_rows(out) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log_rows(out) if "val_loss" in r] == [2, 4]                   # the final evaluation


def test_every_log_reader_skips_unreadable_lines_with_one_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n\n[1, 2]\n{"step": 3, "loss": 0.5, "val_loss": 0.6}\n')
    assert read_log(log) == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 0.5, "val_loss": 0.6}]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and str(log) in err and "line 2, 4" in err


def test_the_loss_plot_takes_str_paths(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 3, "loss": 0.5, "val_loss": 0.6}\n')
    TE.plot_losses(str(log), str(tmp_path / "loss.png"))        # str paths, as from a notebook
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("log", ["", "not a log\n"])
def test_an_ablation_of_a_run_with_an_empty_or_foreign_log_is_one_line(log, tmp_path, capsys):
    ckpt = library_checkpoint(tmp_path / "run" / "ckpt.pt", args={"dataset": "synthetic"})
    (tmp_path / "run" / "log.jsonl").write_text(log)
    assert ablation.main(["--ckpt", ckpt, "--out-dir", "abl"]) == 2
    one_line_error(capsys, tmp_path / "run" / "log.jsonl")


# --- runs that cannot be compared, or are given twice -------------------------------------------

def test_visualize_refuses_runs_on_other_token_grids_before_any_computation(tmp_path, capsys, monkeypatch):
    t4 = library_checkpoint(tmp_path / "t4.pt", "DyDiLiT-T/4", args={"dataset": "synthetic"})
    t2 = library_checkpoint(tmp_path / "t2.pt", "DyDiLiT-T/2", args={"dataset": "synthetic"})
    monkeypatch.setattr(V, "layer_inputs", never("the attention computation"))
    assert V.main(["--ckpt", t4, t2, "--out-dir", "viz"]) == 2
    one_line_error(capsys, t2, "8x8", t4, "4x4")


def test_ablation_refuses_runs_of_other_presets(tmp_path, capsys):
    t4 = library_checkpoint(tmp_path / "t4.pt", "DyDiLiT-T/4", args={"dataset": "synthetic"})
    t2 = library_checkpoint(tmp_path / "t2.pt", "DyDiLiT-T/2", args={"dataset": "synthetic"})
    assert ablation.main(["--ckpt", t4, t2, "--out-dir", "abl"]) == 2
    one_line_error(capsys, t2, t4, "model", "'DyDiLiT-T/2'", "'DyDiLiT-T/4'")


def test_ablation_refuses_runs_on_other_data(tmp_path, capsys):
    t4 = library_checkpoint(tmp_path / "t4.pt", "DyDiLiT-T/4", args={"dataset": "synthetic"})
    fashion = library_checkpoint(tmp_path / "f.pt", "DyDiLiT-T/4", args={"dataset": "fashion-mnist"})
    assert ablation.main(["--ckpt", t4, fashion, "--out-dir", "abl"]) == 2
    one_line_error(capsys, "dataset", "'fashion-mnist'", "'synthetic'")


@pytest.mark.parametrize("main", [V.main, ablation.main], ids=["visualize", "ablation"])
def test_the_same_run_given_twice_is_one_line(main, tmp_path, capsys):
    ckpt = library_checkpoint(tmp_path / "run" / "ckpt.pt", args={"dataset": "synthetic"})
    again = str(tmp_path / "run" / ".." / "run" / "ckpt.pt")    # the same file by another path
    assert main(["--ckpt", ckpt, again, "--out-dir", "out"]) == 2
    one_line_error(capsys, "--ckpt", again, "twice")


# --- training that goes wrong is said, not hidden ------------------------------------------------

@pytest.mark.slow
def test_a_diverged_run_says_so_and_does_not_call_its_weights_good(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "6", "--eval-every", "3", "--lr", "1e6", "--warmup", "1", "--out-dir", str(out)]) == 2
    line = one_line_error(capsys, "diverged", "step 3", out / "ckpt.pt", "--lr")
    assert "good" not in line


# --- sizes that cannot fit -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, facts", [
    (["--batch-size", "1000000000"], ["1,000,000,000 images", "16 x 16", "DyDiLiT-T/4", "--batch-size"]),
    (["--image-size", "4096"], ["4096 x 4096", "1,048,576 tokens", "--image-size"]),
])
def test_a_training_step_that_cannot_fit_ends_before_allocating(argv, facts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "load_data", never("load_data"))
    assert T.main([*TINY, "--out-dir", "run", *argv]) == 2
    one_line_error(capsys, *facts)


def test_synthetic_images_that_cannot_fit_end_before_allocating():
    with pytest.raises(UserError, match=r"drawing 5500 synthetic images at 16384 x 16384 needs at least [\d,.]+ GiB"):
        TD.make_synthetic(16384)


def test_npz_samples_that_cannot_fit_end_before_sampling(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(TS, "generate", never("sampling"))
    assert T.main(["--sample-from", ckpt, "--npz", "s.npz", "--num-samples", str(10**12)]) == 2
    one_line_error(capsys, "--num-samples", "1,000,000,000,000")


# --- Sub-IN: folder errors before the pool, no pool left waiting ---------------------------------

def image_folders(root, classes=("a", "b"), n=3):
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_an_empty_class_list_is_found_before_decoding(tmp_path, monkeypatch):
    image_folders(tmp_path / "train")
    (tmp_path / "classes.txt").write_text("\n  \n")
    monkeypatch.setattr(TD, "decode_all", never("the decoding pool"))
    with pytest.raises(UserError, match="--class-list .*classes.txt"):
        TD.load_subin(tmp_path / "train", 10, tmp_path / "classes.txt", 8, tmp_path / "cache")


def test_a_class_list_that_is_no_text_is_one_line(tmp_path, monkeypatch):
    image_folders(tmp_path / "train")
    (tmp_path / "classes.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    monkeypatch.setattr(TD, "decode_all", never("the decoding pool"))
    with pytest.raises(UserError, match="--class-list .*classes.png"):
        TD.load_subin(tmp_path / "train", 10, tmp_path / "classes.png", 8, tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raises", "dies"])
def test_a_failing_decode_never_leaves_the_pool_waiting(failure, tmp_path):
    """A decoder that raises counts its file unreadable; a worker that dies is one line. The test runs
    in a child process so that a pool left waiting shows as a timeout, not a hung suite."""
    image_folders(tmp_path / "train")
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import PIL.Image
import training.data as TD
def broken(*a, **k):
    {"raise RuntimeError('a decoder bug')" if failure == "raises" else "os._exit(3)"}
PIL.Image.open = broken
try:
    TD.load_subin(TD.Path({str(tmp_path / "train")!r}), 10, None, 8, TD.Path({str(tmp_path / "cache")!r}))
except TD.UserError as e:
    print("error:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("error: ") and ("no readable images" if failure == "raises" else "worker died") in last


# --- from a notebook: str or Path, amp=None -------------------------------------------------------

def tiny_model():
    torch.manual_seed(0)
    return D.DyDiLiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)


def test_validation_and_sampling_take_amp_none(tmp_path):
    data = TD.make_synthetic(8, num_classes=2, n_train=4, n_val=4)
    val, per_t = TE.validation_loss(tiny_model(), D.FlowMatching(), data.val_x, data.val_y, amp=None)
    assert val > 0 and len(per_t) == len(TE.VAL_TIMES)
    images, labels = TE.generate(tiny_model(), D.FlowMatching(), 3, 2, 3, 8, "cpu", 1.0, 1, "euler", amp=None)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 1, 0]


def test_a_sample_grid_takes_a_str_path(tmp_path):
    TE.sample_grid(tiny_model(), D.FlowMatching(), ["a", "b"], 3, 8, "cpu", str(tmp_path / "g.png"), 1.0, 1, "euler")
    assert (tmp_path / "g.png").stat().st_size > 0


def test_a_checkpoint_saved_and_resumed_from_str_paths_gives_the_same_weights(tmp_path):
    spec = run_spec("DyDiLiT-T/4", "linear", image_size=8, channels=3, num_classes=2)
    run = build_model(spec)
    save_checkpoint(str(tmp_path / "c.pt"), run, run, torch.optim.AdamW(run.parameters()), 3, spec, ["a", "b"])
    other = build_model(spec)
    assert resume_run(str(tmp_path / "c.pt"), other, build_model(spec), torch.optim.AdamW(other.parameters()),
                      expect=spec) == 3
    assert all(torch.equal(p, q) for p, q in zip(run.parameters(), other.parameters()))


def test_resume_refuses_another_model_naming_what_differs(tmp_path):
    spec = run_spec("DyDiLiT-T/4", "linear", image_size=8, channels=3, num_classes=2)
    run = build_model(spec)
    opt = torch.optim.AdamW(run.parameters())
    save_checkpoint(tmp_path / "c.pt", run, run, opt, 3, spec, ["a", "b"])
    with pytest.raises(UserError, match="attn='linear'.*attn='dydila'"):
        resume_run(tmp_path / "c.pt", run, run, opt, expect={**spec, "attn": "dydila"})


def test_a_spec_with_an_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attn='flash'"):
        run_spec("DyDiLiT-T/4", "flash", image_size=8, channels=3, num_classes=2)


def test_a_str_data_folder_reaches_the_reader(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UserError, match="data_batch_1"):
        TD.load_cifar10(str(tmp_path))


# --- the GPU check: right the first time, whatever the folder, whatever the deadline ---------------

def gpu_check_runs(out):
    return sorted(p for p in Path(out).iterdir() if p.is_dir())


@pytest.mark.slow
def test_gpu_check_twice_from_another_folder_with_a_relative_out_dir_reports_each_runs_own(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")                  # not the repository: the command line runs from its own folder
    for _ in range(2):
        assert gpu_check.main(["--smoke", "--backend", "eager", "--out-dir", "rel/out"]) == 0
    runs = gpu_check_runs(tmp_path / "elsewhere" / "rel" / "out")
    assert len(runs) == 2                                       # a fresh folder each
    for run in runs:
        md = (run / "gpu_check.md").read_text()
        assert "exit 0, checkpoint written" in md and str(run / "cli_run.log") in md and "every part measured" in md
        for section in ("1. Training step, eager", "2. Training step, compiled", "4. Sampling, compiled"):
            assert all(f"| {v.name} | " in md.split(section)[1] for v in gpu_check.VARIANTS), section
        assert "| 64 | " in md and "| 256 | " in md and "python tools/gpu_check.py --smoke" in md
        rows = list(csv.DictReader(open(run / "gpu_check.csv")))
        assert {r["section"] for r in rows} == {"training step, eager", "training step, compiled", "sampling", "attention",
                                                "command line"}
        assert all(math.isfinite(float(r["value"])) and float(r["value"]) >= 0 for r in rows if r["metric"] != "peak_gib")
        assert (run / "cli_run" / "ckpt.pt").exists()           # this run's own command line, where the table says
        speed = next(float(r["value"]) for r in rows if (r["section"], r["metric"]) == ("command line", "img_per_s"))
        log = [json.loads(line) for line in (run / "cli_run" / "log.jsonl").read_text().splitlines()]
        speeds = [r["img_per_s"] for r in log if "img_per_s" in r]
        assert speed == pytest.approx(float(np.median(speeds[1:])))


@pytest.mark.slow
def test_gpu_check_writes_a_failing_model_goes_on_and_cut_by_its_deadline_leaves_what_it_measured(tmp_path,
                                                                                                 monkeypatch):
    broken = gpu_check.Variant("Broken", "dydila", {"num_kernels": 0})
    monkeypatch.setattr(gpu_check, "VARIANTS", (*gpu_check.VARIANTS, broken))

    def stuck(self):                                            # a compile that never finishes
        time.sleep(60)
    monkeypatch.setattr(gpu_check.GpuCheck, "attention", stuck)
    # a command line longer than the deadline
    monkeypatch.setattr(gpu_check, "SMOKE", dataclasses.replace(gpu_check.SMOKE, cli_reserve_s=3, cli_steps=100000))
    t0 = time.perf_counter()
    assert gpu_check.main(["--smoke", "--backend", "eager", "--out-dir", "out", "--budget-s", "9"]) == 1
    assert time.perf_counter() - t0 < 40
    run = gpu_check_runs("out")[0]
    md = (run / "gpu_check.md").read_text()
    assert md.count("| Broken | failed: ValueError: num_kernels") == 3     # eager; compiled: its compile and step lines
    for v in gpu_check.VARIANTS[:3]:                                        # the others went on, sections 1 and 2 whole
        assert md.split("2. Training step, compiled")[1].count(f"| {v.name} | ") == 2, v.name
    assert "Stopped by the deadline in section 3" in md and "not measured: 4. Sampling, compiled" in md
    assert "stopped at the deadline" in md
    assert "4 part(s) failed" in md                                         # Broken twice, the deadline twice
    rows = list(csv.DictReader(open(run / "gpu_check.csv")))
    assert {r["section"] for r in rows} == {"training step, eager", "training step, compiled", "command line"}
    assert [r["value"].split(":")[0] for r in rows if r["row"] == "Broken"] == ["ValueError"] * 2


def test_gpu_check_refuses_an_unknown_backend_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--backend", "inductr", "--out-dir", "out"]) == 2
    one_line_error(capsys, "--backend", "inductr")
    assert not Path("out").exists()
