"""
One prepared GPU check: the numbers of the speed table, in one command and a few minutes.

    python tools/gpu_check.py                 # one CUDA GPU: at most about 8 minutes, compilation included
    python tools/gpu_check.py --ablations     # also each DyDiLA ablation in the training-step table
    python tools/gpu_check.py --smoke         # the same code at tiny sizes (aot_eager), on a CPU: well under a minute

Measures, with torch.compile (Inductor) and bf16 autocast on CUDA:
  1. a training step (batch 128, S/2 on 32 x 32, rectified flow, fused AdamW) of DiT, LiT and DyDi-LiT,
     the models taking turns round by round; compile time and peak memory apart;
  2. sampling throughput of each: 50 Euler steps with guidance (the batch doubles), images per second;
  3. one attention module (S width) forward+backward at 1,024, 4,096 and 16,384 tokens;
  4. the real command line: train_tiny.py on synthetic data for 300 steps with its defaults.
Writes gpu_check.md (tables to paste into docs/BENCHMARKS.md, with the GPU, the torch version and the
command) and gpu_check.csv into --out-dir.
"""

import argparse
import csv
import functools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                     # dydilit.py and the scripts live one folder up
import dydilit as D                                               # noqa: E402
from tools.bench import measure, paired_ratio                     # noqa: E402
from training.run import HelpFormatter, UserError, check_writable, cli   # noqa: E402

ROWS = {"DiT": dict(attn="softmax"), "LiT": dict(attn="linear"), "DyDi-LiT": dict(attn="dydila")}
ABLATIONS = {f"DyDi-LiT, no {name.replace('_', ' ')}": dict(attn="dydila", attn_kwargs={name: False})
             for name in ("dynamic_projection", "dynamic_kernel", "token_differential")}
# the sizes: the GPU check, and --smoke (the same code, tiny)
FULL = dict(model=D.MODELS["DyDiLiT-S/2"], image=32, batch=128, rounds=5, steps_per_round=10, sample_batch=256,
            sample_steps=50, width=384, heads=6, tokens=(1024, 4096, 16384), min_seconds=1.0, cli_steps=300, backend="inductor")
SMOKE = dict(model=functools.partial(D.DyDiLiT, hidden_size=32, depth=1, num_heads=2, patch_size=4), image=16, batch=4,
             rounds=2, steps_per_round=2, sample_batch=4, sample_steps=2, width=32, heads=2, tokens=(64, 256),
             min_seconds=0.0, cli_steps=3, backend="aot_eager")
CFG_SCALE = 4.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    sync(device)
    return time.perf_counter()


def training_steps(rows, cfg, device, amp_dtype, compile):
    """Per row: compile seconds (the first step), peak memory of a step (GiB, CUDA), and the
    seconds of one step in each round (the rows take turns, so a slow spell hits them all)."""
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], device=device)
    y = torch.randint(0, 10, (cfg["batch"],), device=device)
    objective, out = D.FlowMatching(), {}
    models = {}
    for name, kw in rows.items():
        torch.manual_seed(0)
        model = cfg["model"](input_size=cfg["image"], num_classes=10, **kw).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
        models[name] = (compile(model), opt)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        t0 = clock(device)
        D.training_step(models[name][0], objective, opt, x, y, amp_dtype=amp_dtype)   # compiles forward and backward
        compile_s = clock(device) - t0
        D.training_step(models[name][0], objective, opt, x, y, amp_dtype=amp_dtype)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else math.nan
        out[name] = dict(compile_s=compile_s, peak_gib=peak, step_s=[])
        print(f"  {name}: compiled in {compile_s:.0f} s", flush=True)
    for _ in range(cfg["rounds"]):
        for name, (model, opt) in models.items():
            t0 = clock(device)
            for _ in range(cfg["steps_per_round"]):
                D.training_step(model, objective, opt, x, y, amp_dtype=amp_dtype)
            out[name]["step_s"].append((clock(device) - t0) / cfg["steps_per_round"])
    return out, {name: model for name, (model, _) in models.items()}


