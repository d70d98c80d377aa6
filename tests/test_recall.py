"""tools/recall.py: the associative-recall task, its measures, a model that learns it, one-line errors."""

import math

import pytest
import torch

from conftest import one_line_error
from tools import recall as R
from training.attention import partner_mass


def batch(n=64, examples=8, seed=0):
    return R.recall_batch(examples, R.grid(n), R.TRAIN["values"], R.TRAIN["key_dim"], torch.Generator().manual_seed(seed))


def test_every_query_carries_the_key_of_exactly_one_memory_token_and_its_value_is_the_target():
    kd = R.TRAIN["key_dim"]
    x, targets, partner = batch()
    memory, query = x[..., 0] == 1, x[..., 1] == 1
    assert torch.equal(memory, ~query) and (memory.sum(1) == 32).all()            # half memory, half queries
    keys, values = x[..., 2:2 + kd], x[..., 2 + kd:]
    assert (values[query] == 0).all() and torch.equal(values[memory].sum(-1), torch.ones(8 * 32))   # a value per memory token
    for b in range(len(x)):
        mem = memory[b].nonzero().flatten()
        for q in query[b].nonzero().flatten():
            same = (keys[b, mem] == keys[b, q]).all(-1).nonzero().flatten()
            assert len(same) == 1                                              # exactly one memory key matches
            p = mem[same[0]]
            assert partner[b, q] == p and targets[b, q] == values[b, p].argmax()
        assert (targets[b, mem] == -100).all() and (partner[b, mem] == -1).all()
        assert sorted(partner[b, query[b]].tolist()) == mem.tolist()           # every memory token asked once


def test_places_keys_and_values_are_fresh_in_every_example():
    x, _, _ = batch(examples=2)
    kd = R.TRAIN["key_dim"]
    assert not torch.equal(x[0, :, 0], x[1, :, 0])                             # other places
    first = x[0][x[0, :, 0] == 1][:, 2:2 + kd]
    second = x[1][x[1, :, 0] == 1][:, 2:2 + kd]
    assert (first @ second.T).abs().max() < 0.99                               # no key shared between examples
    assert torch.allclose(first.norm(dim=-1), torch.ones(len(first)))          # unit keys


def query_partner_mass(A, partner):
    """partner_mass of the query rows of a recall batch, as measure() takes it: (B, h, N / 2)."""
    rows = (partner >= 0)[:, None, :].expand(A.shape[:3])
    return partner_mass(A, partner.clamp(min=0)[:, None])[rows].view(A.shape[0], A.shape[1], -1)


def test_partner_mass_of_recall_queries_is_one_over_n_uniform_and_one_for_exact_retrieval():
    _, _, partner = batch(n=16, examples=3)
    uniform = torch.full((3, 2, 16, 16), 1 / 16)
    assert torch.allclose(query_partner_mass(uniform, partner), torch.full((3, 2, 8), 1 / 16, dtype=torch.float64))
    exact = torch.zeros(3, 2, 16, 16)
    rows = (partner >= 0).nonzero()
    exact[rows[:, 0], :, rows[:, 1], partner[rows[:, 0], rows[:, 1]]] = 5.0     # unnormalised rows: the share counts
    exact[..., 0] += (exact.sum(-1) == 0).float()                              # memory rows, not measured
    assert torch.allclose(query_partner_mass(exact, partner), torch.ones(3, 2, 8, dtype=torch.float64))
    exact[:, :, rows[0, 1]] = 0                                                # a query row that attends to nothing
    assert query_partner_mass(exact, partner)[0, :, 0].tolist() == [0.0, 0.0]


@pytest.mark.slow
def test_a_softmax_stack_learns_a_small_instance(monkeypatch):
    monkeypatch.setattr(R, "EVAL_EXAMPLES", 64)
    point = R.train_point("softmax", 16, 32, 0, {**R.TRAIN, "steps": 100, "lr": 3e-3, "warmup": 10})
    assert point["accuracy"] >= 0.95                                           # chance: 1/16
    assert point["partner_mass"] > 0.5 and len(point["partner_mass_per_layer"]) == R.TRAIN["depth"]
    assert 0 <= point["entropy"] < 1 and point["best_head"] >= point["partner_mass"]


@pytest.mark.parametrize("argv, facts", [
    (["--tokens", "48"], ["--tokens 48", "even square"]),
    (["--tokens", "49"], ["--tokens 49", "even square"]),
    (["--attn", "flash"], ["--attn", "'flash'", "dydila-no-dynamic-kernel"]),
    (["--head-dim", "24"], ["--head-dim 24", "64"]),
    (["--plot", "--csv", "missing.csv"], ["--csv missing.csv", "--sweep"]),
    (["--plot", "--figure", "r.xyz"], ["--figure r.xyz", ".png"]),
])
def test_bad_input_is_one_line(argv, facts, capsys, monkeypatch):
    monkeypatch.setattr(R, "train_point", lambda *a, **k: pytest.fail("trained despite bad input"))
    assert R.main(argv) == 2
    one_line_error(capsys, *facts)


