"""visualize.py: the smoothness metrics on known answers, the figures of untrained modules and of
trained checkpoints, the explorer page (its data against the explicit attention matrices, and what a
real browser shows), one-line errors."""

import base64
import json
import math
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch

import dydilit as D
import training.data as TD
import visualize as V
from conftest import one_line_error
from training.attention import ATTENTIONS, LABELS, partner_mass, partners, row_entropy, summarise, top_mass
from training.explorer import explorer_model, explorer_page, layer_maps

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


def test_smoothness_metrics_known_answers():
    N = 100
    uniform = torch.full((3, N), 1.0 / N)
    one_hot = torch.zeros(3, N)
    one_hot[:, 7] = 1
    torch.testing.assert_close(row_entropy(uniform), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(row_entropy(one_hot), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(top_mass(uniform), torch.full((3,), 0.05, dtype=torch.float64))
    torch.testing.assert_close(top_mass(one_hot), torch.ones(3, dtype=torch.float64))
    half = torch.zeros(N)
    half[:2] = 0.5                                            # two keys: entropy log 2 / log N
    assert row_entropy(half[None]).item() == pytest.approx(math.log(2) / math.log(N))
    assert row_entropy(torch.zeros(1, N)).isnan().all()       # a row that attends to nothing
    s = summarise(torch.stack([uniform, one_hot])[None])     # (1, 2, 3, N)
    assert s["entropy_mean"] == pytest.approx(0.5) and s["zero_rows"] == 0 and s["rows"] == 6


def test_partner_mass_is_one_over_n_for_uniform_rows_and_one_for_retrieval():
    hw = (4, 6)
    N = hw[0] * hw[1]
    uniform = torch.full((2, 3, N, N), 1.0 / N)
    torch.testing.assert_close(partner_mass(uniform, partners(hw)), torch.full((2, 3, N), 1.0 / N, dtype=torch.float64))
    retrieval = torch.zeros(N, N)
    retrieval[torch.arange(N), partners(hw)] = 2.0              # all of each row on its partner (unnormalised)
    torch.testing.assert_close(partner_mass(retrieval, partners(hw)), torch.ones(N, dtype=torch.float64))
    retrieval[5] = 0                                            # a row that attends to nothing retrieves nothing
    assert partner_mass(retrieval, partners(hw))[5].item() == 0


def test_partners_lie_half_the_grid_away_and_pair_up():
    hw = (4, 6)
    assert partners(hw).tolist()[:7] == [12, 13, 14, 15, 16, 17, 18]     # (0, c) -> (2, c); (1, 0) -> (3, 0)
    assert torch.equal(partners(hw)[partners(hw)], torch.arange(24))


@pytest.mark.slow
def test_visualize_default_mode_writes_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TD, "FASHION_DIRS", [])               # offline synthetic image, whatever is installed
    assert V.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert 100_000 < (tmp_path / "explorer.html").stat().st_size < 3_000_000   # 256 tokens, three modules, offline
    table = capsys.readouterr().out
    assert all(LABELS[kind] in table for kind in ATTENTIONS) and "synthetic image 0" in table


@pytest.mark.slow
def test_visualize_checkpoint_mode_writes_parts_and_routers(tiny_runs, tmp_path, capsys):
    runs = [tiny_runs[name] for name in ("linear", "dydila", "static")]
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", *runs, "--t", "0.3", "0.7"]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png", "dydila_parts_dydila.png",
                 "dydila_parts_static.png"):                    # DyDiLA's parts: one figure per run
        assert (tmp_path / "viz" / name).stat().st_size > 10_000, name
    data = page_data(tmp_path / "viz" / "explorer.html")      # every layer and t of the three runs, in the figures' order
    assert [m["label"] for m in data["models"]] == ["linear (linear)", "dydila (dydila)", "dydila (static)"]
    assert data["ts"] == [0.3, 0.7] and data["layer"] == 3 and all(m["depth"] == 6 and m["heads"] == 3 for m in data["models"])
    assert (tmp_path / "viz" / "explorer.html").stat().st_size < 3_000_000
    from PIL import Image
    for name in ("router_maps.png", "dydila_parts_dydila.png"):  # wide figures stay readable in a README column
        assert Image.open(tmp_path / "viz" / name).size[0] <= 1300, name
    out = capsys.readouterr().out
    assert "dydila (dydila) t=0.7" in out and "layer 3" in out
    assert not [w for w in out.splitlines() if w.startswith("warning: dydila (static)") and "kernel" in w]  # a static kernel is no collapse


