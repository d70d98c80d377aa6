"""
One prepared GPU check: the numbers of the speed table, in one command, held to one deadline.

    python tools/gpu_check.py                 # one CUDA GPU: at most --budget-s (420 s), compilation included
    python tools/gpu_check.py --ablations     # also each DyDiLA ablation in the training-step tables
    python tools/gpu_check.py --smoke         # the same code at tiny sizes, on a CPU (aot_eager): under a minute

Each run writes into a fresh folder of its own, <--out-dir>/<date>-<time>/: gpu_check.md (tables to
paste into docs/BENCHMARKS.md, with the GPU, the torch version and the command), gpu_check.csv, and
the command line's run with its log. Every section's rows go to both files as soon as they are
measured, so a check cut short (by its deadline, a crash, the machine taken back) leaves what it
measured. In order, with bf16 autocast on CUDA:
  1. a training step (batch 128, S/2 on 32 x 32, rectified flow, fused AdamW) of DiT, LiT and
     DyDi-LiT without compilation, the models taking turns round by round: a GPU number in a minute;
  2. the same step through torch.compile (Inductor): compile time and peak memory as each model
     compiles, then the step times;
  3. one attention module (S width) forward+backward at 1,024, 4,096 and 16,384 tokens, compiled;
  4. sampling throughput of the compiled models: 50 Euler steps with guidance, images per second;
  5. the real command line: train_tiny.py on synthetic data for 300 steps with its defaults.
A row that fails (a compile error, out of memory) is written with its one-line reason and the check
goes on. Sections 1-4 stop where they are when only the command line's reserve is left; the command
line stops at the deadline; what was not measured is said.
"""

import argparse
import csv
import functools
import math
import platform
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                     # dydilit.py and the scripts live one folder up
import dydilit as D                                               # noqa: E402
from tools.bench import measure, paired_ratio                     # noqa: E402
from training.run import HelpFormatter, UserError, check_writable, cli, read_log   # noqa: E402

ROWS = {"DiT": dict(attn="softmax"), "LiT": dict(attn="linear"), "DyDi-LiT": dict(attn="dydila")}
ABLATIONS = {f"DyDi-LiT, no {name.replace('_', ' ')}": dict(attn="dydila", attn_kwargs={name: False})
             for name in ("dynamic_projection", "dynamic_kernel", "token_differential")}
# the sizes: the GPU check, and --smoke (the same code, tiny). cli_reserve_s: what sections 1-4 leave the command
# line; cli_grace_s: from a SIGTERM at cli_grace_s before the deadline, its time to checkpoint and end
FULL = dict(model=D.MODELS["DyDiLiT-S/2"], image=32, batch=128, rounds=5, steps_per_round=10, eager_rounds=3,
            sample_batch=256, sample_steps=50, width=384, heads=6, tokens=(1024, 4096, 16384), min_seconds=1.0,
            cli_steps=300, cli_reserve_s=150, cli_grace_s=30, backend="inductor")
SMOKE = dict(model=functools.partial(D.DyDiLiT, hidden_size=32, depth=1, num_heads=2, patch_size=4), image=16, batch=4,
             rounds=2, steps_per_round=2, eager_rounds=2, sample_batch=4, sample_steps=2, width=32, heads=2,
             tokens=(64, 256), min_seconds=0.0, cli_steps=3, cli_reserve_s=20, cli_grace_s=5, backend="aot_eager")
CFG_SCALE = 4.0


class OutOfTime(BaseException):
    """The deadline of the running part of the check (a BaseException: no `except Exception` holds it)."""


@contextmanager
def deadline(at):
    """Raises OutOfTime inside the block at time.perf_counter() == at, wherever it is (SIGALRM)."""
    def ring(signum, frame):
        raise OutOfTime
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(at - time.perf_counter(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reason(e):
    """A failing row's reason in one line."""
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:160]}" if text else e.__class__.__name__