def sampling(models, cfg, device, amp):
    """Per row: compile seconds (a 2-step warm-up) and images per second of a whole guided sampling run."""
    flow, out = D.FlowMatching(), {}
    y = torch.arange(cfg["sample_batch"], device=device) % 10
    shape = (cfg["sample_batch"], 3, cfg["image"], cfg["image"])
    for name, model in models.items():
        model.eval()
        with amp():
            t0 = clock(device)
            flow.sample(model, shape, y, steps=2, cfg_scale=CFG_SCALE, generator=torch.Generator().manual_seed(0))
            compile_s = clock(device) - t0
            t0 = clock(device)
            flow.sample(model, shape, y, steps=cfg["sample_steps"], cfg_scale=CFG_SCALE, generator=torch.Generator().manual_seed(0))
            out[name] = dict(compile_s=compile_s, img_per_s=cfg["sample_batch"] / (clock(device) - t0))
        print(f"  {name}: {out[name]['img_per_s']:.0f} img/s", flush=True)
    return out


def attention(cfg, device, amp, compile, deadline):
    """Per token count: {mechanism: (compile s, median ms, peak MiB)} of one module's forward+backward."""
    out = {}
    for n in cfg["tokens"]:
        if time.perf_counter() > deadline:
            print(f"  skipping {n} tokens and more: the time budget is spent", flush=True)
            break
        side = math.isqrt(n)
        x = torch.randn(1, n, cfg["width"], device=device, requires_grad=True)
        modules, compile_s = {}, {}
        for kind in ("softmax", "linear", "dydila"):
            torch.manual_seed(0)
            modules[kind] = compile(D.ATTENTIONS[kind](cfg["width"], cfg["heads"]).to(device))
            try:
                with amp():
                    t0 = clock(device)
                    modules[kind](x, (side, side)).float().sum().backward()
                    compile_s[kind] = clock(device) - t0
            except (torch.cuda.OutOfMemoryError, MemoryError):
                del modules[kind]
        with amp():
            results = measure(modules, x, (side, side), 3, device, min_seconds=cfg["min_seconds"])
        out[n] = {kind: (compile_s[kind], 1000 * sec, mem) for kind, (sec, mem, _) in results.items()}
        print(f"  {n} tokens: " + ", ".join(f"{k} {v[1]:.2f} ms" for k, v in out[n].items()), flush=True)
    return out


