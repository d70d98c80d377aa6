"""
The attention explorer page: explorer.html beside this file is the page; explorer_page() fills its
one marker with the data (bertviz keeps head_view.js beside head_view.py the same way). The data's
layout is described at the top of explorer.html.

A page holds, for every model and t, attention rows of N queries over the keys. Every head at every
layer would be 100 MB for three S/2 runs, so plan_page() decides what to store within a size budget
(--page-mb), in this order: the mean of the heads at the figures' layer (and DyDiLA's parts there),
the mean of the heads at the other layers (nearest first), each head at the figures' layer, then the
rest layer by layer; rows at 4 bits of each row's maximum (--page-bits 8 for 256 levels). Keys are
pooled in p x p blocks only when even the first of these does not fit. Each row's numbers (entropy,
top-5% and partner mass) are computed from the exact, full rows.
"""

import base64
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import dydilit as D
from .attention import partner_mass, partners, router_values, row_entropy, top_mass
from .data import to_uint8
from .files import write_text

TEMPLATE = Path(__file__).resolve().parent / "explorer.html"
MIN_KEYS = 4                                            # pooled keys keep a grid of at least 4 x 4


class LayerMaps(NamedTuple):
    """What the figures show of one attention module on one input."""
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


def parts_of(attn):
    """The parts the page can show of an attention module: "attention", and DyDiLA's others."""
    if not isinstance(attn, D.DyDiLA):
        return ("attention",)
    return ("attention", "base", "redundancy") if attn.differential is not None else ("attention", "base")


# ----------------------------------------------------------------------------------------
# What the page stores
# ----------------------------------------------------------------------------------------

class Plan(NamedTuple):
    """What a page stores (plan_page): every model's rows of these (kind, layer, heads) items."""
    items: tuple                     # (kind, layer, heads): kind "attention" or "parts", heads "mean" or "each"
    bits: int                        # bits per weight of a stored row (of the row's maximum)
    pool: int                        # keys summed in pool x pool blocks (1: every key)
    size: int                        # bytes of the page's data, estimated
    summary: str                     # what is stored and what is left out, in words


