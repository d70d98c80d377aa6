"""
Devices and precision: the device a run uses (pick_device; init_distributed under torchrun), the
memory it has (available_memory), autocast and TF32 (precision_context), and whether the model is
compiled (compiles).
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_memory(device):
    """Bytes a run may use: a GPU's total memory, or the memory the host has available now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:                        # Linux: MemAvailable counts reclaimable caches
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def init_distributed():
    """(ddp, rank, world size, device): DDP when torchrun set RANK (nccl on CUDA, gloo on a CPU)."""
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def precision_context(precision, device):
    """(autocast factory, autocast dtype or None, name): "auto" is bf16 autocast on CUDA, fp32
    elsewhere. TF32 matmuls on CUDA unless fp32 is asked for explicitly."""
    name = precision
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if name == "fp32":
        return nullcontext, None, name
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), torch.bfloat16, name


def compiles(flag, device):
    """--compile as given (True, False); None: on with CUDA, where it fuses DyDiLA's elementwise passes."""
    return device.type == "cuda" if flag is None else flag
