"""tools/: the ablation table (rows of runs, seeds together, scores per seed) and the timing harness."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import training.quality as TQ
from conftest import one_line_error
from tools import ablation, bench, gpu_check
from training.attention import ATTENTIONS
from training.timing import paired_ratio


@pytest.mark.slow
def test_ablation_groups_runs_into_rows_and_seeds_and_scores_each(tiny_runs, tmp_path, capsys, monkeypatch):
    # a second seed that ran longer: every row is compared at the last validation step all runs reached
    runs = [tiny_runs[name] for name in ("linear", "dydila", "static", "dydila_s1")]
    assert ablation.main(["--out-dir", str(tmp_path / "abl"), "--ckpt", *runs, "--t", "0.5"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("note: ") and "step 2" in line for line in out.splitlines())
    table = [line for line in out.splitlines() if line.startswith("| ")]
    labels = [line.split(" | ")[0][2:] for line in table[2:]]
    assert labels == ["LiT (linear)", "DyDi-LiT", "DyDi-LiT, no dynamic kernel"]
    vals = table[3].split(" | ")[1].split(" / ")                # DyDi-LiT: two seeds' validation losses
    log = tiny_runs["dydila_s1"].replace("ckpt.pt", "log.jsonl")
    s1_val = next(json.loads(r)["val_loss"] for r in open(log).read().splitlines() if '"val_loss"' in r)
    assert len(vals) == 2 and float(vals[1]) == pytest.approx(s1_val, abs=1e-4)   # seed 1's loss at step 2, not 4
    for name in ("ablation.png", "ablation_samples.png"):
        assert (tmp_path / "abl" / name).stat().st_size > 10_000, name
    monkeypatch.setattr(TQ, "CNN_STEPS", 10)                   # with sample quality: per seed, mean ± std
    assert ablation.main(["--out-dir", str(tmp_path / "abl"), "--ckpt", *runs[1:], "--fid-samples", "8", "--sample-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out real images: FD-cnn-8 " in out and "DyDi-LiT, seed 1: FD-cnn-8 " in out   # the count in the name
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    assert table[0][3:5] == ["FD-cnn-8 (per seed)", "mean ± std"] and table[0][5] == "accuracy % (per seed)"
    dydi = next(r for r in table if r[0] == "| DyDi-LiT")
    fd = [float(v) for v in dydi[3].split(" / ")]
    assert len(fd) == 2 and dydi[4] == f"{np.mean(fd):.2f} ± {np.std(fd, ddof=1):.2f}"
    run = tmp_path / "run"                                      # each run's log is needed
    shutil.copytree(Path(runs[0]).parent, run)
    (run / "log.jsonl").unlink()
    assert ablation.main(["--out-dir", str(tmp_path / "abl"), "--ckpt", str(run / "ckpt.pt")]) == 2
    one_line_error(capsys, run / "log.jsonl")


@pytest.mark.slow
def test_ablation_of_copy_probe_runs_adds_copy_error_and_partner_mass(probe_runs, tiny_runs, tmp_path, capsys):
    runs = [probe_runs["linear"], probe_runs["dydila"]]
    assert ablation.main(["--out-dir", str(tmp_path), "--ckpt", *runs, "--t", "0.5"]) == 0
    out = capsys.readouterr().out
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    assert table[0][3:7] == ["copy error (per seed)", "mean ± std", "partner mass, mean of layers (per seed)", "mean ± std"]
    log = runs[1].replace("ckpt.pt", "log.jsonl")
    copy = [json.loads(r)["copy_error"] for r in open(log).read().splitlines() if '"copy_error"' in r][-1]
    dydi = next(r for r in table if r[0] == "| DyDi-LiT")
    assert float(dydi[3]) == pytest.approx(copy, abs=1e-3) and 0 < float(dydi[5]) < 1
    assert any(line.startswith("partner mass per layer") and "0.062" in line for line in out.splitlines())
    assert ablation.main(["--out-dir", str(tmp_path), "--ckpt", runs[0], tiny_runs["linear"]]) == 2
    one_line_error(capsys, "probe", "None", "'copy'")


@pytest.mark.slow
def test_bench_writes_csv_and_plot(tmp_path):
    assert bench.main(["--out-dir", str(tmp_path), "--max-tokens", "1024", "--repeats", "1", "--width", "32", "--heads", "2"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [int(r["tokens"]) for r in rows] == [256, 1024]
    assert all(float(r[f"{k}_ms"]) > 0 and float(r[f"{k}_mem_mib"]) > 0 for r in rows for k in ATTENTIONS)
    assert all(0 < float(r["dydila_over_linear"]) < math.inf for r in rows)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_the_paired_ratio_is_the_median_of_per_round_ratios():
    assert paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0        # ratios 2, 3, 1; the medians' ratio is 4 / 3


@pytest.mark.parametrize("argv, facts", [
    (["--max-tokens", "100"], ["--max-tokens", "100", "256"]),
    (["--width", "30", "--heads", "4"], ["--width 30", "--heads 4"]),
])
def test_bench_bad_input_is_one_line(argv, facts, tmp_path, capsys):
    assert bench.main(["--out-dir", str(tmp_path), *argv]) == 2
    one_line_error(capsys, *facts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_bench_cuda_graphs_without_a_gpu_is_one_line(tmp_path, capsys):
    assert bench.main(["--out-dir", str(tmp_path), "--cuda-graphs"]) == 2
    one_line_error(capsys, "--cuda-graphs", "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    one_line_error(capsys, "no CUDA GPU", "--smoke")
