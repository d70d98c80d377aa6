"""visualize.py: the smoothness metrics on known answers, the figures of untrained modules and of
trained checkpoints, one-line errors."""

import math

import pytest
import torch

import training.data as TD
import visualize as V


def test_smoothness_metrics_known_answers():
    N = 100
    uniform = torch.full((3, N), 1.0 / N)
    one_hot = torch.zeros(3, N)
    one_hot[:, 7] = 1
    torch.testing.assert_close(V.row_entropy(uniform), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(V.row_entropy(one_hot), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(V.top_mass(uniform), torch.full((3,), 0.05, dtype=torch.float64))
    torch.testing.assert_close(V.top_mass(one_hot), torch.ones(3, dtype=torch.float64))
    half = torch.zeros(N)
    half[:2] = 0.5                                            # two keys: entropy log 2 / log N
    assert V.row_entropy(half[None]).item() == pytest.approx(math.log(2) / math.log(N))
    assert V.row_entropy(torch.zeros(1, N)).isnan().all()     # a row that attends to nothing
    s = V.summarise(torch.stack([uniform, one_hot])[None])   # (1, 2, 3, N)
    assert s["entropy_mean"] == pytest.approx(0.5) and s["zero_rows"] == 0 and s["rows"] == 6


def test_partner_mass_is_one_over_n_for_uniform_rows_and_one_for_retrieval():
    hw = (4, 6)
    N = hw[0] * hw[1]
    uniform = torch.full((2, 3, N, N), 1.0 / N)
    torch.testing.assert_close(V.partner_mass(uniform, hw), torch.full((2, 3, N), 1.0 / N, dtype=torch.float64))
    retrieval = torch.zeros(N, N)
    retrieval[torch.arange(N), V.partners(hw)] = 2.0            # all of each row on its partner (unnormalised)
    torch.testing.assert_close(V.partner_mass(retrieval, hw), torch.ones(N, dtype=torch.float64))
    assert V.partners(hw).tolist()[:7] == [12, 13, 14, 15, 16, 17, 18]   # (0, c) -> (2, c); (1, 0) -> (3, 0)
    assert torch.equal(V.partners(hw)[V.partners(hw)], torch.arange(N))  # partners pair up


@pytest.mark.slow
def test_visualize_default_mode_writes_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TD, "FASHION_DIRS", [])               # offline synthetic image, whatever is installed
    assert V.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    table = capsys.readouterr().out
    assert "softmax (DiT)" in table and "DyDiLA (DyDi-LiT)" in table and "synthetic image 0" in table


@pytest.mark.slow
def test_visualize_checkpoint_mode_writes_parts_and_routers(tiny_runs, tmp_path, capsys):
    runs = [tiny_runs[name] for name in ("linear", "dydila", "static")]
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", *runs, "--t", "0.3", "0.7"]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png", "dydila_parts_dydila.png",
                 "dydila_parts_static.png"):                    # DyDiLA's parts: one figure per run
        assert (tmp_path / "viz" / name).stat().st_size > 10_000, name
    from PIL import Image
    for name in ("router_maps.png", "dydila_parts_dydila.png"):  # wide figures stay readable in a README column
        assert Image.open(tmp_path / "viz" / name).size[0] <= 1300, name
    out = capsys.readouterr().out
    assert "dydila (dydila) t=0.7" in out and "layer 3" in out
    assert not [w for w in out.splitlines() if w.startswith("warning: dydila (static)") and "kernel" in w]  # a static kernel is no collapse
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", *runs, "--layer", "9"]) == 2
    assert "--layer 9 is out of range: " in capsys.readouterr().err


def test_visualize_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TD, "FASHION_DIRS", [])
    (tmp_path / "a_file").write_text("x")
    for argv, message in ((["--index", "999999"], "--index 999999 is out of range: the synthetic held-out set has images 0..499"),
                          (["--data-dir", "/nonexistent"], "--data-dir /nonexistent does not exist"),
                          (["--ckpt", "missing.pt"], "missing.pt: no such checkpoint file"),
                          (["--width", "30", "--heads", "4"], "--width 30 is not divisible by --heads 4"),
                          (["--t", "1.5"], "--t takes noise levels in [0, 1], got [1.5]"),
                          (["--out-dir", "a_file"], "--out-dir a_file is a file: give a folder")):
        assert V.main(["--out-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_visualize_copy_probe_runs_reports_partner_mass_per_layer(probe_runs, tmp_path, capsys):
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", probe_runs["linear"], probe_runs["dydila"], "--t", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "partner mass per layer, all heads and rows (uniform: 1/N = 0.062; exact retrieval: 1), and of each layer's best head:" in out
    per_layer = [line for line in out.splitlines() if line.startswith(("linear (linear) t=0.5 ", "dydila (dydila) t=0.5 "))
                 and "mean" in line]
    assert len(per_layer) == 2 and all(len(line.split("mean")[0].split()) == 3 + 6 for line in per_layer)   # a label, 6 layers
    assert all(len(line.split("best heads")[1].split()) == 6 for line in per_layer)
    assert (tmp_path / "viz" / "attention_maps.png").stat().st_size > 10_000
