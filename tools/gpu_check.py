"""
One prepared GPU check: the numbers of the speed table, in one command, held to one deadline.

    python tools/gpu_check.py                 # one CUDA GPU: at most --budget-s (420 s), compilation included
    python tools/gpu_check.py --ablations     # also each DyDiLA ablation in the training-step tables
    python tools/gpu_check.py --smoke         # the same code at tiny sizes, on a CPU (aot_eager): under a minute

Each run writes into a fresh folder of its own, <--out-dir>/<date>-<time>/: gpu_check.md (tables to
paste into docs/BENCHMARKS.md, with the GPU, the torch version and the command), gpu_check.csv, and
the command line's run with its log. Every table line goes to both files as soon as it is
measured, so a check cut short (by its deadline, a crash, the machine taken back) leaves what it
measured. In order, with bf16 autocast on CUDA:
  1. a training step (batch 128, S/2 on 32 x 32, rectified flow, fused AdamW) of DiT, LiT and
     DyDi-LiT without compilation, the models taking turns round by round: a GPU number in a minute;
  2. the same step through torch.compile (Inductor): compile time and peak memory as each model
     compiles, then the step times;
  3. one attention module (S width) forward+backward at 1,024, 4,096 and 16,384 tokens, compiled;
  4. sampling throughput of section 2's compiled models: 50 Euler steps with guidance, images per second;
  5. the real command line: train_tiny.py on synthetic data for 300 steps with its defaults.
A model that fails (a compile error, out of memory) is written with its one-line reason and the
check goes on. Sections 1-4 stop where they are when only the command line's reserve is left; the
command line stops at the deadline; what was not measured is said.
"""

import csv
import dataclasses
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
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                     # the project, one folder up
import dydilit as D                                               # noqa: E402
from training.cli import Parser, UserError, check_writable, cli, real   # noqa: E402
from training.log import read_log                                 # noqa: E402
from training.timing import measure, paired_ratio                 # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model of the tables: DiT's backbone with one attention (and DyDiLA's switches)."""
    name: str
    attn: str
    attn_kwargs: dict = dataclasses.field(default_factory=dict)


