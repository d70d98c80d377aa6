"""
Checkpoints and the run spec. A spec (run_spec) is what builds a run's model and objective, as
plain values; a checkpoint (save_checkpoint) holds it beside the weights, so that any script
rebuilds the run from the file alone (load_run) and a stopped run continues exactly (resume_run).
"""

import argparse
from pathlib import Path
from typing import NamedTuple

import torch

import dydilit as D
from .cli import UserError
from .files import atomic_write

# What builds a run's model and objective, named as train_tiny.py's flags. A checkpoint stores these
# values (its "spec"), so any script rebuilds the model from the file alone.
SPEC_KEYS = ("model", "attn", "no_dynamic_projection", "no_dynamic_kernel", "no_token_differential",
             "image_size", "channels", "num_classes", "objective", "ddpm_schedule", "reading")
CHECKPOINT_HOLDS = ("a checkpoint is a dict holding 'spec' (preset, attention, switches, image size, channels, "
                    "classes, objective: training.checkpoint.run_spec), the 'model' and 'ema' weights, 'classes' "
                    "and 'step', as training.checkpoint.save_checkpoint writes it")


def run_spec(model, attn, image_size, channels, num_classes, no_dynamic_projection=False, no_dynamic_kernel=False,
             no_token_differential=False, objective="flow", ddpm_schedule="linear", reading="ours"):
    """What builds a run's model (model: a preset of dydilit.MODELS; reading: DyDiLA's, one of
    dydilit.READINGS) and its objective, as plain values: a checkpoint stores it; build_model and
    build_objective read it."""
    spec = dict(model=model, attn=attn, no_dynamic_projection=no_dynamic_projection,
                no_dynamic_kernel=no_dynamic_kernel, no_token_differential=no_token_differential,
                image_size=image_size, channels=channels, num_classes=num_classes, objective=objective,
                ddpm_schedule=ddpm_schedule, reading=reading)
    problem = spec_problem(spec)
    if problem:
        raise ValueError(problem)
    return spec


def spec_problem(spec):
    """What is wrong with a spec (None: nothing)."""
    if not isinstance(spec, dict) or set(spec) != set(SPEC_KEYS):
        return f"its spec must have exactly the keys {', '.join(SPEC_KEYS)}"
    checks = [("model", spec["model"] in D.MODELS, f"one of {sorted(D.MODELS)}"),
              ("attn", spec["attn"] in D.ATTENTIONS, f"one of {sorted(D.ATTENTIONS)}"),
              ("objective", spec["objective"] in ("flow", "ddpm"), "flow or ddpm"),
              ("ddpm_schedule", spec["ddpm_schedule"] in ("linear", "cosine"), "linear or cosine"),
              ("reading", spec["reading"] in D.READINGS, f"one of {', '.join(D.READINGS)}"),
              ("reading", not D.READINGS[spec["reading"]] or spec["attn"] == "dydila"
               and not any(spec[k] for k in SPEC_KEYS[2:5]), "ours: a reading is one of full DyDiLA")]
    checks += [(k, type(spec[k]) is int and spec[k] >= 1, "a whole number >= 1")
               for k in ("image_size", "channels", "num_classes")]
    checks += [(k, type(spec[k]) is bool, "True or False") for k in SPEC_KEYS[2:5]]
    return next((f"its spec has {k}={spec[k]!r}, not {want}" for k, ok, want in checks if not ok), None)


def build_model(spec):
    """The model a spec describes: a preset of dydilit.MODELS with softmax (DiT), linear (LiT) or
    DyDiLA attention and its switches."""
    switches = {k: not spec[f"no_{k}"] for k in ("dynamic_projection", "dynamic_kernel", "token_differential")}
    kwargs = switches if not D.READINGS[spec["reading"]] else {"reading": spec["reading"]}    # a reading: all on
    kwargs = kwargs if spec["attn"] == "dydila" else {}
    return D.MODELS[spec["model"]](input_size=spec["image_size"], in_channels=spec["channels"],
                                   num_classes=spec["num_classes"], attn=spec["attn"], attn_kwargs=kwargs)


def build_objective(spec):
    """The objective a spec describes: rectified flow, or DDPM with its noise schedule."""
    return D.FlowMatching() if spec["objective"] == "flow" else D.DDPM(schedule=spec["ddpm_schedule"])