def test_every_variant_is_a_name_typed_without_quotes():
    assert all(name.replace("-", "").isalnum() for name in R.VARIANTS)
    assert R.get_parser().parse_args(["--attn", "dydila-no-dynamic-kernel"]).attn == "dydila-no-dynamic-kernel"


def test_the_reference_that_grows_the_state_has_distributions_and_a_larger_state():
    m = R.TaylorAttention(64, 2)
    x = torch.randn(2, 16, 64)
    q, k, _ = m.features(x)
    assert q.shape == (2, 2, 16, 1 + 32 + 32 * 32)                             # (1 + d + d^2) features per head
    A = m.attention_matrix(x, (4, 4))
    assert (A > 0).all() and torch.allclose(A.sum(-1), torch.ones(2, 2, 16), atol=1e-5)
    qk = torch.einsum("bnhd,bmhd->bhnm", *m.qkv(x).view(2, 16, 3, 2, 32)[:, :, :2].unbind(2)) / 32 ** 0.5
    kernel = 1 + qk + qk ** 2 / 2                                              # exp's first three terms
    assert torch.allclose(A, kernel / kernel.sum(-1, keepdim=True), atol=1e-5)


def test_a_sweep_csv_may_hold_a_point_trained_a_multiple_of_the_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "SWEEP", [("dydila", 16, 32, 1), ("dydila", 16, 32, 4)])
    path = points_csv(tmp_path / "r.csv", POINT.replace("softmax", "dydila"),
                      POINT.replace("softmax", "dydila").replace(",3,", ",12,"))   # 3 steps, and 4 x 3
    assert len(R.read_points(path, 3)) == 2
    with pytest.raises(R.UserError, match="3, 12 training steps, not 5"):
        R.read_points(path, 5)


def points_csv(path, *lines):
    path.write_text(",".join(R.FIELDS) + "\n" + "".join(line + "\n" for line in lines))
    return path


POINT = "softmax,16,32,0,3,0.5,0.1,0.2,0.9,0.1 0.05,0.2 0.1,1.0,1"


@pytest.mark.parametrize("content, facts", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe binary", ["not a CSV"]),                # another tool's file: an image
    (b"tokens,accuracy\n64,0.5\n", ["not a CSV", "variant"]),           # another CSV
    (b"", ["not a CSV"]),                                               # empty
    (("," .join(R.FIELDS) + "\n").encode(), ["no points"]),               # a header only
    (("," .join(R.FIELDS) + "\nsoftmax,16,x,0,3,0.5\n").encode(), ["no recall point"]),
    (("," .join(R.FIELDS) + "\n" + POINT + "\n" + POINT.replace(",3,", ",5,").replace("softmax", "linear")
      + "\n").encode(), ["3, 5 training steps"]),                      # a mix of step counts
])
def test_plotting_a_csv_that_holds_no_sweep_is_one_line(content, facts, tmp_path, capsys):
    (tmp_path / "r.csv").write_bytes(content)
    assert R.main(["--plot", "--csv", str(tmp_path / "r.csv"), "--figure", str(tmp_path / "r.png")]) == 2
    one_line_error(capsys, "--csv", *facts)
    assert not (tmp_path / "r.png").exists()


def test_a_cut_last_line_is_left_out_with_a_note(tmp_path, capsys):
    path = points_csv(tmp_path / "r.csv", POINT)
    with open(path, "a") as f:
        f.write("linear,16,16,0,3,0.4")                                        # a stopped write
    assert set(R.read_points(path)) == {("softmax", 16, 32, 0, 3)}
    assert str(path) in capsys.readouterr().out


@pytest.mark.slow
def test_the_sweep_resumes_where_it_stopped_and_refuses_other_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "SWEEP", [("softmax", 16, 32, 1), ("linear", 16, 16, 1)])
    monkeypatch.setattr(R, "SEEDS", (0,))
    csv_path, png = points_csv(tmp_path / "r.csv", POINT), tmp_path / "r.png"
    with open(csv_path, "a") as f:
        f.write("linear,16,16,0,3,0.4")                                        # a point cut by a stopped write
    assert R.main(["--sweep", "--steps", "3", "--jobs", "1", "--csv", str(csv_path), "--figure", str(png)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 points in" in out and "1 to go" in out                     # the finished point is not run again
    points = R.read_points(csv_path)
    assert set(points) == {("softmax", 16, 32, 0, 3), ("linear", 16, 16, 0, 3)}
    assert math.isfinite(float(points[("linear", 16, 16, 0, 3)]["accuracy"])) and png.stat().st_size > 0
    assert R.main(["--sweep", "--steps", "5", "--csv", str(csv_path), "--figure", str(png)]) == 2
    one_line_error(capsys, "3 training steps", "5")