VARIANTS = (Variant("DiT", "softmax"), Variant("LiT", "linear"), Variant("DyDi-LiT", "dydila"))
ABLATIONS = tuple(Variant(f"DyDi-LiT, no {name.replace('_', ' ')}", "dydila", {name: False})
                  for name in ("dynamic_projection", "dynamic_kernel", "token_differential"))


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one check measures at: FULL on a GPU, SMOKE (the same code, tiny) on a CPU."""
    model: Callable                  # builds a DyDiLiT: model(input_size=, num_classes=, attn=, attn_kwargs=)
    image: int                       # image side of the training step and of sampling
    batch: int                       # training-step batch
    rounds: int                      # timed rounds of the compiled step (the variants take turns)
    eager_rounds: int                # timed rounds of the eager step
    steps_per_round: int
    sample_batch: int
    sample_steps: int                # Euler steps of a sampling run
    width: int                       # the attention module of section 3: width, heads, token counts
    heads: int
    tokens: tuple
    min_seconds: float               # section 3: fast points run more rounds, up to this long
    cli_steps: int                   # the command line's training steps
    cli_reserve_s: float             # what sections 1-4 leave the command line before the deadline
    cli_grace_s: float               # the command line is asked to stop (SIGTERM) this long before the deadline
    backend: str                     # torch.compile backend


FULL = Sizes(model=D.MODELS["DyDiLiT-S/2"], image=32, batch=128, rounds=5, eager_rounds=3, steps_per_round=10,
             sample_batch=256, sample_steps=50, width=384, heads=6, tokens=(1024, 4096, 16384), min_seconds=1.0,
             cli_steps=300, cli_reserve_s=150, cli_grace_s=30, backend="inductor")
SMOKE = Sizes(model=functools.partial(D.DyDiLiT, hidden_size=32, depth=1, num_heads=2, patch_size=4), image=16,
              batch=4, rounds=2, eager_rounds=2, steps_per_round=2, sample_batch=4, sample_steps=2, width=32, heads=2,
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
    """gpu_check.md (also printed) and gpu_check.csv (section, row: the table line's label, metric,
    value), each line appended and flushed as it comes."""

    def __init__(self, folder):
        self.md, self.csv = folder / "gpu_check.md", folder / "gpu_check.csv"
        self.failures = 0
        with open(self.csv, "w", newline="") as f:
            csv.writer(f).writerow(["section", "row", "metric", "value"])

    def line(self, text=""):
        with open(self.md, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)

    def values(self, section, label, **metrics):
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerows((section, label, k, v) for k, v in metrics.items())

    def failed(self, section, label, e):
        self.failures += 1
        self.values(section, label, failed=reason(e))
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
    """The sections of the check, in order; each writes its table to the report as it measures."""

    def __init__(self, sizes, variants, device, report):
        self.sizes, self.variants, self.device, self.report = sizes, variants, device, report
        self.amp_dtype = torch.bfloat16 if device.type == "cuda" else None
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.amp_dtype else nullcontext
        self.compile = functools.partial(torch.compile, backend=sizes.backend, dynamic=False)
        self.x = torch.randn(sizes.batch, 3, sizes.image, sizes.image, device=device)
        self.y = torch.randint(0, 10, (sizes.batch,), device=device)

    # --- the training step, shared by sections 1 and 2 ------------------------------------

    def build(self, variant):
        torch.manual_seed(0)
        model = self.sizes.model(input_size=self.sizes.image, num_classes=10, attn=variant.attn,
                                 attn_kwargs=variant.attn_kwargs).to(self.device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)

    def step(self, model, opt):
        D.training_step(model, D.FlowMatching(), opt, self.x, self.y, amp_dtype=self.amp_dtype)

    def rounds(self, runs, rounds):
        """Seconds of one step per round for each (model, opt), the variants taking turns, so that a
        slow spell of the machine hits them all."""
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (model, opt) in runs.items():
                t0 = clock(self.device)
                for _ in range(self.sizes.steps_per_round):
                    self.step(model, opt)
                times[name].append((clock(self.device) - t0) / self.sizes.steps_per_round)
        return times

    def step_table(self, section, times, failed):
        """Each variant's ms per step, images per second and the paired ratio over LiT's."""
        batch, report = self.sizes.batch, self.report
        report.line("| model | step ms | img/s | step / LiT's |")
        report.line("| --- | --- | --- | --- |")
        for v in self.variants:
            if v.name in failed:
                report.line(f"| {v.name} | {failed[v.name]} | | |")
                continue
            ms = 1000 * statistics.median(times[v.name])
            ratio = paired_ratio(times[v.name], times["LiT"]) if "LiT" in times else math.nan
            report.line(f"| {v.name} | {ms:.1f} | {batch / ms * 1000:.0f} | {ratio:.2f} |")
            report.values(section, v.name, ms=ms, img_per_s=batch / ms * 1000, over_lit=ratio)

    # --- the sections ------------------------------------------------------------------------

    def eager_steps(self):
        """1. The training step without compilation."""
        section, runs, failed = "training step, eager", {}, {}
        for v in self.variants:
            try:
                runs[v.name] = self.build(v)
                self.step(*runs[v.name])                          # warm-up: allocator, kernels' first launch
            except Exception as e:
                runs.pop(v.name, None)
                failed[v.name] = self.report.failed(section, v.name, e)
                free_memory(self.device)
        times = self.rounds(runs, self.sizes.eager_rounds)
        del runs
        free_memory(self.device)
        self.step_table(section, times, failed)

    def compiled_steps(self, compiled):
        """2. The training step through torch.compile: each variant's compile time and peak memory as it
        compiles, then the step times. Fills `compiled` (name -> compiled model) for section 4."""
        section, runs, failed, device, report = "training step, compiled", {}, {}, self.device, self.report
        report.line("| model | compile s (first step) | peak GiB (a step) |")
        report.line("| --- | --- | --- |")
        for v in self.variants:
            try:
                raw, opt = self.build(v)
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
                failed[v.name] = report.failed(section, v.name, e)
                report.line(f"| {v.name} | {failed[v.name]} | |")
                free_memory(device)
                continue
            runs[v.name] = (model, opt)
            compiled[v.name] = model
            report.line(f"| {v.name} | {compile_s:.0f} | {'-' if math.isnan(peak) else format(peak, '.2f')} |")
            report.values(section, v.name, compile_s=compile_s, peak_gib=peak)
        report.line()
        self.step_table(section, self.rounds(runs, self.sizes.rounds), failed)
        if "DyDi-LiT" in runs and "LiT" in runs:
            report.line()
            report.line("Target: DyDi-LiT's compiled step at most 1.5 times LiT's.")

    def attention(self):
        """3. One attention module's forward+backward, compiled, at each token count: median ms,
        compile s, peak MiB; one line per token count as it is measured."""
        section, sizes, device, report = "attention", self.sizes, self.device, self.report
        report.line("| tokens | softmax | linear | DyDiLA |")
        report.line("| --- | --- | --- | --- |")
        for n in sizes.tokens:
            side = math.isqrt(n)
            x = torch.randn(1, n, sizes.width, device=device, requires_grad=True)
            modules, compile_s, cells = {}, {}, {}
            for kind in ("softmax", "linear", "dydila"):
                try:
                    torch.manual_seed(0)
                    modules[kind] = self.compile(D.ATTENTIONS[kind](sizes.width, sizes.heads).to(device))
                    with self.amp():
                        t0 = clock(device)
                        modules[kind](x, (side, side)).float().sum().backward()
                        compile_s[kind] = clock(device) - t0
                except Exception as e:
                    modules.pop(kind, None)
                    cells[kind] = report.failed(section, f"{kind} {n}", e)
                    free_memory(device)
            with self.amp():
                timings = measure(modules, x, (side, side), 3, device, min_seconds=sizes.min_seconds)
            for kind in modules:
                if kind in timings:
                    ms, mib = 1000 * timings[kind].seconds, timings[kind].mib
                    cells[kind] = f"{ms:.2f} ms ({compile_s[kind]:.0f} s; {mib:.0f} MiB)"
                    report.values(section, f"{kind} {n}", ms=ms, compile_s=compile_s[kind], peak_mib=mib)
                else:
                    cells[kind] = "out of memory"
            report.line(f"| {n:,} | " + " | ".join(cells[k] for k in ("softmax", "linear", "dydila")) + " |")
            del modules, x
            free_memory(device)

    def sampling(self, compiled):
        """4. Sampling throughput of each compiled model of section 2: a 2-step warm-up (compiles), then
        a whole run."""
        section, sizes, device, report = "sampling", self.sizes, self.device, self.report
        flow, y = D.FlowMatching(), torch.arange(sizes.sample_batch, device=device) % 10
        shape = (sizes.sample_batch, 3, sizes.image, sizes.image)
        report.line("| model | img/s | compile s |")
        report.line("| --- | --- | --- |")
        for v in self.variants:
            if v.name not in compiled:
                report.line(f"| {v.name} | not measured: no compiled model (section 2) | |")
                continue
            model = compiled[v.name].eval()
            try:
                with self.amp():
                    t0 = clock(device)
                    flow.sample(model, shape, y, steps=2, cfg_scale=CFG_SCALE,
                                generator=torch.Generator().manual_seed(0))
                    compile_s = clock(device) - t0
                    t0 = clock(device)
                    flow.sample(model, shape, y, steps=sizes.sample_steps, cfg_scale=CFG_SCALE,
                                generator=torch.Generator().manual_seed(0))
                    img_s = sizes.sample_batch / (clock(device) - t0)
            except Exception as e:
                report.line(f"| {v.name} | {report.failed(section, v.name, e)} | |")
                free_memory(device)
                continue
            report.line(f"| {v.name} | {img_s:.0f} | {compile_s:.0f} |")
            report.values(section, v.name, img_per_s=img_s, compile_s=compile_s)
        compiled.clear()
        free_memory(device)

    def command_line(self, folder, smoke, end):
        """5. train_tiny.py on synthetic data with its defaults (--smoke: tiny), stopped (SIGTERM) in time
        to end by `end`: exit code and reason, checkpoint, wall seconds, median img/s of its log lines
        after the first."""
        run, report = folder / "cli_run", self.report
        args = ["--dataset", "synthetic", "--steps", str(self.sizes.cli_steps), "--out-dir", str(run)]
        if smoke:
            args += ["--model", "DyDiLiT-T/4", "--image-size", "16", "--batch-size", "8", "--log-every", "1",
                     "--val-size", "16"]
        command = "python train_tiny.py " + " ".join("OUT" if a == str(run) else a for a in args)
        t0 = time.perf_counter()
        with open(folder / "cli_run.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *args], cwd=folder, stdout=log,
                                    stderr=subprocess.STDOUT)
            code, cut = wait_or_stop(proc, end - self.sizes.cli_grace_s, end)
        wall = time.perf_counter() - t0
        output = (folder / "cli_run.log").read_text(errors="replace").replace("\r", "\n")
        lines = [s.strip() for s in output.splitlines()]
        last = next((s for s in reversed(lines) if s), "")
        logged = read_log(run / "log.jsonl") if (run / "log.jsonl").exists() else []
        speeds = [r["img_per_s"] for r in logged if "img_per_s" in r]
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


def wait_or_stop(proc, stop_at, end):
    """(exit code, whether it was cut): proc's end, or at stop_at a SIGTERM (its checkpoint if it can),
    then a kill at `end`. No child outlives the check, however the check itself is stopped."""
    try:
        try:
            return proc.wait(timeout=max(stop_at - time.perf_counter(), 1)), False
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                return proc.wait(timeout=max(end - 2 - time.perf_counter(), 1)), True
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(), True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------
# The check: setup, sections 1-4 under their deadline, the command line under the last
# ----------------------------------------------------------------------------------------

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
    sizes = SMOKE if args.smoke else FULL
    sizes = dataclasses.replace(sizes, backend=sizes.backend if args.backend is None else args.backend)
    known = torch._dynamo.list_backends(exclude_tags=())
    if sizes.backend not in known:
        raise UserError(f"--backend {sizes.backend} is not a torch.compile backend: choose one of "
                        f"{', '.join(sorted(known))}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise UserError("no CUDA GPU: this check measures one; run it on a GPU, or add --smoke to try its code path "
                        "on this machine")
    start = time.perf_counter()
    root = Path(args.out_dir).resolve()                           # the child runs elsewhere: no relative path
    check_writable(root, "--out-dir")
    folder = fresh_folder(root)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 64
    report = Report(folder)
    write_header(report, sizes, device, args, argv)
    gpu = GpuCheck(sizes, VARIANTS + (ABLATIONS if args.ablations else ()), device, report)
    run_sections(gpu, report, sizes, start, start + args.budget_s - sizes.cli_reserve_s, args.budget_s)
    run_command_line(gpu, report, folder, args.smoke, start, start + args.budget_s)
    report.line()
    report.line(f"{(time.perf_counter() - start) / 60:.1f} min in all; "
                + (f"{report.failures} part(s) failed or were cut (see above)." if report.failures else
                   "every part measured."))
    print(f"wrote {report.md}, {report.csv}")
    return 1 if report.failures else 0


def write_header(report, sizes, device, args, argv):
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()})"
    cuda = f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    report.line(f"GPU check: {where}; torch {torch.__version__}{cuda}; backend {sizes.backend}; "
                f"{'bf16 autocast, TF32' if device.type == 'cuda' else 'float32'}; budget {args.budget_s:g} s."
                + (" A smoke run at tiny sizes: its numbers measure nothing." if args.smoke else ""))
    report.line()
    report.line(f"    python tools/gpu_check.py {' '.join(argv)}".rstrip())
    report.line()
    report.line(f"Training step: batch {sizes.batch}, {sizes.image}x{sizes.image}, rectified flow, fused AdamW; "
                f"median of rounds of {sizes.steps_per_round} steps, the models taking turns. Sampling: "
                f"{sizes.sample_batch} images, {sizes.sample_steps} Euler steps, guidance {CFG_SCALE:g} (a doubled "
                f"batch). Attention: one module, width {sizes.width}, {sizes.heads} heads, batch 1, forward+backward, "
                f"compiled (median ms; compile s; peak MiB).")


def run_sections(gpu, report, sizes, start, end, budget_s):
    """Sections 1-4 in order until `end` (the command line's reserve before the deadline); a section
    that fails as a whole is written with its reason, and the next one runs."""
    compiled = {}                                                 # section 2's compiled models, for section 4
    sections = [("1. Training step, eager", gpu.eager_steps),
                ("2. Training step, compiled", functools.partial(gpu.compiled_steps, compiled)),
                ("3. One attention module", gpu.attention),
                ("4. Sampling, compiled", functools.partial(gpu.sampling, compiled))]
    with deadline(end):
        try:
            for i, (title, section) in enumerate(sections):
                report.line()
                report.line(f"{title} ({time.perf_counter() - start:.0f} s in)")
                report.line()
                try:
                    section()
                except Exception as e:                            # not one model: the section itself
                    report.line(f"The section failed: {report.failed(title, 'all', e)}.")
                    free_memory(gpu.device)
        except OutOfTime:
            report.failures += 1
            report.line()
            report.line(f"Stopped by the deadline in section {i + 1}, {sizes.cli_reserve_s:g} s before the end of "
                        f"--budget-s {budget_s:g} (the command line's reserve); not measured: "
                        + (", ".join(t for t, _ in sections[i + 1:]) or "the rest of this section") + ".")
    compiled.clear()
    free_memory(gpu.device)


def run_command_line(gpu, report, folder, smoke, start, end):
    """Section 5, held to the deadline `end`."""
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


def get_parser():
    p = Parser("The speed table on one CUDA GPU: training steps eager and compiled, attention scaling, sampling and "
               "the real command line, in minutes, held to one deadline.")
    p.add_argument("--out-dir", default="gpu_check", help="each run writes into a fresh folder "
                   "<out-dir>/<date>-<time>: gpu_check.md, gpu_check.csv and the command line's run and log")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and the aot_eager backend, on the CPU: tries the "
                   "code path")
    p.add_argument("--ablations", action="store_true", help="also time each DyDiLA ablation's training step and "
                   "sampling")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    p.add_argument("--budget-s", type=real(0, open_low=True), default=420, help="the whole check's deadline in "
                   "seconds, the command line included: sections 1-4 stop 150 s before it (20 s with --smoke); the "
                   "command line is asked to stop (SIGTERM) 30 s before it (5 s) and ends by it")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return cli(lambda: check(get_parser().parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