@pytest.mark.slow
def test_a_layer_the_checkpoints_do_not_have_is_one_line(tiny_runs, tmp_path, capsys):
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", tiny_runs["linear"], "--layer", "9"]) == 2
    one_line_error(capsys, "--layer 9", "0..5")


@pytest.mark.parametrize("argv, facts", [
    (["--index", "999999"], ["--index 999999", "0..499"]),
    (["--data-dir", "/nonexistent"], ["--data-dir /nonexistent"]),
    (["--data-dir", "a_file"], ["--data-dir a_file", "file"]),
    (["--ckpt", "missing.pt"], ["missing.pt"]),
    (["--width", "30", "--heads", "4"], ["--width 30", "--heads 4"]),
    (["--head", "3"], ["--head 3", "0..2"]),
    (["--out-dir", "a_file"], ["--out-dir a_file"]),
])
def test_visualize_bad_input_is_one_line(argv, facts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TD, "FASHION_DIRS", [])
    (tmp_path / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert V.main(["--out-dir", str(tmp_path / "viz"), *argv]) == 2
    one_line_error(capsys, *facts)


@pytest.mark.slow
def test_visualize_copy_probe_runs_reports_partner_mass_per_layer(probe_runs, tmp_path, capsys):
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", probe_runs["linear"], probe_runs["dydila"], "--t", "0.5"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("partner mass per layer") and "1/N = 0.062" in line for line in out.splitlines())
    per_layer = [line for line in out.splitlines() if line.startswith(("linear (linear) t=0.5 ", "dydila (dydila) t=0.5 "))
                 and "mean" in line]
    assert len(per_layer) == 2 and all(len(line.split("mean")[0].split()) == 3 + 6 for line in per_layer)   # a label, 6 layers
    assert all(len(line.split("best heads")[1].split()) == 6 for line in per_layer)
    assert (tmp_path / "viz" / "attention_maps.png").stat().st_size > 10_000


# --- the explorer page -------------------------------------------------------------------------

def small_page(path, probe=False):
    """The page of three untrained modules (width 32, 2 heads) on an 8 x 8 grid, two "layers" (the
    same modules on two inputs) and two t: (their maps {label: [[LayerMaps per layer] per t]}, hw)."""
    torch.manual_seed(0)
    hw, inputs = (8, 8), [torch.randn(1, 64, 32) for _ in range(4)]
    grids, models = {}, []
    with torch.no_grad():
        for kind in ATTENTIONS:
            torch.manual_seed(1)
            module = D.ATTENTIONS[kind](32, 2).eval()
            grids[LABELS[kind]] = [[layer_maps(module, inputs[2 * t + l], hw) for l in range(2)] for t in range(2)]
            models.append(explorer_model(LABELS[kind], grids[LABELS[kind]], hw, probe=probe))
    images = [torch.rand(3, 16, 16) * 2 - 1 for _ in range(2)]
    explorer_page(path, images, [0.25, 0.75], 1, 0, models, hw, probe=probe)
    return grids, hw


def page_data(path):
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S).group(1))