def command_line(cfg, out_dir, smoke):
    """train_tiny.py on synthetic data with its defaults (--smoke: tiny, no compile): exit code,
    whether the checkpoint is there, wall seconds and the median img/s of its log lines after the first."""
    run = out_dir / "cli_run"
    args = ["--dataset", "synthetic", "--steps", str(cfg["cli_steps"]), "--out-dir", str(run)]
    if smoke:
        args += ["--model", "DyDiLiT-T/4", "--image-size", "16", "--batch-size", "8", "--log-every", "1", "--val-size", "16"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train_tiny.py"), *args], capture_output=True, text=True, cwd=out_dir)
    wall = time.perf_counter() - t0
    (out_dir / "cli_run.log").write_text(proc.stdout + proc.stderr)
    log = run / "log.jsonl"
    speeds = [r["img_per_s"] for r in map(json.loads, log.read_text().splitlines()) if "img_per_s" in r] if log.exists() else []
    return dict(command="python train_tiny.py " + " ".join("OUT" if a == str(run) else a for a in args), exit=proc.returncode,
                checkpoint=(run / "ckpt.pt").exists(), wall_s=wall,
                img_per_s=statistics.median(speeds[1:] or speeds) if speeds else math.nan)


def check(args):
    smoke = args.smoke
    cfg = dict(SMOKE if smoke else FULL)
    cfg["backend"] = args.backend or cfg["backend"]
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type != "cuda" and not smoke:
        raise UserError("no CUDA GPU: this check measures one; run it on a GPU, or add --smoke to try its code path on this machine")
    out = Path(args.out_dir)
    check_writable(out, "--out-dir")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget_s
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp_dtype else nullcontext
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 64
    compile = functools.partial(torch.compile, backend=cfg["backend"], dynamic=False)
    rows = {**ROWS, **(ABLATIONS if args.ablations else {})}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"{where}, torch {torch.__version__}, backend {cfg['backend']}", flush=True)

    print("1. training step", flush=True)
    steps, models = training_steps(rows, cfg, device, amp_dtype, compile)
    print("2. sampling", flush=True)
    samples = sampling(models, cfg, device, amp)
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print("3. one attention module", flush=True)
    attn = attention(cfg, device, amp, compile, deadline - 90)   # leave the command line its time
    print("4. the command line", flush=True)
    run = command_line(cfg, out, smoke)
    print(f"  exit {run['exit']}, checkpoint {'written' if run['checkpoint'] else 'MISSING'}, {run['img_per_s']:.0f} img/s", flush=True)
    total = time.perf_counter() - start

    # --- the tables --------------------------------------------------------------------------
    lit = steps["LiT"]["step_s"]
    precision = "bf16 autocast, TF32" if amp_dtype else "float32"
    cuda = f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    lines = [f"GPU check: {where}; torch {torch.__version__}{cuda}; backend {cfg['backend']}; {precision}; "
             f"{total / 60:.1f} min in all." + (" A smoke run at tiny sizes: its numbers measure nothing." if smoke else ""), "",
             f"    python tools/gpu_check.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"Training step: batch {cfg['batch']}, {cfg['image']}x{cfg['image']}, rectified flow, fused AdamW; median of "
             f"{cfg['rounds']} rounds of {cfg['steps_per_round']} steps, the rows taking turns. Sampling: "
             f"{cfg['sample_batch']} images, {cfg['sample_steps']} Euler steps, guidance {CFG_SCALE:g} (a doubled batch).", "",
             "| row | step ms | img/s | step / LiT's | compile s | peak GiB | sampling img/s | sampling compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table = []
    for name, r in steps.items():
        ms = 1000 * statistics.median(r["step_s"])
        ratio = paired_ratio(r["step_s"], lit)
        s = samples[name]
        lines.append(f"| {name} | {ms:.1f} | {cfg['batch'] / ms * 1000:.0f} | {ratio:.2f} | {r['compile_s']:.0f} | "
                     f"{'-' if math.isnan(r['peak_gib']) else format(r['peak_gib'], '.2f')} | {s['img_per_s']:.0f} | "
                     f"{s['compile_s']:.0f} |")
        table += [("training step", name, "ms", ms), ("training step", name, "over LiT", ratio),
                  ("training step", name, "compile s", r["compile_s"]), ("training step", name, "peak GiB", r["peak_gib"]),
                  ("sampling", name, "img/s", s["img_per_s"]), ("sampling", name, "compile s", s["compile_s"])]
    target = paired_ratio(steps["DyDi-LiT"]["step_s"], lit)
    lines += ["", f"DyDi-LiT / LiT training step: {target:.2f} (target: at most 1.5).", "",
              f"One attention module, width {cfg['width']}, {cfg['heads']} heads, batch 1, forward+backward, compiled "
              f"(median ms; compile s; peak MiB):", "",
              "| tokens | softmax | linear | DyDiLA |", "| --- | --- | --- | --- |"]
    for n, res in attn.items():
        cells = [f"{res[k][1]:.2f} ms ({res[k][0]:.0f} s; {res[k][2]:.0f} MiB)" if k in res else "out of memory"
                 for k in ("softmax", "linear", "dydila")]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
        table += [("attention", f"{k} {n}", "ms", res[k][1]) for k in res]
    lines += ["", f"The command line: `{run['command']}`: exit {run['exit']}, checkpoint "
              f"{'written' if run['checkpoint'] else 'missing'}, {run['img_per_s']:.0f} img/s (median of its log lines "
              f"after the first), {run['wall_s']:.0f} s wall clock with compilation and the final validation."]
    table += [("command line", "train_tiny.py", "img/s", run["img_per_s"]), ("command line", "train_tiny.py", "exit", run["exit"])]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    with open(out / "gpu_check.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "row", "metric", "value"])
        w.writerows(table)
    print("\n".join(lines))
    print(f"wrote {out / 'gpu_check.md'}, {out / 'gpu_check.csv'}")
    return 0 if run["exit"] == 0 and run["checkpoint"] else 1


def get_parser():
    p = argparse.ArgumentParser(description="The speed table on one CUDA GPU: compiled training steps, sampling, "
                                "attention scaling and the real command line, in minutes.", formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="gpu_check", help="folder for gpu_check.md, gpu_check.csv and the command line's run")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and the aot_eager backend, on the CPU: tries the code path")
    p.add_argument("--ablations", action="store_true", help="also time each DyDiLA ablation's training step and sampling")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    p.add_argument("--budget-s", type=float, default=420, help="seconds after which the larger attention sizes are skipped")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    return cli(check, args)


if __name__ == "__main__":
    sys.exit(main())
