"""
The attention explorer page: explorer.html beside this file is the page; explorer_page() fills its
one marker with the data (bertviz keeps head_view.js beside head_view.py the same way). The data's
layout is described at the top of explorer.html.
"""

import base64
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import dydilit as D
from .attention import partner_mass, partners, router_values, row_entropy, top_mass
from .data import to_uint8
from .files import write_text

TEMPLATE = Path(__file__).resolve().parent / "explorer.html"


class LayerMaps(NamedTuple):
    """What the page shows of one attention module on one input."""
    maps: dict                       # {"attention": (h, N, N)}; DyDiLA also "base", "redundancy" (attention_parts)
    routing: dict                    # DyDiLA: the query side's choice per token {"proj_q", "kernel_q", "lambda_q"}
    banks: dict                      # DyDiLA: {"kernel_q": exponents, "lambda_q": lambdas}, as lists


def layer_maps(attn, x, hw):
    """LayerMaps of an attention module on its input x (1, N, C)."""
    maps, routing, banks = {"attention": attn.attention_matrix(x, hw)[0]}, {}, {}
    if isinstance(attn, D.DyDiLA):
        parts = attn.attention_parts(x, hw)
        maps.update({k: parts[k][0] for k in ("base", "redundancy") if k in parts})
        routing = {k: v[0] for k, v in attn.routing(x).items() if k.endswith("_q")}
        values = router_values(attn)
        banks = {k: values[k].tolist() for k in ("kernel_q", "lambda_q") if k in values}
    return LayerMaps(maps, routing, banks)


def explorer_model(label, grid, hw, probe=False):
    """One model of the page from grid[t][layer], a LayerMaps for every t and layer: its maps stacked
    (T, depth, h, N, N), each row quantised to uint8 of its maximum, with each row's exact numbers
    (entropy / log N, top-5% mass; with probe, copy-probe runs, the partner mass); its routing
    (T, depth, N); its banks per layer."""
    first = grid[0][0]
    model = {"label": label, "depth": len(grid[0]), "heads": first.maps["attention"].shape[0], "maps": {}}
    for part in first.maps:
        A = torch.stack([torch.stack([cell.maps[part] for cell in layers]) for layers in grid]).double()  # T,L,h,N,N
        rowmax = A.amax(-1)                                                       # (T, depth, h, N)
        full = torch.cat([A, A.mean(2, keepdim=True)], 2)                          # (T, depth, h + 1, N, N): + the mean
        model["maps"][part] = {"rows": b64((A / rowmax.clamp_min(1e-300)[..., None] * 255).round(), np.uint8),
                               "rowmax": b64(rowmax, np.float32),
                               "entropy": b64(row_entropy(full), np.float32), "top5": b64(top_mass(full), np.float32)}
        if probe:
            model["maps"][part]["partner"] = b64(partner_mass(full, partners(hw)), np.float32)
    if first.routing:                                                             # DyDiLA: routing and banks
        model["routing"] = {k: b64(torch.stack([torch.stack([cell.routing[k] for cell in layers]) for layers in grid]),
                                   np.uint8) for k in first.routing}              # (T, depth, N) each
        model["banks"] = {k: [cell.banks[k] for cell in grid[0]] for k in first.banks}
    return model


def b64(tensor, dtype):
    """A tensor as base64 of its little-endian bytes, row-major (what the page's decode() reads)."""
    array = np.ascontiguousarray(tensor.numpy(), dtype=np.dtype(dtype).newbyteorder("<"))
    return base64.b64encode(array.tobytes()).decode()


def explorer_page(path, images, ts, layer, head, models, hw, probe=False):
    """Writes the page. images: per t the image the models saw, (c, S, S) in [-1, 1]; ts: the noise
    levels ([None]: untrained modules); layer, head: the figures' (the page's defaults); models:
    explorer_model(...) each."""
    data = {"grid": list(hw), "patch": images[0].shape[-1] // hw[1], "size": images[0].shape[-1],
            "channels": images[0].shape[0], "ts": list(ts), "layer": layer, "head": head,
            "images": [b64(to_uint8(img).permute(1, 2, 0), np.uint8) for img in images],
            "partners": partners(hw).tolist() if probe else None, "models": models}
    write_text(path, TEMPLATE.read_text().replace("/*DATA*/", json.dumps(data).replace("</", "<\\/")))