def decode(b64, dtype, shape):
    return np.frombuffer(base64.b64decode(b64), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def test_the_explorer_data_is_the_attention_matrices_and_their_numbers(tmp_path):
    grids, hw = small_page(tmp_path / "explorer.html", probe=True)
    data = page_data(tmp_path / "explorer.html")
    assert data["grid"] == [8, 8] and data["ts"] == [0.25, 0.75] and data["partners"] == partners(hw).tolist()
    assert [m["label"] for m in data["models"]] == [LABELS[k] for k in ATTENTIONS]
    for model in data["models"]:
        grid = grids[model["label"]]
        assert set(model["maps"]) == ({"attention", "base", "redundancy"} if "DyDiLA" in model["label"] else {"attention"})
        for part, maps in model["maps"].items():
            A = torch.stack([torch.stack([grid[t][l].maps[part] for l in range(2)]) for t in range(2)]).double()  # (T, L, h, N, N)
            rows = decode(maps["rows"], np.uint8, (2, 2, 2, 64, 64)) / 255 * decode(maps["rowmax"], np.float32, (2, 2, 2, 64))[..., None]
            assert np.allclose(rows, A.numpy(), atol=float(A.amax()) / 255 / 2 + 1e-7)   # each row to half a step of 1/255
            full = torch.cat([A, A.mean(2, keepdim=True)], 2)                              # heads, then the heads' mean
            for name, exact in (("entropy", row_entropy(full)), ("top5", top_mass(full)),
                                ("partner", partner_mass(full, partners(hw)))):
                assert np.allclose(decode(maps[name], np.float32, (2, 2, 3, 64)), exact.numpy(), atol=1e-6), (part, name)
    dydila = data["models"][2]
    for name in ("proj_q", "kernel_q", "lambda_q"):
        choices = decode(dydila["routing"][name], np.uint8, (2, 2, 64))
        assert all((choices[t, l] == grids[dydila["label"]][t][l].routing[name].numpy()).all()
                   for t in range(2) for l in range(2))
    assert len(dydila["banks"]["kernel_q"]) == 2 and len(dydila["banks"]["kernel_q"][0]) == 9


def rendered(page, fragment):
    """The page as headless Chromium renders it (its DOM after the script ran) at #fragment."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                               f"{page.as_uri()}#{fragment}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def shown(dom, i):
    """The numbers and router choices model panel i shows."""
    panel = dom.split(f'id="model-{i}"')[1].split('class="panel"')[0]
    numbers = {k: float(v) for k, v in re.findall(r'data-stat="(\w+)">([\d.]+)<', panel)}
    return numbers, dict(re.findall(r'data-router="(\w+)">(?:W<sup>)?([\d.]+)', panel))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): the page is not rendered")
def test_a_browser_shows_for_any_query_every_models_numbers(tmp_path):
    page = tmp_path / "explorer.html"
    grids, hw = small_page(page, probe=True)
    seen = []
    for fragment, (t, layer, head, query) in (("layer=0&head=1&query=27&t=0.75", (1, 0, 1, 27)),
                                              ("layer=1&head=mean&query=5&t=0.25&part=base", (0, 1, "mean", 5))):
        dom = rendered(page, fragment)
        assert 'data-ready="1"' in dom and 'id="errors"></div>' in dom                # the script ran to its end, no error
        assert json.loads(re.search(r'data-state="([^"]*)"', dom).group(1).replace("&quot;", '"')) == \
            {"layer": layer, "head": head, "query": query, "t": t, "part": "attention" if "part" not in fragment else "base"}
        for i, kind in enumerate(ATTENTIONS):
            maps, routing, banks = grids[LABELS[kind]][t][layer]
            A = maps["base" if "part=base" in fragment and "base" in maps else "attention"].double()
            r = A.mean(0) if head == "mean" else A[head]                               # the query's row: (N, N) -> row query
            numbers, routers = shown(dom, i)
            want = {"entropy": row_entropy(r)[query], "top5": top_mass(r)[query],
                    "partner": partner_mass(r, partners(hw))[query]}
            assert set(numbers) == set(want) and all(abs(numbers[k] - float(want[k])) <= 5e-4 + 1e-6 for k in want), \
                (fragment, kind, numbers, want)                                         # equal to the 3 decimals shown
            if kind == "dydila":
                assert routers["proj_q"] == str(int(routing["proj_q"][query]) + 1)
                for name in ("kernel_q", "lambda_q"):                                   # 2 decimals shown
                    assert abs(float(routers[name]) - banks[name][int(routing[name][query])]) <= 5e-3 + 1e-6, name
            seen.append(numbers)
    assert seen[:3] != seen[3:]                                                         # another fragment, other numbers