def map_bytes(hw, pool, bits, probe):
    """Bytes (base64) of one stored map: N rows of the pooled keys at `bits`, and per row its maximum,
    entropy, top-5% mass (and partner mass) as float32."""
    N, keys = hw[0] * hw[1], (hw[0] // pool) * (hw[1] // pool)
    return 4 * (math.ceil(N * keys * bits / 8) + 4 * N * (4 if probe else 3)) // 3


def plan_page(models, n_t, hw, layer, budget_mb, bits, probe=False):
    """The Plan for models [(depth, heads, parts)], n_t noise levels and the figures' layer, within
    budget_mb megabytes (the first item is stored whatever its size, its keys pooled to fit)."""
    depth = max(d for d, _, _ in models)
    others = sorted((l for l in range(depth) if l != layer), key=lambda l: (abs(l - layer), l))
    order = [("attention", layer, "mean"), ("parts", layer, "mean"), *[("attention", l, "mean") for l in others],
             ("attention", layer, "each"), ("parts", layer, "each"),
             *[(kind, l, heads) for l in others for kind, heads in (("parts", "mean"), ("attention", "each"),
                                                                      ("parts", "each"))]]

    def maps(item):                  # how many maps an item is, over the models and t
        kind, at, heads = item
        return n_t * sum((1 if kind == "attention" else len(parts) - 1) * (1 if heads == "mean" else h)
                         for d, h, parts in models if at < d)

    budget, pool = budget_mb * 1e6, 1
    while maps(order[0]) * map_bytes(hw, pool, bits, probe) > budget and min(hw) // (2 * pool) >= MIN_KEYS \
            and hw[0] % (2 * pool) == hw[1] % (2 * pool) == 0:
        pool *= 2
    one = map_bytes(hw, pool, bits, probe)
    items, size = [order[0]], maps(order[0]) * one
    for item in order[1:]:
        if maps(item) and size + maps(item) * one <= budget:
            items.append(item)
            size += maps(item) * one
    everything = sum(maps(item) for item in order) * map_bytes(hw, 1, bits, probe)     # every key too
    return Plan(tuple(items), bits, pool, size, describe(items, order, bits, pool, hw, size, everything))


def describe(items, order, bits, pool, hw, size, everything):
    """The plan in one line: what is stored, what is left out and how to store it."""
    def layers(kind, heads, among):
        found = sorted(at for k, at, h in among if (k, h) == (kind, heads))
        return f"layer{'s' * (len(found) > 1)} {spans(found)}" if found else ""
    said = [(what, layers(kind, heads, items)) for what, kind, heads in (
        ("the mean of the heads", "attention", "mean"), ("each head", "attention", "each"),
        ("DyDiLA's parts (mean)", "parts", "mean"), ("DyDiLA's parts (each head)", "parts", "each"))]
    stored = "; ".join(f"{what} at {where}" for what, where in said if where)
    left = [item for item in order if item not in items]
    keys = f", keys summed in {pool} x {pool} blocks ({hw[0] // pool} x {hw[1] // pool})" if pool > 1 else ""
    text = f"stored: {stored}; rows at {bits} bits of their maximum{keys}; {megabytes(size)}"
    if left:
        text += (f"; left out: the rest ({megabytes(everything)} in all: visualize.py --page-mb "
                 f"{math.ceil(everything / 1e6 * 10 + 1) / 10:g} stores it)")
    return text


def megabytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def spans(numbers):
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


# ----------------------------------------------------------------------------------------
# The page's data
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def explorer_model(label, inputs, hw, plan, probe=False):
    """One model of the page: inputs[t] is [(attention module, its input (1, N, C))] per layer. Only
    what the plan stores is computed, a layer at a time."""
    attn0 = inputs[0][0][0]
    depth, heads, parts = len(inputs[0]), attn0.num_heads, parts_of(attn0)
    model = {"label": label, "depth": depth, "heads": heads, "parts": list(parts), "slices": {}}
    stored = {}                                                   # layer -> [(kind, heads)]
    for kind, at, each in plan.items:
        if at < depth:
            stored.setdefault(at, []).append((kind, each))
    for t, layers in enumerate(inputs):
        for at, wanted in stored.items():
            attn, x = layers[at]
            maps = {"attention": attn.attention_matrix(x, hw)[0]}               # (h, N, N)
            if any(kind == "parts" for kind, _ in wanted) and len(parts) > 1:
                maps.update({k: v[0] for k, v in attn.attention_parts(x, hw).items() if k in parts[1:]})
            for kind, each in wanted:
                for part in (("attention",) if kind == "attention" else parts[1:]):
                    A = maps[part].double()
                    for head, rows in ((("mean", A.mean(0)),) if each == "mean" else enumerate(A)):
                        model["slices"][f"{part}/{t}/{at}/{head}"] = encode_rows(rows, hw, plan, probe)
    if isinstance(attn0, D.DyDiLA):                                             # routing and banks, every layer
        routes = [[attn.routing(x) for attn, x in layers] for layers in inputs]          # [t][layer] {name: (1, N)}
        model["routing"] = {k: b64(torch.stack([torch.stack([r[k][0] for r in at_t]) for at_t in routes]), np.uint8)
                            for k, v in routes[0][0].items() if k.endswith("_q") and v.dim() == 2}   # (T, depth, N)
        values = [router_values(attn) for attn, _ in inputs[0]]
        model["banks"] = {k: [v[k].tolist() for v in values] for k in ("kernel_q", "lambda_q") if k in values[0]}
    return model


def encode_rows(rows, hw, plan, probe):
    """One stored map: rows (N, N) float64 -> its rows at plan.bits of each row's maximum over the
    pooled keys, and each row's exact numbers."""
    N, p = rows.shape[0], plan.pool
    pooled = rows.abs().view(N, hw[0] // p, p, hw[1] // p, p).sum((2, 4)).flatten(1)   # (N, keys); signed: |A|
    rowmax = pooled.amax(-1)
    levels = (pooled / rowmax.clamp_min(1e-300)[:, None] * (2**plan.bits - 1)).round().to(torch.uint8).flatten()
    if plan.bits == 4:                                                          # two weights a byte, high nibble first
        levels = torch.cat([levels, levels.new_zeros(len(levels) % 2)]).view(-1, 2)
        levels = levels[:, 0] << 4 | levels[:, 1]
    out = {"rows": b64(levels, np.uint8), "rowmax": b64(rowmax, np.float32),
           "entropy": b64(row_entropy(rows), np.float32), "top5": b64(top_mass(rows), np.float32)}
    if probe:
        out["partner"] = b64(partner_mass(rows, partners(hw)), np.float32)
    return out


def b64(tensor, dtype):
    """A tensor as base64 of its little-endian bytes, row-major (what the page's decode() reads)."""
    array = np.ascontiguousarray(tensor.numpy(), dtype=np.dtype(dtype).newbyteorder("<"))
    return base64.b64encode(array.tobytes()).decode()


def explorer_page(path, images, ts, layer, head, models, hw, plan, probe=False):
    """Writes the page. images: per t the image the models saw, (c, S, S) in [-1, 1]; ts: the noise
    levels ([None]: untrained modules); layer, head: the figures' (the page opens there); models:
    explorer_model(...) each; plan: what they store (its summary is shown on the page)."""
    data = {"grid": list(hw), "keys": [hw[0] // plan.pool, hw[1] // plan.pool], "bits": plan.bits,
            "stored": plan.summary, "size": images[0].shape[-1], "channels": images[0].shape[0], "ts": list(ts),
            "layer": layer, "head": head if ("attention", layer, "each") in plan.items else "mean",
            "images": [b64(to_uint8(img).permute(1, 2, 0), np.uint8) for img in images],
            "partners": partners(hw).tolist() if probe else None, "models": models}
    write_text(path, TEMPLATE.read_text().replace("/*DATA*/", json.dumps(data).replace("</", "<\\/")))
