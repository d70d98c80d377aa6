"""The faults users hit, each reproduced: two runs in one folder, a full disk, foreign and cut files,
runs that cannot be compared, sizes that cannot fit, a dying decoder, a GPU check started from
another folder or cut short by its deadline. Each ends with one line and loses nothing (or works)."""

import csv
import errno
import json
import math
import os
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
import training.run as TR
import visualize as V
from conftest import ROOT, TINY, log_rows, run_py
from tools import ablation, gpu_check


def one_line_error(capsys, message):
    """The command ended with one 'error:' line (after any progress bar) holding message; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: ") and message in lines[-1], err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    return lines[-1]


def never(what):
    def called(*a, **k):
        raise AssertionError(f"{what} was called")
    return called


def library_checkpoint(path, preset="DyDiLiT-T/4", attn="dydila", args=None, image_size=16):
    """A checkpoint written by training.run.save_checkpoint from a notebook: no train_tiny.py run behind it."""
    spec = TR.run_spec(preset, attn, image_size=image_size, channels=3, num_classes=10)
    torch.manual_seed(0)
    model = TE.build_model(spec)
    TR.save_checkpoint(path, model, model, torch.optim.SGD(model.parameters(), lr=0.1), 7, spec,
                       [f"class {c}" for c in range(10)], args)
    return str(path)


def no_space(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- one run per folder ----------------------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_ends_at_startup_naming_the_first_runs_pid(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "load_data", never("load_data"))
    with TR.RunLock(tmp_path / "run"):                          # a run holds the folder (this process)
        assert T.main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "run")]) == 2
        one_line_error(capsys, f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()} on ")
        assert T.main([*TINY, "--steps", "2", "--out-dir", str(tmp_path / "run"), "--resume"]) == 2
        one_line_error(capsys, "is in use by another run (pid")   # before "no checkpoint to resume"
    assert not (tmp_path / "run").exists()                      # the lock left nothing behind


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text("pid 999999 on elsewhere, started 2026-01-01 00:00:00")   # no process holds it
    assert T.main([*TINY, "--steps", "1", "--val-size", "8", "--out-dir", str(out)]) == 0
    assert f"note: {out / 'run.lock'} was left by a run that has ended (pid 999999 on elsewhere" in capsys.readouterr().out
    assert not (out / "run.lock").exists() and (out / "ckpt.pt").exists()


def test_sampling_from_a_run_in_progress_needs_no_lock(tmp_path, capsys):
    ckpt = library_checkpoint(tmp_path / "run" / "ckpt.pt")
    with TR.RunLock(tmp_path / "run"):
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
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: run is in use by another run (pid {first.pid} on ")
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

    monkeypatch.setattr(TR.torch, "save", save)
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "4", "--eval-every", "2", "--out-dir", str(out)]) == 2
    one_line_error(capsys, f"cannot write {out / 'ckpt.pt'} (RuntimeError: [enforce fail at inline_container.cc:672]")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2          # the previous checkpoint, whole
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "ckpt.pt", "classes.txt", "log.jsonl", "loss.png"]


def test_a_full_disk_under_a_grid_or_npz_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    assert T.main(["--sample-from", ckpt, "--grid", str(tmp_path / "out" / "g.png"), "--sample-steps", "1"]) == 2
    one_line_error(capsys, f"cannot write {tmp_path / 'out' / 'g.png'} (No space left on device; ")
    monkeypatch.setattr(np, "savez", no_space)
    assert T.main(["--sample-from", ckpt, "--npz", str(tmp_path / "out" / "s.npz"), "--num-samples", "4",
                   "--sample-steps", "1"]) == 2
    one_line_error(capsys, f"cannot write {tmp_path / 'out' / 's.npz'} (No space left on device; ")
    assert not list((tmp_path / "out").iterdir())                # no partial file, no temporary one


def test_writes_that_would_fail_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(T, "generate", never("sampling"))
    monkeypatch.setattr(TE, "generate", never("sampling"))
    monkeypatch.setattr(T, "sample_grid", never("sampling"))
    assert T.main(["--sample-from", ckpt, "--grid", "g.xyz"]) == 2
    one_line_error(capsys, "--grid g.xyz: .xyz is no image format matplotlib writes; end it in .png")
    monkeypatch.setattr(T.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000}))
    assert T.main(["--sample-from", ckpt, "--npz", "s.npz", "--num-samples", "1000"]) == 2
    one_line_error(capsys, "--npz s.npz would take 0.7 MiB and its disk has 0.0 MiB free")
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(T, "load_data", never("load_data"))
    for argv in (["--dataset", "subin", "--data-dir", "."], ["--fid-samples", "10"]):   # the cache is written minutes in
        assert T.main([*TINY, *argv, "--cache-dir", "a_file", "--out-dir", "run"]) == 2
        one_line_error(capsys, "--cache-dir a_file is a file: give a folder")


# --- foreign, damaged and cut files ------------------------------------------------------------

def test_a_library_checkpoint_samples_visualizes_and_resumes(tmp_path, capsys, monkeypatch):
    plain = library_checkpoint(tmp_path / "plain.pt")            # no args at all
    model, objective, run, ckpt = TE.load_run(plain)
    assert run.model == "DyDiLiT-T/4" and run.attn == "dydila" and isinstance(objective, D.FlowMatching) and ckpt["step"] == 7
    assert T.main(["--sample-from", plain, "--grid", "g.png", "--sample-steps", "1"]) == 0
    assert V.main(["--ckpt", plain, "--out-dir", "viz"]) == 2
    one_line_error(capsys, "plain.pt does not name the data it was trained on (no 'dataset' among its args)")
    named = library_checkpoint(tmp_path / "named.pt", args={"dataset": "synthetic"})
    monkeypatch.setattr(V, "attention_maps_figure", lambda *a, **k: None)      # the figures are tested elsewhere
    monkeypatch.setattr(V, "smoothness_figure", lambda *a, **k: None)
    monkeypatch.setattr(V, "router_figure", lambda *a, **k: None)
    assert V.main(["--ckpt", named, "--out-dir", "viz", "--t", "0.5"]) == 0


def test_a_train_tiny_checkpoint_without_a_spec_still_loads(tmp_path):
    """Checkpoints written before the spec kept what builds the model among their args."""
    path = library_checkpoint(tmp_path / "ckpt.pt", args={"dataset": "synthetic"})
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"].update(ckpt.pop("spec"))
    torch.save(ckpt, path)
    model, _, run, _ = TE.load_run(path)
    assert run.model == "DyDiLiT-T/4" and run.dataset == "synthetic" and model.hw == (4, 4)


@pytest.mark.parametrize("content, message", [
    (lambda: {"x_embedder.weight": torch.zeros(3)}, "is not a dydilit checkpoint: it holds a bare state_dict"),
    (lambda: {"model": {}, "ema": {}, "step": 1}, "is not a dydilit checkpoint: it has no 'spec', 'classes'"),
    (lambda: [1, 2, 3], "is not a dydilit checkpoint: it holds a list"),
    (lambda: {"spec": {"model": "DiT-XL/2"}, "model": {}, "ema": {}, "classes": [], "step": 0},
     "is not a dydilit checkpoint: its spec must have exactly the keys model, attn"),
    (b"\x89PNG\r\n\x1a\n not a checkpoint", "cannot load checkpoint"),
])
def test_a_foreign_file_as_a_checkpoint_is_one_line_saying_what_a_checkpoint_holds(content, message, tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content(), path)
    (tmp_path / "run").mkdir()
    os.replace(path, tmp_path / "run" / "ckpt.pt")
    path = str(tmp_path / "run" / "ckpt.pt")
    for main, argv in ((T.main, ["--sample-from", path]), (T.main, [*TINY, "--out-dir", str(tmp_path / "run"), "--resume"]),
                       (V.main, ["--ckpt", path]), (ablation.main, ["--ckpt", path])):
        assert main(argv) == 2
        assert one_line_error(capsys, message).endswith("as training.run.save_checkpoint writes it")


@pytest.mark.slow
def test_resume_drops_a_cut_last_log_line_and_ends_with_its_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--eval-every", "2", "--log-every", "1", "--out-dir", str(out)]) == 0
    with open(out / "log.jsonl", "a") as f:                     # killed while writing a line of step 3
        f.write('{"step": 3, "loss": 1.1, "lo')
    capsys.readouterr()
    assert T.main([*TINY, "--steps", "4", "--eval-every", "2", "--log-every", "1", "--out-dir", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"note: {out / 'log.jsonl'}: dropped its cut last line (the run was stopped while writing it)" in captured.out
    assert "warning" not in captured.err
    assert [r["step"] for r in log_rows(out) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log_rows(out) if "val_loss" in r] == [2, 4]                   # the final evaluation


def test_every_log_reader_skips_unreadable_lines_with_one_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n\n[1, 2]\n{"step": 3, "loss": 0.5, "val_loss": 0.6}\n')
    assert TR.read_log(log) == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 0.5, "val_loss": 0.6}]
    assert capsys.readouterr().err == f"warning: {log}: skipped 2 unreadable lines (line 2, 4)\n"
    TE.plot_losses(str(log), str(tmp_path / "loss.png"))        # str paths, as from a notebook
    assert (tmp_path / "loss.png").stat().st_size > 0


# --- runs that cannot be compared --------------------------------------------------------------

def test_runs_of_other_presets_or_data_are_refused_before_any_computation(tmp_path, capsys, monkeypatch):
    t4 = library_checkpoint(tmp_path / "t4.pt", "DyDiLiT-T/4", args={"dataset": "synthetic"})
    t2 = library_checkpoint(tmp_path / "t2.pt", "DyDiLiT-T/2", args={"dataset": "synthetic"})
    monkeypatch.setattr(V, "layer_inputs", never("the attention computation"))
    assert V.main(["--ckpt", t4, t2, "--out-dir", "viz"]) == 2
    one_line_error(capsys, "t2.pt sees a 8x8 token grid (DyDiLiT-T/2), " + t4 + " a 4x4 grid (DyDiLiT-T/4): "
                           "attention rows compare on one grid")
    assert ablation.main(["--ckpt", t4, t2, "--out-dir", "abl"]) == 2
    one_line_error(capsys, "t2.pt and " + t4 + " differ in model ('DyDiLiT-T/2' and 'DyDiLiT-T/4'): one table compares "
                           "runs that differ only in attention and seed")
    fashion = library_checkpoint(tmp_path / "f.pt", "DyDiLiT-T/4", args={"dataset": "fashion-mnist"})
    assert ablation.main(["--ckpt", t4, fashion, "--out-dir", "abl"]) == 2
    one_line_error(capsys, "differ in dataset ('fashion-mnist' and 'synthetic')")


# --- training that goes wrong is said, not hidden ------------------------------------------------

@pytest.mark.slow
def test_a_diverged_run_says_so_and_does_not_call_its_weights_good(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "6", "--eval-every", "3", "--lr", "1e6", "--warmup", "1", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: the run diverged: validation loss " in err and "at step 3, against 1.1" in err
    assert f"{out / 'ckpt.pt'} holds these diverged weights" in err and "good" not in err


# --- sizes that cannot fit, seeds outside the generator's range ---------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1000000000"], "a training step of 1,000,000,000 images of 16 x 16 (16 tokens) on DyDiLiT-T/4 needs at least"),
    (["--image-size", "4096"], "a training step of 8 images of 4096 x 4096 (1,048,576 tokens) on DyDiLiT-T/4 needs at least"),
    (["--seed", str(2**70)], "--seed must lie in [0, 2**32), got 1180591620717411303424"),
    (["--seed", "-1"], "--seed must lie in [0, 2**32)"),
])
def test_sizes_that_cannot_fit_end_before_allocating(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "load_data", never("load_data"))
    assert T.main([*TINY, "--out-dir", "run", *argv]) == 2
    one_line_error(capsys, message)


def test_synthetic_images_and_samples_that_cannot_fit_end_before_allocating(tmp_path, capsys, monkeypatch):
    with pytest.raises(TR.UserError, match=r"drawing 5500 synthetic images at 16384 x 16384 needs at least [\d,.]+ GiB"):
        TD.make_synthetic(16384)
    ckpt = library_checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setattr(T, "generate", never("sampling"))
    assert T.main(["--sample-from", ckpt, "--npz", "s.npz", "--num-samples", str(10**12)]) == 2
    one_line_error(capsys, "--num-samples 1,000,000,000,000 at 16 x 16 needs at least")


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
    with pytest.raises(TR.UserError, match="--class-list .*classes.txt names no classes: write one class folder name per line"):
        TD.load_subin(tmp_path / "train", 10, tmp_path / "classes.txt", 8, tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raises", "dies"])
def test_a_failing_decode_never_leaves_the_pool_waiting(failure, tmp_path, monkeypatch):
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
    expected = ("no readable images in the 2 class folders" if failure == "raises" else
                "a decoding worker died while decoding 6 images (killed, or out of memory)")
    assert proc.stdout.splitlines()[-1].startswith("error: ") and expected in proc.stdout, proc.stdout


# --- from a notebook: str or Path, amp=None -------------------------------------------------------

def test_notebook_helpers_take_str_paths_and_amp_none(tmp_path):
    torch.manual_seed(0)
    model = D.DyDiLiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    data = TD.make_synthetic(8, num_classes=2, n_train=4, n_val=4)
    val, per_t = TE.validation_loss(model, D.FlowMatching(), data.val_x, data.val_y, amp=None)
    assert val > 0 and len(per_t) == len(TE.VAL_TIMES)
    images, labels = TE.generate(model, D.FlowMatching(), 3, 2, 3, 8, "cpu", 1.0, 1, "euler", amp=None)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 1, 0]
    TE.sample_grid(model, D.FlowMatching(), ["a", "b"], 3, 8, "cpu", str(tmp_path / "g.png"), 1.0, 1, "euler", amp=None)
    assert (tmp_path / "g.png").stat().st_size > 0
    spec = TR.run_spec("DyDiLiT-T/4", "linear", image_size=8, channels=3, num_classes=2)
    run = TE.build_model(spec)
    opt = torch.optim.AdamW(run.parameters())
    TR.save_checkpoint(str(tmp_path / "c.pt"), run, run, opt, 3, spec, ["a", "b"])
    other = TE.build_model(spec)
    assert TR.resume_run(str(tmp_path / "c.pt"), other, TE.build_model(spec), torch.optim.AdamW(other.parameters()),
                         expect=spec) == 3
    assert all(torch.equal(p, q) for p, q in zip(run.parameters(), other.parameters()))
    with pytest.raises(TR.UserError, match="is from another model: it has attn='linear' but this run asks for attn='dydila'"):
        TR.resume_run(tmp_path / "c.pt", other, other, opt, expect={**spec, "attn": "dydila"})
    with pytest.raises(ValueError, match="its spec has attn='flash'"):
        TR.run_spec("DyDiLiT-T/4", "flash", image_size=8, channels=3, num_classes=2)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(TR.UserError, match="cannot read .*data_batch_1"):
        TD.load_cifar10(str(tmp_path))                          # a str folder reaches the reader


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
            assert all(f"| {row} | " in md.split(section)[1] for row in ("DiT", "LiT", "DyDi-LiT")), section
        assert "| 64 | " in md and "| 256 | " in md and "python tools/gpu_check.py --smoke" in md
        rows = list(csv.DictReader(open(run / "gpu_check.csv")))
        assert {r["section"] for r in rows} == {"training step, eager", "training step, compiled", "sampling", "attention",
                                                "command line"}
        assert all(math.isfinite(float(r["value"])) and float(r["value"]) >= 0 for r in rows if r["metric"] != "peak_gib")
        assert (run / "cli_run" / "ckpt.pt").exists()           # this run's own command line, where the table says
        speed = next(float(r["value"]) for r in csv.DictReader(open(run / "gpu_check.csv"))
                     if (r["section"], r["metric"]) == ("command line", "img_per_s"))
        log = [json.loads(line) for line in (run / "cli_run" / "log.jsonl").read_text().splitlines()]
        speeds = [r["img_per_s"] for r in log if "img_per_s" in r]
        assert speed == pytest.approx(float(np.median(speeds[1:])))


@pytest.mark.slow
def test_gpu_check_writes_a_failing_row_goes_on_and_cut_by_its_deadline_leaves_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.ROWS, "Broken", dict(attn="dydila", attn_kwargs={"num_kernels": 0}))

    def stuck(self):                                            # a compile that never finishes
        time.sleep(60)
    monkeypatch.setattr(gpu_check.GpuCheck, "attention", stuck)
    monkeypatch.setitem(gpu_check.SMOKE, "cli_reserve_s", 3)
    monkeypatch.setitem(gpu_check.SMOKE, "cli_steps", 100000)  # a command line longer than the deadline
    t0 = time.perf_counter()
    assert gpu_check.main(["--smoke", "--backend", "eager", "--out-dir", "out", "--budget-s", "9"]) == 1
    assert time.perf_counter() - t0 < 40
    run = gpu_check_runs("out")[0]
    md = (run / "gpu_check.md").read_text()
    assert md.count("| Broken | failed: ValueError: num_kernels") == 3     # eager; compiled: its compile and step rows
    for row in ("DiT", "LiT", "DyDi-LiT"):                                   # the others went on, sections 1 and 2 whole
        assert md.split("2. Training step, compiled")[1].count(f"| {row} | ") == 2, row
    assert "Stopped by the deadline in section 3" in md and "not measured: 4. Sampling, compiled" in md
    assert "stopped at the deadline; its last line:" in md and "checkpoint" in md
    assert "in all; 4 part(s) failed or were cut" in md                       # Broken twice, the deadline twice
    rows = list(csv.DictReader(open(run / "gpu_check.csv")))
    assert {r["section"] for r in rows} == {"training step, eager", "training step, compiled", "command line"}
    assert [r["value"] for r in rows if r["row"] == "Broken"] == ["ValueError: num_kernels = 0 must be a whole number >= 1"] * 2


def test_gpu_check_refuses_an_unknown_backend_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--backend", "inductr", "--out-dir", "out"]) == 2
    one_line_error(capsys, "--backend inductr is not a torch.compile backend: choose one of ")
    assert not Path("out").exists()