class Report:
    """gpu_check.md (also printed) and gpu_check.csv (section, row, metric, value), each line
    appended and flushed as it comes."""

    def __init__(self, folder):
        self.md, self.csv = folder / "gpu_check.md", folder / "gpu_check.csv"
        self.failures = 0
        with open(self.csv, "w", newline="") as f:
            csv.writer(f).writerow(["section", "row", "metric", "value"])

    def line(self, text=""):
        with open(self.md, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)

    def values(self, section, row, **metrics):
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerows((section, row, k, v) for k, v in metrics.items())

    def failed(self, section, row, e):
        self.failures += 1
        self.values(section, row, failed=reason(e))
        return f"failed: {reason(e)}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    sync(device)
    return time.perf_counter()


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GpuCheck:
    def __init__(self, cfg, rows, device, report):
        self.cfg, self.rows, self.device, self.report = cfg, rows, device, report
        self.amp_dtype = torch.bfloat16 if device.type == "cuda" else None
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.amp_dtype else nullcontext
        self.compile = functools.partial(torch.compile, backend=cfg["backend"], dynamic=False)
        self.x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], device=device)
        self.y = torch.randint(0, 10, (cfg["batch"],), device=device)
        self.compiled = {}                                        # name -> compiled model (section 2, for section 4)

    def step(self, model, opt):
        D.training_step(model, D.FlowMatching(), opt, self.x, self.y, amp_dtype=self.amp_dtype)

    def build(self, kw):
        torch.manual_seed(0)
        model = self.cfg["model"](input_size=self.cfg["image"], num_classes=10, **kw).to(self.device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)

    def rounds(self, runs, rounds):
        """Seconds of one step per round for each (model, opt), the rows taking turns, so that a slow
        spell of the machine hits them all."""
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (model, opt) in runs.items():
                t0 = clock(self.device)
                for _ in range(self.cfg["steps_per_round"]):
                    self.step(model, opt)
                times[name].append((clock(self.device) - t0) / self.cfg["steps_per_round"])
        return times

    def step_table(self, section, times, failed):
        """The rows' ms per step, images per second and the paired ratio over LiT's."""
        cfg, report = self.cfg, self.report
        report.line("| row | step ms | img/s | step / LiT's |")
        report.line("| --- | --- | --- | --- |")
        for name in self.rows:
            if name in failed:
                report.line(f"| {name} | {failed[name]} | | |")
                continue
            ms = 1000 * statistics.median(times[name])
            ratio = paired_ratio(times[name], times["LiT"]) if "LiT" in times else math.nan
            report.line(f"| {name} | {ms:.1f} | {cfg['batch'] / ms * 1000:.0f} | {ratio:.2f} |")
            report.values(section, name, ms=ms, img_per_s=cfg["batch"] / ms * 1000, over_lit=ratio)

    def eager_steps(self):
        """1. The training step without compilation."""
        section, runs, failed = "training step, eager", {}, {}
        for name, kw in self.rows.items():
            try:
                runs[name] = self.build(kw)
                self.step(*runs[name])                            # warm-up: allocator, kernels' first launch
            except Exception as e:
                runs.pop(name, None)
                failed[name] = self.report.failed(section, name, e)
                free_memory(self.device)
        times = self.rounds(runs, self.cfg["eager_rounds"])
        del runs
        free_memory(self.device)
        self.step_table(section, times, failed)

    def compiled_steps(self):
        """2. The training step through torch.compile: each model's compile time and peak memory as it
        compiles, then the step times."""
        section, runs, failed, device, report = "training step, compiled", {}, {}, self.device, self.report
        report.line("| row | compile s (first step) | peak GiB (a step) |")
        report.line("| --- | --- | --- |")
        for name, kw in self.rows.items():
            try:
                raw, opt = self.build(kw)
                model = self.compile(raw)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                t0 = clock(device)
                self.step(model, opt)                             # compiles forward and backward
                compile_s = clock(device) - t0
                self.step(model, opt)
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else math.nan
            except Exception as e:
                failed[name] = report.failed(section, name, e)
                report.line(f"| {name} | {failed[name]} | |")
                free_memory(device)
                continue
            runs[name] = (model, opt)
            report.line(f"| {name} | {compile_s:.0f} | {'-' if math.isnan(peak) else format(peak, '.2f')} |")
            report.values(section, name, compile_s=compile_s, peak_gib=peak)
        self.compiled = {name: model for name, (model, _) in runs.items()}
        report.line()
        self.step_table(section, self.rounds(runs, self.cfg["rounds"]), failed)
        if "DyDi-LiT" in runs and "LiT" in runs:
            report.line()
            report.line("Target: DyDi-LiT's compiled step at most 1.5 times LiT's.")

    def sampling(self):
        """4. Sampling throughput of each compiled model: a 2-step warm-up (compiles), then a whole run."""
        section, cfg, device, report = "sampling", self.cfg, self.device, self.report
        flow, y = D.FlowMatching(), torch.arange(cfg["sample_batch"], device=device) % 10
        shape = (cfg["sample_batch"], 3, cfg["image"], cfg["image"])
        report.line("| row | img/s | compile s |")
        report.line("| --- | --- | --- |")
        for name in self.rows:
            if name not in self.compiled:
                report.line(f"| {name} | not measured: no compiled model (section 2) | |")
                continue
            model = self.compiled[name].eval()
            try:
                with self.amp():
                    t0 = clock(device)
                    flow.sample(model, shape, y, steps=2, cfg_scale=CFG_SCALE, generator=torch.Generator().manual_seed(0))
                    compile_s = clock(device) - t0
                    t0 = clock(device)
                    flow.sample(model, shape, y, steps=cfg["sample_steps"], cfg_scale=CFG_SCALE,
                                generator=torch.Generator().manual_seed(0))
                    img_s = cfg["sample_batch"] / (clock(device) - t0)
            except Exception as e:
                report.line(f"| {name} | {report.failed(section, name, e)} | |")
                free_memory(device)
                continue
            report.line(f"| {name} | {img_s:.0f} | {compile_s:.0f} |")
            report.values(section, name, img_per_s=img_s, compile_s=compile_s)
        self.compiled = {}
        free_memory(device)

    def attention(self):
        """3. One attention module's forward+backward, compiled, at each token count: median ms,
        compile s, peak MiB; one row per token count as it is measured."""
        section, cfg, device, report = "attention", self.cfg, self.device, self.report
        report.line("| tokens | softmax | linear | DyDiLA |")
        report.line("| --- | --- | --- | --- |")
        for n in cfg["tokens"]:
            side = math.isqrt(n)
            x = torch.randn(1, n, cfg["width"], device=device, requires_grad=True)
            modules, cells = {}, {}
            for kind in ("softmax", "linear", "dydila"):
                try:
                    torch.manual_seed(0)
                    module = self.compile(D.ATTENTIONS[kind](cfg["width"], cfg["heads"]).to(device))
                    with self.amp():
                        t0 = clock(device)
                        module(x, (side, side)).float().sum().backward()
                        compile_s = clock(device) - t0
                    modules[kind] = (module, compile_s)
                except Exception as e:
                    cells[kind] = report.failed(section, f"{kind} {n}", e)
                    free_memory(device)
            with self.amp():
                results = measure({k: m for k, (m, _) in modules.items()}, x, (side, side), 3, device,
                                  min_seconds=cfg["min_seconds"])
            for kind, (module, compile_s) in modules.items():
                if kind in results:
                    sec, mib, _ = results[kind]
                    cells[kind] = f"{1000 * sec:.2f} ms ({compile_s:.0f} s; {mib:.0f} MiB)"
                    report.values(section, f"{kind} {n}", ms=1000 * sec, compile_s=compile_s, peak_mib=mib)
                else:
                    cells[kind] = "out of memory"
            report.line(f"| {n:,} | " + " | ".join(cells[k] for k in ("softmax", "linear", "dydila")) + " |")
            del modules, x
            free_memory(device)

    def command_line(self, folder, smoke, end):
        """5. train_tiny.py on synthetic data with its defaults (--smoke: tiny), stopped (SIGTERM) in time
        to end by `end`: exit code and reason, checkpoint, wall seconds, median img/s of its log lines after the first."""
        run, report = folder / "cli_run", self.report
        args = ["--dataset", "synthetic", "--steps", str(self.cfg["cli_steps"]), "--out-dir", str(run)]
        if smoke:
            args += ["--model", "DyDiLiT-T/4", "--image-size", "16", "--batch-size", "8", "--log-every", "1", "--val-size", "16"]
        command = "python train_tiny.py " + " ".join("OUT" if a == str(run) else a for a in args)
        t0 = time.perf_counter()
        with open(folder / "cli_run.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *args], cwd=folder, stdout=log,
                                    stderr=subprocess.STDOUT)
            grace = self.cfg["cli_grace_s"]
            try:
                code, cut = proc.wait(timeout=max(end - grace - time.perf_counter(), 1)), False
            except subprocess.TimeoutExpired:                     # the deadline: its checkpoint if it can, then the end
                proc.terminate()
                try:
                    code = proc.wait(timeout=max(end - 2 - time.perf_counter(), 1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                cut = True
            finally:
                if proc.poll() is None:                           # the check itself was stopped: no child outlives it
                    proc.kill()
                    proc.wait()
        wall = time.perf_counter() - t0
        lines = [s.strip() for s in (folder / "cli_run.log").read_text(errors="replace").replace("\r", "\n").splitlines()]
        last = next((s for s in reversed(lines) if s), "")
        speeds = [r["img_per_s"] for r in read_log(run / "log.jsonl") if "img_per_s" in r] if (run / "log.jsonl").exists() else []
        img_s = statistics.median(speeds[1:] or speeds) if speeds else math.nan
        ckpt = (run / "ckpt.pt").exists()
        ok = code == 0 and ckpt and not cut
        why = "" if ok else (" stopped at the deadline;" if cut else "") + f" its last line: \"{last[:200]}\";"
        report.line(f"`{command}`: exit {code},{why} checkpoint {'written' if ckpt else 'missing'}, {img_s:.0f} img/s "
                    f"(median of its log lines after the first), {wall:.0f} s wall clock with compilation and the "
                    f"final validation. Its output: {folder / 'cli_run.log'}.")
        report.values("command line", "train_tiny.py", exit=code, checkpoint=int(ckpt), img_per_s=img_s, wall_s=wall)
        if not ok:
            report.failures += 1


def fresh_folder(root):
    """root/<date>-<time> (with -2, -3, ... if taken): this run's own folder."""
    stem = root / time.strftime("%Y%m%d-%H%M%S")
    folder, k = stem, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            k += 1
            folder = stem.with_name(f"{stem.name}-{k}")


def check(args, argv):
    smoke = args.smoke
    cfg = dict(SMOKE if smoke else FULL)
    cfg["backend"] = args.backend or cfg["backend"]
    known = torch._dynamo.list_backends(exclude_tags=())
    if cfg["backend"] not in known:
        raise UserError(f"--backend {cfg['backend']} is not a torch.compile backend: choose one of {', '.join(sorted(known))}")
    if not args.budget_s > 0:
        raise UserError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type != "cuda" and not smoke:
        raise UserError("no CUDA GPU: this check measures one; run it on a GPU, or add --smoke to try its code path on this machine")
    start = time.perf_counter()
    end = start + args.budget_s
    root = Path(args.out_dir).resolve()                           # the child runs elsewhere: no relative path reaches it
    check_writable(root, "--out-dir")
    folder = fresh_folder(root)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 64
    rows = {**ROWS, **(ABLATIONS if args.ablations else {})}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    report = Report(folder)
    cuda = f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    report.line(f"GPU check: {where}; torch {torch.__version__}{cuda}; backend {cfg['backend']}; "
                f"{'bf16 autocast, TF32' if device.type == 'cuda' else 'float32'}; budget {args.budget_s:g} s."
                + (" A smoke run at tiny sizes: its numbers measure nothing." if smoke else ""))
    report.line()
    report.line(f"    python tools/gpu_check.py {' '.join(argv)}".rstrip())
    report.line()
    report.line(f"Training step: batch {cfg['batch']}, {cfg['image']}x{cfg['image']}, rectified flow, fused AdamW; median "
                f"of rounds of {cfg['steps_per_round']} steps, the rows taking turns. Sampling: {cfg['sample_batch']} images, "
                f"{cfg['sample_steps']} Euler steps, guidance {CFG_SCALE:g} (a doubled batch). Attention: one module, width "
                f"{cfg['width']}, {cfg['heads']} heads, batch 1, forward+backward, compiled (median ms; compile s; peak MiB).")
    gpu = GpuCheck(cfg, rows, device, report)
    sections = [("1. Training step, eager", gpu.eager_steps), ("2. Training step, compiled", gpu.compiled_steps),
                ("3. One attention module", gpu.attention), ("4. Sampling, compiled", gpu.sampling)]
    with deadline(end - cfg["cli_reserve_s"]):                    # sections 1-4 leave the command line its reserve
        try:
            for i, (title, section) in enumerate(sections):
                report.line()
                report.line(f"{title} ({time.perf_counter() - start:.0f} s in)")
                report.line()
                try:
                    section()
                except Exception as e:                            # not one row: the section itself (and on)
                    report.line(f"The section failed: {report.failed(title, 'all', e)}.")
                    free_memory(device)
        except OutOfTime:
            report.failures += 1
            report.line()
            report.line(f"Stopped by the deadline in section {i + 1}, {cfg['cli_reserve_s']} s before the end of --budget-s "
                        f"{args.budget_s:g} (the command line's reserve); not measured: "
                        + (", ".join(t for t, _ in sections[i + 1:]) or "the rest of this section") + ".")
    gpu.compiled = {}
    free_memory(device)
    report.line()
    report.line(f"5. The command line ({time.perf_counter() - start:.0f} s in)")
    report.line()
    with deadline(end):
        try:
            gpu.command_line(folder, smoke, end)
        except OutOfTime:
            report.failures += 1
            report.line("Stopped by the deadline before the command line's result was written.")
        except Exception as e:
            report.line(f"The command line could not be run: {report.failed('command line', 'train_tiny.py', e)}.")
    report.line()
    report.line(f"{(time.perf_counter() - start) / 60:.1f} min in all; "
                + (f"{report.failures} part(s) failed or were cut (see above)." if report.failures else "every part measured."))
    print(f"wrote {report.md}, {report.csv}")
    return 1 if report.failures else 0


def get_parser():
    p = argparse.ArgumentParser(description="The speed table on one CUDA GPU: training steps eager and compiled, sampling, "
                                "attention scaling and the real command line, in minutes, held to one deadline.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="gpu_check", help="each run writes into a fresh folder <out-dir>/<date>-<time>: "
                   "gpu_check.md, gpu_check.csv and the command line's run and log")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and the aot_eager backend, on the CPU: tries the code path")
    p.add_argument("--ablations", action="store_true", help="also time each DyDiLA ablation's training step and sampling")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    p.add_argument("--budget-s", type=float, default=420, help="the whole check's deadline in seconds, the command line "
                   "included: sections 1-4 stop 150 s before it (20 s with --smoke); the command line is asked to stop "
                   "(SIGTERM) 30 s before it (5 s) and ends by it")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return cli(check, get_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
