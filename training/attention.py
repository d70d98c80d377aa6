"""
Attention rows and what they measure, for visualize.py and the tools: the smoothness of a row
(row_entropy, top_mass, summarise), retrieval of one key (partners, partner_mass), and the explicit
attention of a model's layers (attention_inputs captures what each attention module sees;
layer_attention gives each layer's N x N weights on an image noised to t).
"""

import math
from contextlib import contextmanager

import torch

import dydilit as D

ATTENTIONS = ("softmax", "linear", "dydila")            # the attention variants, in the order tables show them
LABELS = {"softmax": "softmax (DiT)", "linear": "linear (LiT)", "dydila": "DyDiLA (DyDi-LiT)"}


# ----------------------------------------------------------------------------------------
# A row's numbers: A (..., N) is a row of weights over N keys, or A (..., N, N) a matrix of rows.
# A signed reading of DyDiLA (dydilit.READINGS "c-output", "c") has signed, unnormalised rows: the
# numbers then describe their magnitudes |A| (the same numbers for every other attention)
# ----------------------------------------------------------------------------------------

def row_entropy(A):
    """Normalised entropy of each row of A (..., N): H / log N in [0, 1]. Rows summing to 0 give nan."""
    A = A.double().abs()
    s = A.sum(-1, keepdim=True)
    p = A / s
    h = -torch.xlogy(p, p).sum(-1) / math.log(A.shape[-1])
    return h.masked_fill(s.squeeze(-1) == 0, float("nan"))


def top_mass(A, frac=0.05):
    """Share of each row's weight on its top ceil(frac * N) entries. Rows summing to 0 give nan."""
    A = A.double().abs()
    s = A.sum(-1)
    k = max(1, math.ceil(frac * A.shape[-1] - 1e-9))
    return (A.topk(k, dim=-1).values.sum(-1) / s).masked_fill(s == 0, float("nan"))


def summarise(A):
    """Dict of smoothness numbers over all rows (and heads) of A (..., N, N)."""
    h, m = row_entropy(A).flatten(), top_mass(A).flatten()
    ok = ~torch.isnan(h)
    return {"entropy_mean": h[ok].mean().item(), "entropy_median": h[ok].median().item(),
            "top5_mass_mean": m[ok].mean().item(), "rows": int(ok.numel()), "zero_rows": int((~ok).sum())}


def partners(hw):
    """The copy probe's partner of each token: the same column, half the grid below or above. -> (N,)"""
    H, W = hw
    i = torch.arange(H * W)
    return ((i // W + H // 2) % H) * W + i % W


def partner_mass(A, partner):
    """Share of each query row's weight on its partner key. A (..., N, N); partner (..., N) long,
    the partner's index for each row (broadcast against A's leading dims: partners(hw) for the copy
    probe, a batch of them for recall) -> (..., N). 1/N for a uniform row, 1 for a row that
    retrieves exactly its partner; a row that attends to nothing (all-zero ReLU features) puts 0 there."""
    A = A.double().abs()
    index = partner.expand(A.shape[:-1])[..., None]              # (..., N, 1)
    s = A.sum(-1)
    return torch.where(s > 0, A.gather(-1, index)[..., 0] / s, 0.0)


# ----------------------------------------------------------------------------------------
# A model's layers
# ----------------------------------------------------------------------------------------

@contextmanager
def attention_inputs(blocks):
    """Inside: every forward of blocks[i].attn appends (that attention module, its input x) to the
    yielded list, in the order they run."""
    seen = []

    def keep_input(module, inputs):                             # returns None: the inputs pass through unchanged
        seen.append((module, inputs[0]))
    handles = [block.attn.register_forward_pre_hook(keep_input) for block in blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def noised(objective, x0, t, noise):
    """x0 noised to t as the objective does it, and the model's time input: x_t, t (1,)."""
    if isinstance(objective, D.DDPM):
        steps = torch.full((1,), min(objective.num_timesteps - 1, round(t * objective.num_timesteps)))
        return objective.q_sample(x0, steps, noise), steps.float() / objective.num_timesteps
    tt = torch.full((1,), float(t))
    return objective.interpolate(x0, tt, noise), tt


@torch.no_grad()
def layer_inputs(model, objective, x0, y, t, noise):
    """Runs a DyDiLiT on x0 (1, c, S, S) noised to t: [(attention module, its input (1, N, C))] per block."""
    xt, tt = noised(objective, x0, t, noise)
    with attention_inputs(model.blocks) as seen:
        model(xt, tt, y)
    return seen


@torch.no_grad()
def layer_attention(model, objective, x0, y, t, noise):
    """Each block's explicit attention weights on x0 noised to t: (depth, h, N, N)."""
    return torch.stack([attn.attention_matrix(x, model.hw)[0] for attn, x in layer_inputs(model, objective, x0, y, t,
                                                                                           noise)])


def router_values(attn):
    """What each of a DyDiLA module's router choices stands for: {name: (n,) values}: projector
    numbers 1..n_P, the current exponents g, the current lambdas (routers that exist only)."""
    values = {"kernel_q": attn.kernel_q.exponents, "kernel_k": attn.kernel_k.exponents}
    if attn.differential is not None:
        values.update(lambda_q=attn.differential.lambda_q, lambda_k=attn.differential.lambda_k)
        values.update({name: torch.arange(1.0, len(side.projectors) + 1)
                       for name, side in (("proj_q", attn.redundancy_q), ("proj_k", attn.redundancy_k))})
    return {name: v.detach().float() for name, v in values.items()}