def default_sampler(objective):
    """The sampler when none is asked for: Euler for flow matching, DDIM for DDPM."""
    return "euler" if objective == "flow" else "ddim"


def run_label(args):
    """A run's model in words, from its spec: DiT (softmax), LiT (linear), DyDi-LiT (with the
    DyDiLA designs it was trained without)."""
    if args.attn != "dydila":
        return {"softmax": "DiT (softmax)", "linear": "LiT (linear)"}[args.attn]
    if vars(args).get("reading", "ours") != "ours":
        return f"DyDi-LiT, reading {args.reading}"
    off = [name for name, flag in (("dynamic projection", args.no_dynamic_projection),
                                   ("dynamic kernel", args.no_dynamic_kernel),
                                   ("token differential", args.no_token_differential)) if flag]
    return "DyDi-LiT" + "".join(f", no {name}" for name in off)


def save_checkpoint(path, model, ema, opt, step, spec, classes, args=None):
    """Plain types only (loadable with weights_only=True): the raw modules' weights, the optimizer,
    the step, the spec (run_spec), the class names, the random state, and a run's other arguments
    (args, a dict: the data, the training flags)."""
    problem = spec_problem(spec) or (None if len(classes) == spec["num_classes"] else
                                     f"it names {len(classes)} classes for a model of {spec['num_classes']}")
    if problem:
        raise ValueError(f"save_checkpoint: {problem}")
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "spec": dict(spec), "classes": list(classes), "args": dict(args or {}),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """A checkpoint as save_checkpoint wrote it, or a one-line error that says what one must hold."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # read only what is used
    except Exception as e:                              # cut, corrupt, not a torch file, or pickled objects
        raise UserError(f"cannot load checkpoint {path} ({e.__class__.__name__}): the file is cut, corrupt or not "
                        f"a checkpoint; {CHECKPOINT_HOLDS}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("spec"), dict):
        ckpt["spec"].setdefault("reading", "ours")             # a run from before the readings: DyDiLA as it was
    if not isinstance(ckpt, dict):
        problem = f"it holds a {type(ckpt).__name__}"
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        problem = "it holds a bare state_dict (weights, and nothing that says which model they belong to)"
    else:
        missing = [k for k in ("spec", "model", "ema", "classes", "step") if k not in ckpt]
        problem = (f"it has no {', '.join(repr(k) for k in missing)}" if missing else
                   "its 'args' are not a dict" if not isinstance(ckpt.get("args", {}), dict) else
                   spec_problem(ckpt["spec"]))
    if problem:
        raise UserError(f"{path} is not a dydilit checkpoint: {problem}; {CHECKPOINT_HOLDS}")
    return ckpt


class Run(NamedTuple):
    """A finished or stopped run, rebuilt from its checkpoint by load_run."""
    path: Path                       # its checkpoint
    model: torch.nn.Module           # with the EMA weights, in eval mode, on the CPU
    objective: object                # dydilit.FlowMatching or DDPM
    args: argparse.Namespace         # its arguments (train_tiny.py's flags, where it kept them) and its spec
    step: int
    classes: list


def load_run(path):
    """The Run a checkpoint holds; a one-line error if it holds none."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["spec"])
    try:
        model.load_state_dict(ckpt["ema"])
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{path}: the weights do not fit the model its spec describes; the checkpoint is "
                        f"damaged") from None
    return Run(Path(path), model.eval(), build_objective(ckpt["spec"]),
               argparse.Namespace(**{**ckpt.get("args", {}), **ckpt["spec"]}), ckpt["step"], ckpt["classes"])


def resume_run(path, model, ema, opt, expect):
    """Continue a run: its checkpoint's weights into model and ema, its optimizer state into opt,
    its random state into torch; returns its step. expect: values the checkpoint must have been
    written with (its spec and data, e.g. {**spec, "dataset": "cifar10"}), checked before anything
    is loaded."""
    ckpt = load_checkpoint(path)
    have = {**ckpt.get("args", {}), **ckpt["spec"]}
    changed = [k for k in expect if have.get(k) != expect[k]]
    if changed:
        raise UserError(f"{path} is from another model: it has " + ", ".join(f"{k}={have.get(k)!r}" for k in changed)
                        + " but this run asks for " + ", ".join(f"{k}={expect[k]!r}" for k in changed)
                        + "; pass the same flags or another --out-dir")
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model ({str(e).splitlines()[0]}); use another --out-dir") from None
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and len(rng.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ckpt["step"]
