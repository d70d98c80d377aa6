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
from pathlib import Path

import numpy as np
import pytest
import torch

import dydilit as D
import training.data as TD
import visualize as V
from conftest import library_checkpoint, one_line_error
from training.attention import ATTENTIONS, LABELS, partner_mass, partners, row_entropy, summarise, top_mass
from training.explorer import explorer_model, explorer_page, layer_maps, parts_of, plan_page

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
def test_visualize_draws_a_signed_reading_by_magnitude(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TD, "FASHION_DIRS", [])
    assert V.main(["--out-dir", str(tmp_path), "--reading", "c"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("DyDiLA, reading c"))
    assert 0 < float(row.split()[3]) < 1                                       # entropy / log N of |A|
    assert page_data(tmp_path / "explorer.html")["models"][2]["label"] == "DyDiLA, reading c"


@pytest.mark.slow
def test_visualize_checkpoint_mode_writes_parts_and_routers(tiny_runs, tmp_path, capsys):
    runs = [tiny_runs[name] for name in ("linear", "dydila", "static")]
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", *runs, "--t", "0.3", "0.7"]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png", "dydila_parts_dydila.png",
                 "dydila_parts_static.png"):                    # DyDiLA's parts: one figure per run
        assert (tmp_path / "viz" / name).stat().st_size > 10_000, name
    data = page_data(tmp_path / "viz" / "explorer.html")      # the three runs, in the figures' order
    folders = [str(Path(run).parent) for run in runs]
    assert [m["label"] for m in data["models"]] == [f"{name} — {folder}" for name, folder in
                                                   zip(["LiT (linear)", "DyDi-LiT", "DyDi-LiT, no dynamic kernel"], folders)]
    assert data["ts"] == [0.3, 0.7] and data["layer"] == 3 and all(m["depth"] == 6 and m["heads"] == 3 for m in data["models"])
    assert (tmp_path / "viz" / "explorer.html").stat().st_size < 3_000_000
    from PIL import Image
    for name in ("router_maps.png", "dydila_parts_dydila.png"):  # wide figures stay readable in a README column
        assert Image.open(tmp_path / "viz" / name).size[0] <= 1300, name
    out = capsys.readouterr().out
    assert f"DyDi-LiT — {folders[1]} t=0.7" in out and "layer 3" in out
    assert any(line.startswith("explorer.html: stored: ") for line in out.splitlines())
    assert not [w for w in out.splitlines() if w.startswith("warning: DyDi-LiT, no dynamic kernel") and "kernel_" in w]  # a static kernel is no collapse


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
    per_layer = [line for line in out.splitlines() if line.startswith(("LiT (linear) — ", "DyDi-LiT — ")) and " t=0.5 " in line
                 and "mean" in line]
    assert len(per_layer) == 2 and all(len(line.split(" t=0.5 ")[1].split("mean")[0].split()) == 6 for line in per_layer)
    assert all(len(line.split("best heads")[1].split()) == 6 for line in per_layer)
    assert (tmp_path / "viz" / "attention_maps.png").stat().st_size > 10_000


# --- the explorer page -------------------------------------------------------------------------

def small_page(path, probe=False, budget_mb=100, bits=8, labels=None):
    """The page of three untrained modules (width 32, 2 heads) on an 8 x 8 grid, two "layers" (the
    same modules on two inputs) and two t: (their LayerMaps {label: [[per layer] per t]}, hw, plan)."""
    torch.manual_seed(0)
    hw, inputs = (8, 8), [torch.randn(1, 64, 32) for _ in range(4)]
    labels = labels or [LABELS[kind] for kind in ATTENTIONS]
    modules = {}
    for label, kind in zip(labels, ATTENTIONS):
        torch.manual_seed(1)
        modules[label] = D.ATTENTIONS[kind](32, 2).eval()
    plan = plan_page([(2, 2, parts_of(m)) for m in modules.values()], 2, hw, 1, budget_mb, bits, probe)
    grids, models = {}, []
    with torch.no_grad():
        for label, module in modules.items():
            at = [[(module, inputs[2 * t + l]) for l in range(2)] for t in range(2)]
            grids[label] = [[layer_maps(m, x, hw) for m, x in layers] for layers in at]
            models.append(explorer_model(label, at, hw, plan, probe=probe))
    images = [torch.rand(3, 16, 16) * 2 - 1 for _ in range(2)]
    explorer_page(path, images, [0.25, 0.75], 1, 0, models, hw, plan, probe=probe)
    return grids, hw, plan


def page_data(path):
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S).group(1))


