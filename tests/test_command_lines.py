"""Every script's and tool's command line checks its values alike, before any work: zero, negative,
absurd and unreadable sizes and counts, ranges, unknown flags; each ends in one 'error:' line that
names the flag and the value, with exit code 2."""

import pytest

import train_tiny as T
import visualize as V
from conftest import TINY, never, one_line_error
from tools import ablation, bench, gpu_check, recall

MAINS = {"train_tiny": T.main, "visualize": V.main, "ablation": ablation.main, "bench": bench.main,
         "recall": recall.main, "gpu_check": gpu_check.main}

CASES = [
    ("train_tiny", ["--steps", "0"], ["--steps", "0"]),
    ("train_tiny", ["--steps", "ten"], ["--steps", "ten"]),
    ("train_tiny", ["--batch-size", "-8"], ["--batch-size", "-8"]),
    ("train_tiny", ["--image-size", "0"], ["--image-size", "0"]),
    ("train_tiny", ["--val-size", "0"], ["--val-size", "0"]),
    ("train_tiny", ["--num-classes", "0"], ["--num-classes", "0"]),
    ("train_tiny", ["--log-every", "0"], ["--log-every", "0"]),
    ("train_tiny", ["--eval-every", "-1"], ["--eval-every", "-1"]),
    ("train_tiny", ["--sample-every", "0"], ["--sample-every", "0"]),
    ("train_tiny", ["--warmup", "-2"], ["--warmup", "-2"]),
    ("train_tiny", ["--lr", "-1"], ["--lr", "-1"]),
    ("train_tiny", ["--lr", "nan"], ["--lr", "nan"]),
    ("train_tiny", ["--grad-clip", "-1"], ["--grad-clip", "-1"]),
    ("train_tiny", ["--ema-decay", "1.5"], ["--ema-decay", "1.5"]),
    ("train_tiny", ["--seed", "-1"], ["--seed", "-1"]),
    ("train_tiny", ["--seed", str(2**70)], ["--seed", str(2**70)]),
    ("train_tiny", ["--sample-steps", "0"], ["--sample-steps", "0"]),
    ("train_tiny", ["--fid-samples", "1"], ["--fid-samples", "1"]),
    ("train_tiny", ["--fid-samples", "-5"], ["--fid-samples", "-5"]),
    ("train_tiny", ["--num-samples", "0"], ["--num-samples", "0"]),
    ("train_tiny", ["--cfg-scale", "nan"], ["--cfg-scale", "nan"]),
    ("train_tiny", ["--cfg-scale", "inf"], ["--cfg-scale", "inf"]),
    ("train_tiny", ["--stpes", "3"], ["--stpes"]),
    ("train_tiny", ["--reading", "d"], ["--reading", "'d'"]),
    ("train_tiny", ["--reading", "c", "--attn", "linear"], ["--reading c", "--attn dydila"]),
    ("train_tiny", ["--reading", "c-init", "--no-dynamic-kernel"], ["--reading c-init", "--no-dynamic-kernel"]),
    ("visualize", ["--reading", "x"], ["--reading", "'x'"]),
    ("visualize", ["--width", "0"], ["--width", "0"]),
    ("visualize", ["--heads", "0"], ["--heads", "0"]),
    ("visualize", ["--width", "6", "--heads", "2"], ["--width 6", "4"]),
    ("visualize", ["--width", "1000000000", "--heads", "1"], ["width 1000000000", "--width"]),
    ("visualize", ["--index", "-1"], ["--index", "-1"]),
    ("visualize", ["--head", "-1"], ["--head", "-1"]),
    ("visualize", ["--layer", "-1"], ["--layer", "-1"]),
    ("visualize", ["--t", "1.5"], ["--t", "1.5"]),
    ("visualize", ["--seed", "-1"], ["--seed", "-1"]),
    ("ablation", ["--ckpt", "x.pt", "--fid-samples", "1"], ["--fid-samples", "1"]),
    ("ablation", ["--ckpt", "x.pt", "--index", "-1"], ["--index", "-1"]),
    ("ablation", ["--ckpt", "x.pt", "--layer", "-1"], ["--layer", "-1"]),
    ("ablation", ["--ckpt", "x.pt", "--t", "-0.1"], ["--t", "-0.1"]),
    ("ablation", ["--ckpt", "x.pt", "--sample-steps", "0"], ["--sample-steps", "0"]),
    ("ablation", ["--out-dir", "x"], ["--ckpt"]),
    ("bench", ["--max-tokens", "0"], ["--max-tokens", "0"]),
    ("bench", ["--width", "0"], ["--width", "0"]),
    ("bench", ["--heads", "0"], ["--heads", "0"]),
    ("bench", ["--repeats", "0"], ["--repeats", "0"]),
    ("bench", ["--width", "100000000", "--heads", "1"], ["width 100000000", "--width"]),
    ("recall", ["--tokens", "0"], ["--tokens", "0"]),
    ("recall", ["--tokens", "100000000"], ["--tokens 100000000", "--tokens"]),
    ("recall", ["--head-dim", "0"], ["--head-dim", "0"]),
    ("recall", ["--steps", "0"], ["--steps", "0"]),
    ("recall", ["--threads", "0"], ["--threads", "0"]),
    ("recall", ["--sweep", "--jobs", "0"], ["--jobs", "0"]),
    ("recall", ["--seed", "-3"], ["--seed", "-3"]),
    ("gpu_check", ["--smoke", "--budget-s", "0"], ["--budget-s", "0"]),
    ("gpu_check", ["--smoke", "--budget-s", "nan"], ["--budget-s", "nan"]),
]


@pytest.mark.parametrize("script, argv, facts", CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CASES])
def test_impossible_values_end_in_one_line_before_any_work(script, argv, facts, capsys, monkeypatch):
    monkeypatch.setattr(T, "load_data", never("load_data"))
    monkeypatch.setattr(recall, "train_point", never("training a point"))
    monkeypatch.setattr(bench, "scaling", never("the timing"))
    monkeypatch.setattr(gpu_check, "GpuCheck", never("the check"))
    assert MAINS[script]([*TINY, "--out-dir", "run", *argv] if script == "train_tiny" else argv) == 2
    one_line_error(capsys, *facts)


@pytest.mark.parametrize("script", sorted(MAINS))
def test_help_is_printed_and_exits_zero(script, capsys):
    with pytest.raises(SystemExit) as stop:
        MAINS[script](["--help"])
    assert stop.value.code == 0 and "--" in capsys.readouterr().out