def decode(b64, dtype, shape):
    return np.frombuffer(base64.b64decode(b64), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def stored_rows(s, bits, shape):
    """A slice's rows as the page reads them: levels / (2^bits - 1) * each row's maximum."""
    levels = decode(s["rows"], np.uint8, (-1,))
    if bits == 4:
        levels = np.stack([levels >> 4, levels & 15], 1).reshape(-1)[:shape[0] * shape[1]]
    return levels.reshape(shape) / (2**bits - 1) * decode(s["rowmax"], np.float32, (shape[0], 1))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_explorer_data_is_the_attention_matrices_and_their_numbers(bits, tmp_path):
    grids, hw, plan = small_page(tmp_path / "explorer.html", probe=True, bits=bits)
    data = page_data(tmp_path / "explorer.html")
    assert data["grid"] == [8, 8] and data["keys"] == [8, 8] and data["partners"] == partners(hw).tolist()
    assert [m["label"] for m in data["models"]] == [LABELS[k] for k in ATTENTIONS] and data["bits"] == bits
    for model in data["models"]:
        grid = grids[model["label"]]
        assert len(model["slices"]) == 2 * 2 * 3 * len(model["parts"])           # t, layers, (mean, 2 heads), parts
        for key, s in model["slices"].items():
            part, t, layer, head = key.split("/")
            A = grid[int(t)][int(layer)].maps[part].double()                       # (h, N, N)
            exact = A.mean(0) if head == "mean" else A[int(head)]
            rows = stored_rows(s, bits, (64, 64))
            assert np.allclose(rows, exact.numpy(), atol=float(exact.amax()) / (2**bits - 1) / 2 + 1e-7), key
            for name, want in (("entropy", row_entropy(exact)), ("top5", top_mass(exact)),
                               ("partner", partner_mass(exact, partners(hw)))):
                assert np.allclose(decode(s[name], np.float32, (64,)), want.numpy(), atol=1e-6), (key, name)
    dydila = data["models"][2]
    assert dydila["parts"] == ["attention", "base", "redundancy"]
    for name in ("proj_q", "kernel_q", "lambda_q"):
        choices = decode(dydila["routing"][name], np.uint8, (2, 2, 64))
        assert all((choices[t, l] == grids[dydila["label"]][t][l].routing[name].numpy()).all()
                   for t in range(2) for l in range(2))
    assert len(dydila["banks"]["kernel_q"]) == 2 and len(dydila["banks"]["kernel_q"][0]) == 9


def test_the_plan_fills_its_budget_in_order_and_says_what_it_left_out():
    models = [(12, 6, ("attention",)), (12, 6, ("attention",)), (12, 6, ("attention", "base", "redundancy"))]
    plan = plan_page(models, 3, (16, 16), 6, 5, 4)                          # three S/2 runs at 32 px, three t
    assert plan.size <= 5e6 and plan.pool == 1
    assert plan.items[:2] == (("attention", 6, "mean"), ("parts", 6, "mean"))     # the figures' layer first
    assert ("attention", 0, "each") not in plan.items
    assert plan.summary.startswith("stored: the mean of the heads at layers ") and "--page-mb" in plan.summary
    assert plan_page(models, 3, (16, 16), 6, 200, 4).summary.count("left out") == 0   # a big budget: everything


def test_a_grid_too_large_for_the_budget_has_its_keys_pooled():
    plan = plan_page([(12, 6, ("attention",))] * 3, 3, (32, 32), 6, 5, 4)   # three S/2 runs at 64 px
    assert plan.pool == 2 and plan.size <= 5e6 and "2 x 2 blocks" in plan.summary


def test_pooled_keys_hold_each_blocks_weight(tmp_path):
    grids, hw, plan = small_page(tmp_path / "explorer.html", budget_mb=0.03)   # less than the first item's keys
    data = page_data(tmp_path / "explorer.html")
    assert plan.pool == 2 and data["keys"] == [4, 4]
    s = data["models"][0]["slices"]["attention/0/1/mean"]
    A = grids[LABELS["softmax"]][0][1].maps["attention"].double().mean(0)       # (N, N)
    pooled = A.view(64, 4, 2, 4, 2).sum((2, 4)).flatten(1)
    assert np.allclose(stored_rows(s, 8, (64, 16)), pooled.numpy(), atol=float(pooled.amax()) / 255 / 2 + 1e-7)


def rendered(page, fragment):
    """The page as headless Chromium renders it (its DOM after the script ran) at #fragment."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                               f"{page.as_uri()}#{fragment}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-ready="1"' in proc.stdout and 'id="errors"></div>' in proc.stdout        # ran to its end, no error
    return proc.stdout


def shown(dom, i):
    """The numbers and router choices model panel i shows, and its note."""
    panel = dom.split(f'id="model-{i}"')[1].split('class="panel')[0]
    numbers = {k: float(v) for k, v in re.findall(r'data-stat="(\w+)">([\d.]+)<', panel)}
    note = re.search(r'class="missing">([^<]*)<', panel).group(1)
    return numbers, dict(re.findall(r'data-router="(\w+)">([\d.]+)', panel)), note


def dom_state(dom):
    return json.loads(re.search(r'data-state="([^"]*)"', dom).group(1).replace("&quot;", '"'))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): the page is not rendered")
def test_a_browser_shows_for_any_query_every_models_numbers(tmp_path):
    page = tmp_path / "explorer.html"
    grids, hw, _ = small_page(page, probe=True, bits=4)
    seen = []
    for fragment, (t, layer, head, query) in (("layer=0&head=1&query=27&t=0.75", (1, 0, 1, 27)),
                                              ("layer=1&head=mean&query=5&t=0.25&part=base", (0, 1, "mean", 5))):
        dom = rendered(page, fragment)
        assert dom_state(dom) == {"layer": layer, "head": head, "query": query, "t": t,
                                  "part": "attention" if "part" not in fragment else "base"}
        for i, kind in enumerate(ATTENTIONS):
            maps, routing, banks = grids[LABELS[kind]][t][layer]
            A = maps["base" if "part=base" in fragment and "base" in maps else "attention"].double()
            r = A.mean(0) if head == "mean" else A[head]                               # (N, N) -> row query
            numbers, routers, note = shown(dom, i)
            want = {"entropy": row_entropy(r)[query], "top5": top_mass(r)[query],
                    "partner": partner_mass(r, partners(hw))[query]}
            assert set(numbers) == set(want) and all(abs(numbers[k] - float(want[k])) <= 5e-4 + 1e-6 for k in want), \
                (fragment, kind, numbers, want)                                         # equal to the 3 decimals shown
            assert bool(note) == ("part=base" in fragment and kind != "dydila")         # the others say they lack it
            if kind == "dydila":
                assert routers["proj_q"] == str(int(routing["proj_q"][query]) + 1)
                for name in ("kernel_q", "lambda_q"):                                   # 2 decimals shown
                    assert abs(float(routers[name]) - banks[name][int(routing[name][query])]) <= 5e-3 + 1e-6, name
            seen.append(numbers)
    assert seen[:3] != seen[3:]                                                         # another fragment, other numbers


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): the page is not rendered")
@pytest.mark.parametrize("fragment, state, url", [
    ("layer=abc&head=7&query=99999&t=0.50", dict(layer=1, head=1, query=63, t=0), "layer=1&head=1&query=63&t=0.25"),
    ("layer=9&head=-3&query=-5&t=0.7", dict(layer=1, head=0, query=0, t=1), "layer=1&head=0&query=0&t=0.75"),
    ("layer=0&head=mean&query=12.4&t=x&part=nonsense", dict(layer=0, head="mean", query=12, t=0),
     "layer=0&head=mean&query=12&t=0.25"),
])
def test_a_bad_fragment_falls_back_to_the_nearest_valid_view_and_the_url_says_so(fragment, state, url, tmp_path):
    page = tmp_path / "explorer.html"
    small_page(page)
    dom = rendered(page, fragment)
    assert dom_state(dom) == {**state, "part": "attention"}
    assert re.search(r'data-fragment="([^"]*)"', dom).group(1).replace("&amp;", "&") == url


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): the page is not rendered")
def test_a_hostile_run_name_is_shown_as_text_and_runs_nothing(tmp_path):
    hostile = '<img src=x onerror="document.body.dataset.injected=1">'
    page = tmp_path / "explorer.html"
    small_page(page, labels=[hostile, "LiT", "DyDi-LiT — runs/dydi"])
    dom = rendered(page, "")
    assert "data-injected" not in dom and "<img" not in dom.split('<script id="data"')[0]
    assert "&lt;img src=x onerror=" in dom                                             # the name, as text


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): the page is not rendered")
def test_a_hostile_run_folder_runs_nothing_on_the_page_visualize_writes(tmp_path):
    folder = tmp_path / '<img src=x onerror="document.body.dataset.injected=1">'
    ckpt = library_checkpoint(folder / "ckpt.pt", args={"dataset": "synthetic"})
    assert V.main(["--ckpt", ckpt, "--out-dir", str(tmp_path / "viz"), "--t", "0.5"]) == 0
    dom = rendered(tmp_path / "viz" / "explorer.html", "")
    assert "data-injected" not in dom and "&lt;img src=x onerror=" in dom


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): the page is not rendered")
def test_the_part_selector_offers_only_what_some_model_has(tmp_path):
    page = tmp_path / "explorer.html"
    grids, hw, plan = small_page(page)
    data = page_data(page)
    data["models"] = data["models"][:2]                                                # softmax and linear only
    page.write_text(re.sub(r'(<script id="data" type="application/json">).*?(</script>)',
                           lambda m: m.group(1) + json.dumps(data) + m.group(2), page.read_text(), flags=re.S))
    dom = rendered(page, "part=redundancy")
    assert dom_state(dom)["part"] == "attention" and 'id="part-control" hidden' in dom
