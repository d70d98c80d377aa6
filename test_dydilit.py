"""Tests: first the library, dydilit.py (the O(N) paths equal the explicit N x N ones, routing
follows the equations, precision, the model, objectives, learning, clear errors); then the
scripts: train_tiny.py (the real loaders on fabricated files, runs, signals, exact resume, DDP,
errors), visualize.py and tools/ (metrics, every figure). CPU only, offline: `python -m pytest -q`."""

import copy
import csv
import gzip
import itertools
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dydilit as D
import train_tiny as T
import visualize as V
from tools import ablation, bench

HW = (6, 10)                    # a non-square token grid


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path, monkeypatch):
    """No test reads or writes the folder pytest runs in (a user's runs/, viz/ or data/ are there)."""
    monkeypatch.chdir(tmp_path)
N = HW[0] * HW[1]


def tokens(B=2, C=32, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, N, C, generator=g, dtype=dtype)


def explicit_forward(m, x, hw):
    """The slow path: the module's own N x N weights applied to V, plus DWC(V), then proj."""
    A = m.attention_matrix(x, hw)                               # (B, h, N, N)
    B, N_, C = x.shape
    h = m.num_heads
    v = m.qkv(x).view(B, N_, 3, h, C // h)[:, :, 2].transpose(1, 2)  # (B, h, N, d)
    o = A.to(v.dtype) @ v
    if getattr(m, "dwc", None) is not None:
        d = C // h
        grid = v.transpose(2, 3).reshape(B * h, d, *hw)        # every head through the same conv
        o = o + m.dwc(grid).reshape(B, h, d, N_).transpose(2, 3)
    return m.proj(o.transpose(1, 2).reshape(B, N_, C))


SWITCHES = list(itertools.product([False, True], repeat=3))


def make_attention(kind, C=32, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    return D.ATTENTIONS[kind](C, heads, **kw).double()


# ---------------------------------------------------------------------------------------
# Attention: the O(N) forward == the explicit N x N path
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["softmax", "linear", "dydila"])
def test_forward_matches_explicit_attention(kind):
    m, x = make_attention(kind), tokens()
    torch.testing.assert_close(m(x, HW), explicit_forward(m, x, HW), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dp,dk,td", SWITCHES)
def test_dydila_all_switch_combinations_match_explicit(dp, dk, td):
    m = make_attention("dydila", dynamic_projection=dp, dynamic_kernel=dk, token_differential=td)
    x = tokens()
    torch.testing.assert_close(m(x, HW), explicit_forward(m, x, HW), rtol=1e-6, atol=1e-6)


def test_linear_attention_without_dwc_matches_explicit():
    m, x = make_attention("linear", dwc_kernel_size=0), tokens()
    assert m.dwc is None
    torch.testing.assert_close(m(x, HW), explicit_forward(m, x, HW), rtol=1e-6, atol=1e-6)


def test_dwc_on_the_channels_last_view_matches_the_nchw_conv_with_gradients():
    m, x = make_attention("linear"), tokens()
    B, N_, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    v = m.qkv(x).view(B, N_, 3, h, d)[:, :, 2].transpose(1, 2).detach()  # (B, h, N, d), a strided view like forward's
    outs = []
    for path in ("channels_last", "nchw"):
        m.zero_grad()
        v_ = v.clone().requires_grad_()
        if path == "channels_last":
            o = m.local(v_, HW)
        else:
            o = m.dwc(v_.transpose(2, 3).reshape(B * h, d, *HW)).reshape(B, h, d, N_).transpose(2, 3)
        o.backward(torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view(o.shape))
        outs.append((o.detach(), v_.grad, m.dwc.weight.grad.clone(), m.dwc.bias.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_all_switches_off_is_linear_attention():
    lin = make_attention("linear")
    dy = make_attention("dydila", dynamic_projection=False, dynamic_kernel=False, token_differential=False)
    dy.load_state_dict(lin.state_dict())                        # strict: the same weights, nothing else
    assert dy.kernel_q.exponents.tolist() == [1.0] and dy.routing(tokens()) == {}
    x = tokens()
    torch.testing.assert_close(dy(x, HW), lin(x, HW), rtol=0, atol=0)
    # and the switches really switch: with any design on, the output differs
    dy_on = make_attention("dydila", dynamic_projection=False, dynamic_kernel=True, token_differential=False)
    dy_on.load_state_dict(lin.state_dict(), strict=False)
    assert not torch.allclose(dy_on(x, HW), lin(x, HW))


@pytest.mark.parametrize("kind", ["softmax", "linear", "dydila"])
def test_attention_rows_are_distributions(kind):
    m, x = make_attention(kind), tokens()
    A = m.attention_matrix(x, HW)
    assert A.shape == (2, 4, N, N)
    assert (A >= 0).all()
    # rows sum to S / (S + eps), S the unnormalised row sum: 1 up to eps. The one exception
    # in linear attention: a query whose features are all zero (ReLU of an all-negative
    # head vector) attends to nothing, and its row is exactly 0.
    rows = A.sum(-1)                                            # (B, h, N)
    if kind == "softmax":
        torch.testing.assert_close(rows, torch.ones_like(rows))
        return
    q, k, _ = m.features(x)
    S = (q * k.sum(2, keepdim=True)).sum(-1)                    # q_i . sum_j k_j
    torch.testing.assert_close(rows, S / (S + m.eps), rtol=0, atol=1e-12)
    assert ((rows - 1).abs() < 1e-5).float().mean() > 0.95    # almost every row is a distribution
    assert torch.equal(rows[S == 0], torch.zeros_like(rows[S == 0]))


def plain_focused_kernel(x, g):
    """relu(x)^g ||relu(x)|| / ||relu(x)^g||, float64, 0 for a row with no positive entry."""
    r = F.relu(x)
    return r ** g * r.norm(dim=-1, keepdim=True) / (r ** g).norm(dim=-1, keepdim=True).clamp_min(1e-300)


def test_focused_kernel_is_its_formula_in_value_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    for g in (1, 2, 3.5):
        torch.testing.assert_close(D.focused_kernel(x, g), plain_focused_kernel(x, g))
    torch.testing.assert_close(D.focused_kernel(x, 1), F.relu(x))
    # norm preserved, mass moves to the largest coordinates
    torch.testing.assert_close(D.focused_kernel(x, 3).norm(dim=-1), F.relu(x).norm(dim=-1))
    assert (D.focused_kernel(x, 4).amax(-1) >= F.relu(x).amax(-1) - 1e-12).all()
    # one learnable exponent per token: gradients for x and g as the plain formula's (rows with a positive entry)
    g = (1 + torch.rand(2, 1, 5, 1, dtype=torch.float64) * 3).requires_grad_()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    G = torch.randn_like(x)
    grads_plain = torch.autograd.grad((plain_focused_kernel(a, g) * G).sum(), [a, g])
    grads = torch.autograd.grad((D.focused_kernel(b, g) * G).sum(), [b, g])
    for got, want in zip(grads, grads_plain):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(D.focused_kernel, (b, g))
    # a row with no positive entry gives zeros and zero gradients, not NaN; huge inputs do not overflow
    z = torch.full((4, 8), -1.0, requires_grad=True)
    e = torch.tensor(2.5, requires_grad=True)
    out = D.focused_kernel(z, e)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4, 8)) and torch.equal(z.grad, torch.zeros(4, 8)) and e.grad == 0
    assert torch.isfinite(D.focused_kernel(torch.full((2, 8), 1e30), 4.5)).all()


# ---------------------------------------------------------------------------------------
# DyDiLA: hard routing, learnable banks, gradients
# ---------------------------------------------------------------------------------------

def test_routing_is_hard_and_each_token_follows_the_equations():
    m, x = make_attention("dydila", C=32, heads=4, seed=3), tokens(seed=4)
    r = m.routing(x)
    assert set(r) == {"proj_q", "proj_k", "kernel_q", "kernel_k", "lambda_q", "lambda_k"}
    assert all(v.shape == (2, N) and v.dtype == torch.long for v in r.values())
    routers = {"proj_q": m.redundancy_q.router, "proj_k": m.redundancy_k.router, "kernel_q": m.kernel_q.router,
               "kernel_k": m.kernel_k.router, "lambda_q": m.differential.router_q, "lambda_k": m.differential.router_k}
    for name, router in routers.items():                        # the choice: argmax_c (X_i R)_c
        assert torch.equal(r[name], (x @ router.weight.T).argmax(-1)), name
        assert len(r[name].unique()) > 1, name                  # spread choices: the check below is not vacuous
    # every token, one at a time: q~_i = relu(phi_g(q_i) - lambda phi_g(q'_i)), q'_i = X_i W^{u_i},
    # with g = g_{c_i} and lambda = Lambda_{l_i} picked by that token's argmax
    h, d = 4, 8
    q_feat, k_feat, _ = m.features(x)
    for side, feat, W0 in (("q", q_feat, m.qkv.weight[:32]), ("k", k_feat, m.qkv.weight[32:64])):
        proj, kern = getattr(m, f"redundancy_{side}"), getattr(m, f"kernel_{side}")
        bank, b0 = getattr(m.differential, f"lambda_{side}"), m.qkv.bias[:32] if side == "q" else m.qkv.bias[32:64]
        for b, i in itertools.product(range(2), range(N)):
            xi = x[b, i]
            t = (W0 @ xi + b0).view(h, d)                       # q_i, per head
            t_r = (proj.projectors[r[f"proj_{side}"][b, i]].weight @ xi).view(h, d)  # q'_i
            g = kern.exponents[r[f"kernel_{side}"][b, i]]
            lam = bank[r[f"lambda_{side}"][b, i]]
            want = F.relu(plain_focused_kernel(t, g) - lam * plain_focused_kernel(t_r, g))
            torch.testing.assert_close(feat[b, :, i], want, msg=f"{side} token {b},{i}")


def test_banks_start_spread_and_stay_valid_after_a_huge_step():
    m = make_attention("dydila")
    for bank in (m.kernel_q.exponents, m.kernel_k.exponents, m.differential.lambda_q, m.differential.lambda_k):
        assert bank.shape == (9,) and len(bank.unique()) == 9   # distinct options: the choice matters from step 0
    torch.testing.assert_close(m.kernel_q.exponents, torch.linspace(1.5, 4.5, 9, dtype=torch.float64))
    one = make_attention("dydila", num_kernels=1, num_lambdas=1)
    assert one.kernel_q.router is None and one.differential.router_q is None and set(one.routing(tokens())) == {"proj_q", "proj_k"}
    # exponents are >= 1 by construction, whatever the optimiser does
    opt = torch.optim.SGD([m.kernel_q.theta, m.kernel_k.theta], lr=1e6)
    (m(tokens(), HW) ** 2).sum().backward()
    opt.step()
    assert (m.kernel_q.exponents >= 1).all() and (m.kernel_k.exponents >= 1).all()
    assert torch.isfinite(m(tokens(), HW)).all()


def test_every_router_exponent_and_lambda_learns_in_a_short_run():
    torch.manual_seed(0)
    m = D.DyDiLA(32, 4)
    x = torch.randn(8, N, 32)
    target = torch.randn(8, N, 32)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    touched = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        ((m(x, HW) - target) ** 2).mean().backward()
        for n, p in m.named_parameters():
            touched[n] += p.grad.abs()
        opt.step()
    learned = [n for n in touched if "router" in n or "theta" in n or "lambda" in n]
    assert len(learned) == 10                                   # 6 routers, 2 exponent banks, 2 lambda banks
    for n in learned:
        assert (touched[n] > 0).all(), f"{n}: an entry got no gradient in 5 steps: {touched[n]}"
        assert not torch.equal(m.get_parameter(n), before[n]), n
    for W in [*m.redundancy_q.projectors, *m.redundancy_k.projectors]:
        assert W.weight.grad.abs().max() > 0


def test_dydila_compiles_as_one_graph_with_the_same_values_and_gradients():
    # fullgraph=True raises on a graph break; aot_eager traces forward and backward without code generation
    m, x = make_attention("dydila", C=32, heads=4, seed=5), tokens(seed=6).requires_grad_()
    G = torch.randn(2, N, 32, dtype=torch.float64)
    params = [x, *m.parameters()]
    want = torch.autograd.grad((m(x, HW) * G).sum(), params)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad((compiled(x, HW) * G).sum(), params)
    torch.testing.assert_close(compiled(x, HW), m(x, HW))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_whole_model_compiles_as_one_graph_with_the_same_values_and_gradients():
    # no host sync left in the model's forward (the label range check is skipped while compiling)
    torch.manual_seed(0)
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4).eval()
    for w in [model.final_linear.weight] + [b.adaLN_modulation[1].weight for b in model.blocks]:
        torch.nn.init.normal_(w, std=0.1)                       # not adaLN-zero: the attention shows in the output
    x, t, y = batch(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
    want = torch.autograd.grad(model(x, t, y).square().sum(), list(model.parameters()))
    got = torch.autograd.grad(compiled(x, t, y).square().sum(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_no_quadratic_memory_at_65536_tokens():
    """An N x N float32 matrix per head would be 16 GiB here; record the largest tensor made."""

    class LargestTensor(TorchFunctionMode):
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    torch.manual_seed(0)
    C, n = 16, 65_536
    m = D.DyDiLA(C, 2)
    x = torch.randn(1, n, C)
    with torch.no_grad(), LargestTensor() as mode:
        y = m(x, (256, 256))
    assert y.shape == (1, n, C) and torch.isfinite(y).all()
    assert mode.largest <= 4 * n * C, f"largest intermediate has {mode.largest} elements"


def test_bf16_autocast_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    m = D.DyDiLA(64, 4)
    x = 30 * torch.randn(2, N, 64)                              # large activations: relu(x)^4.5 would overflow bf16 naively
    y32 = m(x, HW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x, HW)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 0.03, rel


# ---------------------------------------------------------------------------------------
# DyDi-LiT
# ---------------------------------------------------------------------------------------

def batch(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.rand(B, generator=g), torch.randint(0, model.num_classes, (B,), generator=g)


@pytest.mark.parametrize("name", sorted(D.MODELS))
def test_presets_output_shape_and_zero_at_init(name):
    torch.manual_seed(0)
    model = D.MODELS[name](input_size=16, num_classes=5).eval()
    size = {"T": (192, 6, 3), "S": (384, 12, 6), "B": (768, 12, 12)}[name.split("-")[1][0]]
    assert (model.blocks[0].attn.dim, len(model.blocks), model.blocks[0].attn.num_heads) == size
    assert model.patch_size == int(name[-1])
    x, t, y = batch(model)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))              # DiT: adaLN-Zero + zero final layer


@pytest.mark.parametrize("attn", ["softmax", "linear", "dydila"])
def test_cfg(attn):
    torch.manual_seed(0)
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4, attn=attn).eval()
    with torch.no_grad():
        for p in model.parameters():                            # leave the all-zero init
            p.add_(0.05 * torch.randn_like(p))
        x, t, y = batch(model, B=3)
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 4))
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 2.5), uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4, class_dropout_prob=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t, y = batch(model)
        null = torch.full_like(y, 4)
        model.train()
        torch.testing.assert_close(model(x, t, y), model.eval()(x, t, null))  # p = 1: every label dropped
        assert not torch.allclose(model.eval()(x, t, y), model(x, t, null))


def test_position_embedding_is_dits_channel_order():
    # DiT / MAE (get_2d_sincos_pos_embed), written independently in numpy: meshgrid(w, h), "w goes
    # first": the first half of the channels encodes the column, the second the row; row-major tokens
    H, W, dim = 3, 5, 16
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    def one_d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_w, grid_h = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))  # (H, W) each
    want = np.concatenate([one_d(grid_w), one_d(grid_h)], axis=1)                       # (H*W, dim)
    torch.testing.assert_close(D.sincos_pos_embed(dim, H, W), torch.from_numpy(want).float())


def test_timestep_embedding_at_ddpm_steps_equals_dits():
    k = torch.arange(1000)
    half = 128                                                  # DiT's TimestepEmbedder at the integer steps k
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = k.float()[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t = k.float() / 1000                                        # what DDPM gives the model
    assert not torch.equal(1000 * t, k.float())                 # (the naive product misses some steps)
    assert torch.equal(D.timestep_embedding(t, 256), want)
    # between the steps, the embedding is that of 1000 t
    t = torch.rand(64)
    a = (1000 * t)[:, None] * freqs[None]
    torch.testing.assert_close(D.timestep_embedding(t, 256), torch.cat([a.cos(), a.sin()], dim=-1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("attn", ["softmax", "linear", "dydila"])
def test_float64_model_runs(attn):
    torch.manual_seed(0)
    model = D.MODELS["DyDiLiT-T/4"](input_size=16, num_classes=3, attn=attn).double()
    for w in [model.final_linear.weight] + [b.adaLN_modulation[1].weight for b in model.blocks]:
        torch.nn.init.normal_(w, std=0.1)
    x, t, y = batch(model)
    out = model(x.double(), t, y)
    assert out.dtype == torch.float64 and out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


# ---------------------------------------------------------------------------------------
# Objectives and samplers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_schedule_endpoints(schedule):
    ddpm = D.DDPM(1000, schedule)
    ab = ddpm.alphas_cumprod
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.999 and ab[-1] < 1e-4
    if schedule == "linear":
        assert math.isclose(ddpm.betas[0], 1e-4) and math.isclose(ddpm.betas[-1], 0.02)


def test_ddpm_q_sample_moments():
    ddpm = D.DDPM()
    x0 = torch.full((20_000, 1, 1, 1), 0.7)
    for step in (0, 250, 999):
        steps = torch.full((20_000,), step)
        xt = ddpm.q_sample(x0, steps, torch.randn_like(x0))
        ab = ddpm.alphas_cumprod[step].item()
        assert abs(xt.mean() - math.sqrt(ab) * 0.7) < 0.03
        assert abs(xt.var() - (1 - ab)) < 0.03


class ExactDenoiser(torch.nn.Module):
    """The exact prediction when the data is one image `target`: eps for DDPM, velocity for flow."""

    def __init__(self, target, ddpm=None):
        super().__init__()
        self.target, self.ddpm = target, ddpm

    def forward(self, x, t, y):
        if self.ddpm is None:                                   # x = (1 - t) x0 + t e  =>  e - x0 = (x - x0) / t
            return (x - self.target) / t.view(-1, 1, 1, 1)
        ab = self.ddpm.alphas_cumprod[(t * self.ddpm.num_timesteps).round().long()].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.target) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_ddpm_samplers_reach_target_and_are_deterministic(sampler):
    ddpm = D.DDPM(1000, "cosine")
    target = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    y = torch.zeros(2, dtype=torch.long)
    out = ddpm.sample(ExactDenoiser(target, ddpm), target.shape, y, steps=25, generator=torch.Generator().manual_seed(0), sampler=sampler)
    torch.testing.assert_close(out, target, rtol=1e-3, atol=1e-3)
    # with a real (random) model: right shape, and the same generator seed gives the same samples
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = lambda seed: ddpm.sample(model, (2, 3, 8, 8), y, steps=5, cfg_scale=2.0,
                                   generator=torch.Generator().manual_seed(seed), sampler=sampler)
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_flow_interpolation_endpoints():
    x0, e = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(D.FlowMatching.interpolate(x0, torch.zeros(3), e), x0)
    torch.testing.assert_close(D.FlowMatching.interpolate(x0, torch.ones(3), e), e)
    torch.testing.assert_close(D.FlowMatching.interpolate(x0, torch.full((3,), 0.25), e), 0.75 * x0 + 0.25 * e)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_sampler_reaches_target_under_exact_velocity(sampler):
    target = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    y = torch.zeros(2, dtype=torch.long)
    out = D.FlowMatching().sample(ExactDenoiser(target), target.shape, y, steps=10,
                                  generator=torch.Generator().manual_seed(0), sampler=sampler)
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Learning: the training step lowers the loss
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", [D.FlowMatching(), D.DDPM()], ids=["flow", "ddpm"])
def test_training_lowers_loss(objective):
    torch.manual_seed(0)
    model = D.MODELS["DyDiLiT-T/4"](input_size=16, num_classes=2, depth=2)
    ema = copy.deepcopy(model).eval()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x0 = torch.stack([torch.stack([xx, yy, -xx]), torch.stack([(3 * xx).sin(), (3 * yy).cos(), xx * yy])]).repeat(4, 1, 1, 1)
    y = torch.tensor([0, 1]).repeat(4)                          # 8 images: 2 fixed pictures, one per class
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g)
    t_eval = torch.linspace(0.05, 0.95, 8)
    if isinstance(objective, D.DDPM):
        t_eval = (t_eval * objective.num_timesteps).long()

    def val_loss(m):
        m.eval()
        with torch.no_grad():
            return objective.losses(m, x0, y, t_eval, noise)[0].mean().item()

    before = val_loss(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    for _ in range(200):
        out = D.training_step(model, objective, opt, x0, y, grad_clip=1.0)
        D.update_ema(ema, model, decay=0.9)
    after = val_loss(model)
    assert math.isfinite(out["loss"].item()) and out["losses"].shape == (8,)
    assert after < 0.5 * before, (before, after)
    assert val_loss(ema) < 0.7 * before


def test_ema_update():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    w_a, w_b = a.weight.detach().clone(), b.weight.detach().clone()
    D.update_ema(a, b, decay=0.75)
    torch.testing.assert_close(a.weight, 0.75 * w_a + 0.25 * w_b)
    D.update_ema(a, b, decay=0.0)
    torch.testing.assert_close(a.weight, w_b)


# ---------------------------------------------------------------------------------------
# Bad input: one clear ValueError each
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["softmax", "linear", "dydila"])
def test_attention_input_errors(kind):
    m = make_attention(kind)
    with pytest.raises(ValueError, match=r"x must be \(B, N, C\) tokens, got shape \(60, 32\)"):
        m(tokens()[0], HW)
    with pytest.raises(ValueError, match=r"N = 60 tokens does not match hw = \(6, 9\)"):
        m(tokens(), (6, 9))
    with pytest.raises(ValueError, match="x has C = 16 channels but the attention was built with dim = 32"):
        m(tokens(C=16), HW)
    with pytest.raises(ValueError, match=r"N = 60 tokens does not match"):
        m.attention_matrix(tokens(), (5, 5))
    for hw in (None, 8, (6, 10, 1)):
        with pytest.raises(ValueError, match=r"hw must be the token grid \(H, W\), a pair of ints"):
            m(tokens(), hw)
    with pytest.raises(ValueError, match="dim = 0 must be >= 1"):
        D.ATTENTIONS[kind](0, 1)
    if kind == "dydila":
        with pytest.raises(ValueError, match=r"x must be \(B, N, 32\) tokens, got shape \(2, 60, 16\)"):
            m.routing(tokens(C=16))


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn="flash"), r"unknown attention 'flash': choose one of \['dydila', 'linear', 'softmax'\]"),
    (dict(input_size=30, patch_size=4), "image size 30 is not divisible by patch size 4"),
    (dict(hidden_size=64, num_heads=3), "dim = 64 is not divisible by num_heads = 3"),
    (dict(attn_kwargs=dict(num_projectors=0)), "num_projectors = 0 must be a whole number >= 1"),
    (dict(attn_kwargs=dict(num_kernels=0)), "num_kernels = 0 must be a whole number >= 1"),
    (dict(attn_kwargs=dict(num_lambdas=2.5)), "num_lambdas = 2.5 must be a whole number >= 1"),
    (dict(attn="linear", attn_kwargs=dict(dwc_kernel_size=4)), "dwc_kernel_size = 4 must be odd"),
])
def test_model_construction_errors(kwargs, message):
    base = dict(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match=message):
        D.DyDiLiT(**{**base, **kwargs})


def test_model_input_errors():
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    x, t, y = batch(model)
    with pytest.raises(ValueError, match="labels must be integers in \\[0, 3\\] \\(or 4 for the null class\\), got range \\[0, 7\\]"):
        model(x, t, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="labels must be integers in"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"labels must be integers \(torch.long\), got torch.float32"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, 8, 8\), got shape \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"t and y must be \(B,\) = \(2,\)"):
        model(x, t[:1], y)
    for bad in (torch.tensor([0.5, 1.5]), torch.tensor([-0.1, 0.5]), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match=r"t must be times in \[0, 1\]"):
            model(x, bad, y)


def test_objective_errors():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic': choose 'linear' or 'cosine'"):
        D.DDPM(schedule="quadratic")
    with pytest.raises(ValueError, match="unknown t_sampling 'beta'"):
        D.FlowMatching(t_sampling="beta")
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown sampler 'euler' for DDPM"):
        D.DDPM().sample(None, (1, 1, 2, 2), y, sampler="euler")
    with pytest.raises(ValueError, match="unknown sampler 'ddim' for flow matching"):
        D.FlowMatching().sample(None, (1, 1, 2, 2), y, sampler="ddim")
    with pytest.raises(ValueError, match="steps = 0 must be a whole number >= 1"):
        D.FlowMatching().sample(None, (1, 1, 2, 2), y, steps=0)
    with pytest.raises(ValueError, match="steps = -3 must be a whole number >= 1"):
        D.DDPM().sample(None, (1, 1, 2, 2), y, steps=-3)


def test_training_step_skips_a_non_finite_update():
    torch.manual_seed(0)
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    x, _, y = batch(model)
    x[0, 0, 3, 3] = float("nan")                                # one NaN pixel
    before = copy.deepcopy(model.state_dict())
    out = D.training_step(model, D.FlowMatching(), opt, x, y)
    assert out["skipped"] and not torch.isfinite(out["loss"])
    for name, p in model.state_dict().items():                  # no update: every weight as it was, finite
        assert torch.equal(p, before[name]), name
    assert not opt.state                                        # and the optimizer took no step
    out = D.training_step(model, D.FlowMatching(), opt, torch.nan_to_num(x), y)
    assert not out["skipped"] and torch.isfinite(out["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in model.state_dict().items())


# =======================================================================================
# train_tiny.py: data loaders on fabricated files, runs, resume, DDP, errors
# =======================================================================================

ROOT = Path(__file__).resolve().parent
TINY = ["--dataset", "synthetic", "--model", "DyDiLiT-T/4", "--image-size", "16", "--batch-size", "8",
        "--val-size", "16", "--sample-steps", "2", "--log-every", "2", "--fid-samples", "0"]


def run_py(args, tmp_path, env=None, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train_tiny.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, **kw)


def log_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_synthetic_smoke_run_writes_checkpoint_log_and_grids(tmp_path):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "6", "--eval-every", "3", "--sample-every", "3", "--out-dir", str(out)]) == 0
    for name in ("ckpt.pt", "log.jsonl", "samples_0000003.png", "samples_final.png", "loss.png", "classes.txt"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)      # plain types only
    assert ckpt["step"] == 6 and ckpt["args"]["attn"] == "dydila" and len(ckpt["classes"]) == 10
    assert set(ckpt) >= {"model", "ema", "opt", "step", "args", "rng"}
    rows = log_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in train_rows)
    assert len(train_rows[0]["loss_per_t_bin"]) == 4
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    # one command draws a grid from the checkpoint
    grid = tmp_path / "grid.png"
    assert T.main(["--sample-from", str(out / "ckpt.pt"), "--grid", str(grid), "--sample-steps", "2"]) == 0
    assert grid.stat().st_size > 0


def test_validation_loss_is_identical_for_identical_weights():
    data = T.make_synthetic(16)
    model = D.MODELS["DyDiLiT-T/4"](input_size=16, num_classes=10, attn="linear")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    a = T.validation_loss(model, D.FlowMatching(), data.val_x[:32], data.val_y[:32], T.nullcontext)
    b = T.validation_loss(model, D.FlowMatching(), data.val_x[:32], data.val_y[:32], T.nullcontext)
    assert a == b and len(a[1]) == len(T.VAL_TIMES)


def test_batches_are_a_function_of_step_and_shard_across_ranks():
    data = T.make_synthetic(8, n_train=20, n_val=4)
    full = T.Batches(data, 8, seed=3)
    xs = [full.get(s)[1] for s in range(5)]                  # 40 labels = two epochs of 20
    again = T.Batches(data, 8, seed=3)
    assert torch.equal(again.get(4)[1], xs[4])               # no state: step 4 straight away
    perm0, perm1 = full.perm(0), full.perm(1)
    assert torch.equal(torch.cat(xs)[:20], data.train_y[perm0]) and torch.equal(torch.cat(xs)[20:], data.train_y[perm1])
    halves = [T.Batches(data, 8, seed=3, rank=r, world=2).get(2)[1] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), xs[2])


def test_interrupt_then_resume_matches_uninterrupted_run(tmp_path):
    args = [*TINY, "--log-every", "1", "--eval-every", "1000", "--sample-every", "1000", "--steps", "30",
            "--warmup", "1", "--lr", "1e-3"]                 # the weights move fast: any divergence shows
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *args, "--out-dir", "a"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "a" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= stopped < 30
    resumed = run_py([*args, "--out-dir", "a", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_py([*args, "--out-dir", "b"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    a = {r["step"]: r for r in log_rows(tmp_path / "a") if "loss" in r}
    b = {r["step"]: r for r in log_rows(tmp_path / "b") if "loss" in r}
    assert max(a) == max(b) == 30
    assert a[30]["loss"] < 0.8 * a[1]["loss"]                 # it learned, so the comparison is not trivial
    for step in range(1, 31):                                 # before the stop, and after the resume
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    va = [r["val_loss"] for r in log_rows(tmp_path / "a") if "val_loss" in r][-1]
    vb = [r["val_loss"] for r in log_rows(tmp_path / "b") if "val_loss" in r][-1]
    assert va == pytest.approx(vb, rel=1e-5)


def test_ddp_world_size_one_on_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r = run_py([*TINY, "--steps", "4", "--eval-every", "2", "--sample-every", "100", "--out-dir", "ddp"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["step"] == 4
    assert "device cpu x1" in r.stdout


# --- the real loaders on small files in the true formats ---------------------------------

def write_cifar_folder(folder, n=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [(i + j) % 10 for j in range(n)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reads_the_python_batches_folder(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    data = T.load_cifar10(tmp_path)
    assert data.train_x.shape == (30, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.val_x.shape == (6, 3, 32, 32) and data.flip and data.classes[0] == "airplane"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(data.train_x[6].flatten(), torch.from_numpy(raw[b"data"][0]))   # channel-major rows
    assert data.train_y[6:12].tolist() == raw[b"labels"]


def make_cifar_tarball(tmp_path):
    src = tmp_path / "src"
    write_cifar_folder(src / "cifar-10-batches-py")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tarball = data_dir / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return data_dir, tarball


def test_cifar10_extracts_a_verified_tarball(tmp_path, monkeypatch):
    data_dir, tarball = make_cifar_tarball(tmp_path)
    monkeypatch.setattr(T, "CIFAR10_MD5", T.file_digest(tarball))
    data = T.load_cifar10(data_dir)
    assert data.train_x.shape == (30, 3, 32, 32)
    assert (data_dir / "cifar-10-batches-py" / "test_batch").exists()
    assert set(p.name for p in data_dir.iterdir()) == {"cifar-10-python.tar.gz", "cifar-10-batches-py"}  # no temp left


def test_cifar10_md5_mismatch_is_a_clear_error_and_extracts_nothing(tmp_path, monkeypatch, capsys):
    data_dir, tarball = make_cifar_tarball(tmp_path)         # its MD5 is not the official one
    with pytest.raises(T.UserError, match=f"has MD5 {T.file_digest(tarball)}, expected c58f30108f718f92721af3b95e74349a"):
        T.load_cifar10(data_dir)
    assert set(p.name for p in data_dir.iterdir()) == {"cifar-10-python.tar.gz"}
    # through the command line: one line on stderr, exit code 2
    assert T.main(["--data-dir", str(data_dir), "--steps", "1", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "MD5" in err and err.count("\n") == 1


def test_cifar10_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")   # refused at once, offline
    with pytest.raises(T.UserError, match=r"put cifar-10-python.tar.gz .* into .*data/"):
        T.load_cifar10(tmp_path / "data", explicit=False)     # the default ./data: created for the download
    assert not any((tmp_path / "data").iterdir())           # no partial download left behind


def test_cifar10_corrupt_batch_is_a_clear_error(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(T.UserError, match="data_batch_3 .*incomplete or corrupt"):
        T.load_cifar10(tmp_path)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_gz_and_pads_to_32(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "FASHION_DIRS", [])                 # only the fabricated files
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:3])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    data = T.load_fashion_mnist(tmp_path)
    assert data.train_x.shape == (7, 1, 32, 32) and data.val_x.shape == (3, 1, 32, 32) and not data.flip
    assert torch.equal(data.train_x[:, 0, 2:30, 2:30], torch.from_numpy(imgs.astype(np.uint8)))
    assert data.train_x[:, :, :2].sum() == 0 and data.train_y.tolist() == list(range(7))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(T.UserError, match="t10k-labels-idx1-ubyte.gz .*corrupt"):
        T.load_fashion_mnist(tmp_path)
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(T.UserError, match="Fashion-MNIST not found: put .* apt-get install dataset-fashion-mnist"):
        T.load_fashion_mnist(tmp_path)


def test_subin_reads_class_folders_skips_corrupt_files(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(["n02", "n01", "n03"]):
        (root / wnid).mkdir(parents=True)
        for j in range(52 if c == 0 else 3):
            Image.fromarray(rng.integers(0, 256, (40 + j % 3, 30, 3), dtype=np.uint8)).save(root / wnid / f"img{j:03d}.JPEG")
    (root / "n01" / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "n01" / "notes.txt").write_text("ignored")
    data = T.load_subin(root, 2, None, 16, tmp_path / "cache")
    assert data.classes == ["n01", "n02"]                    # the first two in sorted order
    assert "skipped 1 unreadable files of 56" in capsys.readouterr().out
    # held out: every 50th image of a class, and the last of a class with 2 to 49 (n01: 4 files, 3 readable)
    assert data.train_x.shape == (53, 3, 16, 16) and data.val_x.shape == (2, 3, 16, 16)
    assert data.train_y.tolist().count(0) == 2 and data.val_y.tolist() == [0, 1]
    again = T.load_subin(root, 2, None, 16, tmp_path / "cache")   # from the cache
    assert torch.equal(again.train_x, data.train_x) and len(list((tmp_path / "cache").iterdir())) == 1
    listed = tmp_path / "classes.txt"
    listed.write_text("n03\nn01\n")
    assert T.load_subin(root, 2, str(listed), 16, tmp_path / "cache").classes == ["n03", "n01"]
    listed.write_text("n09\n")
    with pytest.raises(T.UserError, match="--class-list names 1 classes with no folder .* n09"):
        T.load_subin(root, 2, str(listed), 16, tmp_path / "cache")


# --- nothing lost: signals, non-finite steps, small classes --------------------------------

def test_a_signal_writes_the_checkpoint_before_validating(tmp_path, monkeypatch, capsys):
    seen = []
    real_step, real_validation = D.training_step, T.validation_loss

    def step(*a, **k):
        out = real_step(*a, **k)
        if len(seen) == 2:                                      # during step 3: the signal arrives
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append("step")
        return out

    def validation(*a, **k):                                    # the checkpoint is already on disk
        seen.append(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"])
        return real_validation(*a, **k)

    monkeypatch.setattr(D, "training_step", step)
    monkeypatch.setattr(T, "validation_loss", validation)
    handler = signal.getsignal(signal.SIGTERM)
    code = T.main([*TINY, "--steps", "50", "--eval-every", "1000", "--sample-every", "1000", "--out-dir", str(tmp_path / "run")])
    assert code == 128 + signal.SIGTERM and seen == ["step"] * 3 + [3]
    assert "interrupted at step 3: checkpoint saved to" in capsys.readouterr().out
    assert [r["step"] for r in log_rows(tmp_path / "run") if "val_loss" in r] == [3]   # validated after saving
    assert (tmp_path / "run" / "loss.png").exists()
    assert signal.getsignal(signal.SIGTERM) is handler          # the handlers are restored


def test_a_second_signal_skips_the_validation(tmp_path, monkeypatch):
    real_step = D.training_step

    def step(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)                     # Ctrl-C during the first step
        return real_step(*a, **k)

    def validation(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)                     # Ctrl-C again while it validates
        for _ in range(3000):                                   # a long validation: must not run to its end
            time.sleep(0.01)
        raise AssertionError("the second Ctrl-C did not stop the validation")

    monkeypatch.setattr(D, "training_step", step)
    monkeypatch.setattr(T, "validation_loss", validation)
    code = T.main([*TINY, "--steps", "50", "--out-dir", str(tmp_path / "run")])
    assert code == 128 + signal.SIGINT
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 1
    log = tmp_path / "run" / "log.jsonl"
    assert not log.exists() or not [r for r in log_rows(tmp_path / "run") if "val_loss" in r]


def test_a_signal_during_a_sample_grid_saves_at_once(tmp_path, monkeypatch):
    def grid(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(3000):
            time.sleep(0.01)
        raise AssertionError("the signal did not stop the sample grid")

    monkeypatch.setattr(T, "sample_grid", grid)
    monkeypatch.setattr(T, "validation_loss", lambda *a, **k: (1.0, [1.0] * len(T.VAL_TIMES)))
    code = T.main([*TINY, "--steps", "50", "--eval-every", "1000", "--sample-every", "2", "--out-dir", str(tmp_path / "run")])
    assert code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


def test_non_finite_steps_are_skipped_and_the_run_stops_with_good_weights(tmp_path, monkeypatch, capsys):
    real_step, calls = D.training_step, []

    def step(model, objective, opt, x0, y, **k):
        calls.append(1)
        if len(calls) in (2, 5, 6, 7):                          # step 2 alone, then three in a row from step 5
            x0 = x0 * float("nan")
        return real_step(model, objective, opt, x0, y, **k)

    monkeypatch.setattr(D, "training_step", step)
    out = tmp_path / "run"
    code = T.main([*TINY, "--steps", "20", "--log-every", "1", "--eval-every", "3", "--sample-every", "100", "--out-dir", str(out)])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]                                  # after the progress bar, one line
    assert code == 2 and last.startswith("error: ") and "not finite for 3 steps in a row (up to step 7)" in last, err
    rows = {r["step"]: r for r in log_rows(out) if "loss" in r}
    assert rows[2]["skipped_steps"] == 1 and rows[2]["loss"] is None and math.isfinite(rows[3]["loss"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and all(torch.isfinite(p).all() for p in ckpt["model"].values())
    assert (out / "loss.png").exists()                         # written with each checkpoint


def test_subin_holds_out_an_image_of_every_small_class_and_refuses_empty_ones(tmp_path):
    from PIL import Image
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for wnid, n in (("n01", 3), ("n02", 1), ("n03", 12)):
        (root / wnid).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / wnid / f"img{j:03d}.JPEG")
    data = T.load_subin(root, 3, None, 8, tmp_path / "cache")
    assert data.val_y.tolist() == [0, 2] and len(data.train_y) == 2 + 1 + 11   # n02's single image trains
    one = tmp_path / "one"
    (one / "n01").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(one / "n01" / "a.JPEG")
    with pytest.raises(T.UserError, match="leave no validation image"):
        T.load_subin(one, 1, None, 8, tmp_path / "cache")
    (root / "n00").mkdir()
    with pytest.raises(T.UserError, match="class folder .*n00 has no images"):
        T.load_subin(root, 4, None, 8, tmp_path / "cache")


def test_data_dir_fallbacks_are_announced_and_explicit_folders_must_exist(tmp_path, monkeypatch, capsys):
    debian = tmp_path / "debian"
    debian.mkdir()
    images, labels = np.zeros((3, 28, 28), np.uint8), np.arange(3, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(debian / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(debian / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(T, "FASHION_DIRS", [str(debian)])
    T.load_fashion_mnist(tmp_path / "data", explicit=False)
    assert f"reading Fashion-MNIST from {debian}" in capsys.readouterr().out
    with pytest.raises(T.UserError, match="does not exist: point it at the folder with the Fashion-MNIST IDX files"):
        T.load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(T.UserError, match="does not exist: create it"):
        T.load_cifar10(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()                  # nothing created


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU recipe hint is for CPU-only machines")
def test_the_cpu_recipe_is_suggested_only_for_the_gpu_defaults(tmp_path, capsys):
    T.main(["--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "a")])   # defaults: stops at the data
    assert "no GPU found" in capsys.readouterr().out
    T.main([*TINY, "--steps", "1", "--sample-every", "100", "--out-dir", str(tmp_path / "b")])
    assert "no GPU found" not in capsys.readouterr().out


def test_long_waits_show_progress_and_help_shows_real_defaults(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--sample-every", "100", "--out-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "validation" in err and "sampling samples_final.png" in err
    assert T.main(["--sample-from", str(out / "ckpt.pt"), "--grid", str(tmp_path / "g.png"), "--sample-steps", "2"]) == 0
    assert "sampling g.png" in capsys.readouterr().err
    for parser in (T.get_parser(), V.get_parser(), bench.get_parser(), ablation.get_parser()):
        text = " ".join(parser.format_help().split())          # unwrapped
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "default: the middle) (default" not in text and "default 16384 on CPU, 262144 on CUDA) (default" not in text
        assert "(default: None)" not in text
        assert "--out-dir" in text and "--out " not in text
    text = " ".join(T.get_parser().format_help().split())
    assert "(default: 0.0003)" in text and "noise (default: 0)" in text         # a zero default is still shown


def test_img_per_s_counts_every_step_of_the_interval(tmp_path, monkeypatch):
    step = D.training_step

    def slow_step(*a, **kw):                                    # every step takes at least 200 ms
        time.sleep(0.2)
        return step(*a, **kw)
    monkeypatch.setattr(D, "training_step", slow_step)
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "6", "--log-every", "3", "--eval-every", "2", "--sample-every", "100", "--out-dir", str(out)]) == 0
    speeds = [r["img_per_s"] for r in log_rows(out) if "img_per_s" in r]
    assert len(speeds) == 2 and all(v <= 3 * 8 / (3 * 0.2) for v in speeds)    # 3 steps of 8 images in >= 600 ms


# --- sample quality: the Fréchet distance, the metric classifier, FID, npz export -----------

def test_frechet_distance_matches_the_closed_forms():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))            # commuting covariances Q diag Q^T:
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)        # FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    a[:2] = 0                                                    # and one of them singular (rank 4)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert T.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-6)   # sqrt of a rounding-size eigenvalue: ~1e-8
    # non-commuting 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (real, non-negative eigenvalues)
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    m = s1 @ s2
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert T.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-9)
    f = rng.standard_normal((50, 80))                            # identical sets, fewer samples than features: 0
    assert abs(T.frechet_distance(*T.gaussian_stats(f), *T.gaussian_stats(f))) < 1e-5     # tr S = 80: 1e-7 relative
    assert T.frechet_distance(*T.gaussian_stats(f), *T.gaussian_stats(f + 1)) == pytest.approx(80, rel=1e-6)


def test_inception_input_is_tensorflow_1_bilinear_of_the_pixels():
    img = torch.randint(0, 256, (2, 1, 5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = T.inception_input(img)
    assert x.shape == (2, 3, 299, 299) and torch.equal(x[:, 0], x[:, 2])      # grey repeated to RGB

    def tf1_bilinear(a, out):                                    # independent: source pixel j * in / out, clamped
        h, w = a.shape
        ys, xs = np.arange(out) * h / out, np.arange(out) * w / out
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
        bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
        return top * (1 - fy) + bottom * fy

    expected = (tf1_bilinear(img[1, 0].double().numpy(), 299) - 128) / 128
    assert np.allclose(x[1, 1].double().numpy(), expected, atol=1e-4)


def metric_data(n_train=600, n_val=200):
    """Fabricated two-class images: class 0 dark on the left half, class 1 on the right."""
    def draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        x = torch.randint(0, 60, (n, 1, 16, 16), generator=g)
        x[y == 0, :, :, :8] += 150
        x[y == 1, :, :, 8:] += 150
        return x.to(torch.uint8), y
    (tx, ty), (vx, vy) = draw(n_train, 0), draw(n_val, 1)
    return T.ImageData(tx, ty, vx, vy, ["left", "right"], flip=False)


def test_metric_classifier_learns_is_cached_and_tells_real_from_noise(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "CNN_STEPS", 60)
    data = metric_data()
    q = T.SampleQuality(data, "fab", tmp_path / "cache", torch.device("cpu"), 100)
    assert q.cnn_heldout_acc > 0.95
    real = q.score(data.val_x[:100], data.val_y[:100])
    swapped = q.score(data.val_x[:100], 1 - data.val_y[:100])   # right images, wrong labels
    noise = q.score(torch.randint(0, 256, (100, 1, 16, 16), dtype=torch.uint8), data.val_y[:100])
    assert real["cnn_acc"] > 0.95 and swapped["cnn_acc"] < 0.05 and real["samples"] == 100
    assert real["fd_cnn"] == pytest.approx(swapped["fd_cnn"])   # the distance does not look at labels
    assert noise["fd_cnn"] > 10 * real["fd_cnn"]
    assert "fid" not in real
    cached = list((tmp_path / "cache").glob("metric-cnn-fab-16px-600-*.pt"))
    assert len(cached) == 1
    monkeypatch.setattr(T.torch.optim, "AdamW", None)           # a second time: read from the cache, no training
    again = T.SampleQuality(data, "fab", tmp_path / "cache", torch.device("cpu"), 100)
    assert again.score(data.val_x[:100], data.val_y[:100]) == pytest.approx(real)
    cached[0].write_bytes(b"broken")
    with pytest.raises(T.UserError, match="cannot read the cached metric classifier .* delete it and it is made again"):
        T.SampleQuality(data, "fab", tmp_path / "cache", torch.device("cpu"), 100)


class StandIn(torch.nn.Module):
    """A scripted stand-in for the FID Inception network: (n, 3, 299, 299) -> (n, 2048)."""

    def __init__(self, out=2048):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, out)

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))


def test_training_logs_fd_cnn_accuracy_and_fid_and_plots_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "CNN_STEPS", 20)
    monkeypatch.setattr(T, "FID_REFERENCE_MIN", 50)
    torch.manual_seed(0)
    net = tmp_path / "inception.pt"
    torch.jit.script(StandIn()).save(str(net))
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "4", "--eval-every", "2", "--sample-every", "100", "--out-dir", str(out),
            "--fid-samples", "12", "--fid-inception", str(net), "--cache-dir", str(tmp_path / "cache")]
    assert T.main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out real images: FD-cnn-12 " in text and "FID-12 " in text and "FID reference: 50 of them" in text
    rows = [r for r in log_rows(out) if "fd_cnn" in r]
    assert [r["step"] for r in rows] == [2, 4]                  # each evaluation and the end
    for r in rows:
        assert r["metric_samples"] == 12 and 0 <= r["cnn_acc"] <= 1 and r["fd_cnn"] > 0 and r["fid"] > 0
    real = next(r for r in log_rows(out) if "real_fd_cnn" in r)
    assert {"real_fid", "real_cnn_acc"} <= set(real) and real["metric_samples"] == 12
    assert len(list((tmp_path / "cache").glob("fid-ref-synthetic-16px-50-*.pt"))) == 1
    from PIL import Image
    assert Image.open(out / "loss.png").size[0] == 1100        # the second panel: sample quality

    (tmp_path / "text.pt").write_text("not a network")
    torch.jit.script(StandIn(out=7)).save(str(tmp_path / "wrong.pt"))
    for path, message in ((tmp_path / "missing.pt", "no such file"), (tmp_path / "text.pt", "is not a TorchScript FID"),
                          (tmp_path / "wrong.pt", "to (2, 7), not (2, 2048) features")):
        argv = [*TINY, "--steps", "2", "--out-dir", str(tmp_path / path.stem), "--fid-samples", "12",
                "--fid-inception", str(path), "--cache-dir", str(tmp_path / "cache")]
        assert T.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --fid-inception {path}") and message in err and err.count("\n") == 1, err


def test_sample_from_writes_the_adm_npz_format(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--sample-every", "100", "--out-dir", str(out)]) == 0
    npz = tmp_path / "samples" / "s"                            # no .npz suffix: the name stays as given
    assert T.main(["--sample-from", str(out / "ckpt.pt"), "--npz", str(npz), "--num-samples", "25", "--sample-steps", "2"]) == 0
    z = np.load(npz)
    assert sorted(z.files) == ["arr_0", "arr_1"]
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (25, 16, 16, 3)
    assert z["arr_1"].tolist() == [i % 10 for i in range(25)]   # class-balanced labels
    assert "arr_0 (25, 16, 16, 3) uint8" in capsys.readouterr().out


# --- bad input ends with one clear line and exit code 2 ---------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "DyDiLiT-T/4", "--image-size", "18"], "image size 18 is not divisible by the patch size 4"),
    (["--sampler", "ddim"], "--sampler ddim does not belong to the objective flow"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--dataset", "fashion-mnist", "--image-size", "64", "--model", "DyDiLiT-T/4"], "--image-size 64 does not match fashion-mnist's 32 x 32"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--sample-from", "nothing.pt"], "--sample-from nothing.pt: no such file"),
    (["--lr", "-1"], "--lr must be a positive learning rate"),
    (["--ema-decay", "1.5"], "--ema-decay must lie in [0, 1]"),
    (["--warmup", "-2"], "--warmup must be >= 0"),
    (["--sample-from", "nothing.pt", "--sample-steps", "0"], "--sample-steps must be >= 1"),
    (["--dataset", "fashion-mnist", "--image-size", "32", "--data-dir", "/nonexistent/dir"], "--data-dir /nonexistent/dir does not exist"),
    (["--dataset", "cifar10", "--image-size", "32", "--data-dir", "nonexistent"], "--data-dir nonexistent does not exist: create it"),
    (["--fid-samples", "-5"], "--fid-samples must be 0 (off) or >= 2"),
    (["--fid-samples", "0", "--fid-inception", "x.pt"], "--fid-inception needs samples to score"),
    (["--npz", "s.npz"], "--npz goes with --sample-from CKPT"),
    (["--sample-from", "nothing.pt", "--npz", "s.npz", "--num-samples", "0"], "--num-samples must be >= 1"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert T.main([*TINY, "--out-dir", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_resume_with_another_model_or_a_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert T.main([*TINY, "--steps", "2", "--sample-every", "100", "--out-dir", str(out)]) == 0
    assert T.main([*TINY, "--steps", "4", "--out-dir", str(out)]) == 2
    assert "already holds a run (ckpt.pt): add --resume" in capsys.readouterr().err
    assert T.main([*TINY, "--steps", "4", "--attn", "linear", "--out-dir", str(out), "--resume"]) == 2
    assert "is from another model: it has attn='dydila' but this run asks for attn='linear'" in capsys.readouterr().err
    (out / "ckpt.pt").write_bytes(b"truncated")
    assert T.main([*TINY, "--steps", "4", "--out-dir", str(out), "--resume"]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


def test_unknown_dataset_is_rejected_by_the_parser(tmp_path):
    r = run_py(["--dataset", "mnist"], tmp_path)
    assert r.returncode == 2 and "invalid choice: 'mnist'" in r.stderr and "Traceback" not in r.stderr


# =======================================================================================
# visualize.py, tools/bench.py, tools/ablation.py: metrics with known answers, every figure
# =======================================================================================


def test_smoothness_metrics_known_answers():
    N = 100
    uniform = torch.full((3, N), 1.0 / N)
    one_hot = torch.zeros(3, N)
    one_hot[:, 7] = 1
    torch.testing.assert_close(V.row_entropy(uniform), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(V.row_entropy(one_hot), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(V.top_mass(uniform), torch.full((3,), 0.05, dtype=torch.float64))
    torch.testing.assert_close(V.top_mass(one_hot), torch.ones(3, dtype=torch.float64))
    half = torch.zeros(N)
    half[:2] = 0.5                                            # two keys: entropy log 2 / log N
    assert V.row_entropy(half[None]).item() == pytest.approx(math.log(2) / math.log(N))
    assert V.row_entropy(torch.zeros(1, N)).isnan().all()     # a row that attends to nothing
    s = V.summarise(torch.stack([uniform, one_hot])[None])   # (1, 2, 3, N)
    assert s["entropy_mean"] == pytest.approx(0.5) and s["zero_rows"] == 0 and s["rows"] == 6


def test_visualize_default_mode_writes_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "FASHION_DIRS", [])                # offline synthetic image, whatever is installed
    assert V.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    table = capsys.readouterr().out
    assert "softmax (DiT)" in table and "DyDiLA (DyDi-LiT)" in table and "synthetic image 0" in table


def test_visualize_checkpoint_mode_writes_parts_and_routers(tmp_path, capsys, monkeypatch):
    runs = []
    for name, flags in (("linear", ["--attn", "linear"]), ("dydila", []), ("static", ["--no-dynamic-kernel"])):
        out = tmp_path / name
        assert T.main([*TINY, *flags, "--steps", "2", "--sample-every", "100", "--out-dir", str(out)]) == 0
        runs.append(str(out / "ckpt.pt"))
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", *runs, "--t", "0.3", "0.7"]) == 0
    for name in ("attention_maps.png", "attention_smoothness.png", "router_maps.png", "dydila_parts_dydila.png",
                 "dydila_parts_static.png"):                    # DyDiLA's parts: one figure per run
        assert (tmp_path / "viz" / name).stat().st_size > 10_000, name
    from PIL import Image
    for name in ("router_maps.png", "dydila_parts_dydila.png"):  # wide figures stay readable in a README column
        assert Image.open(tmp_path / "viz" / name).size[0] <= 1300, name
    out = capsys.readouterr().out
    assert "dydila (dydila) t=0.7" in out and "layer 3" in out
    assert not [w for w in out.splitlines() if w.startswith("warning: dydila (static)") and "kernel" in w]  # a static kernel is no collapse
    assert V.main(["--out-dir", str(tmp_path / "viz"), "--ckpt", *runs, "--layer", "9"]) == 2
    assert "--layer 9 is out of range: " in capsys.readouterr().err

    # tools/ablation.py: the runs grouped into rows, seeds of one configuration together
    # (a second seed that ran longer: every row is compared at the last validation step all runs reached)
    s1 = tmp_path / "dydila_s1"
    assert T.main([*TINY, "--seed", "1", "--steps", "4", "--eval-every", "2", "--sample-every", "100", "--out-dir", str(s1)]) == 0
    runs.append(str(s1 / "ckpt.pt"))
    assert ablation.main(["--out-dir", str(tmp_path / "abl"), "--ckpt", *runs, "--t", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "all rows are compared at step 2" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    labels = [line.split(" | ")[0][2:] for line in table[2:]]
    assert labels == ["LiT (linear)", "DyDi-LiT", "DyDi-LiT, no dynamic kernel"]
    vals = table[3].split(" | ")[1].split(" / ")                # DyDi-LiT: two seeds' validation losses
    s1_val = next(json.loads(r)["val_loss"] for r in (s1 / "log.jsonl").read_text().splitlines() if '"val_loss"' in r)
    assert len(vals) == 2 and float(vals[1]) == pytest.approx(s1_val, abs=1e-4)   # seed 1's loss at step 2, not 4
    for name in ("ablation.png", "ablation_samples.png"):
        assert (tmp_path / "abl" / name).stat().st_size > 10_000, name
    monkeypatch.setattr(T, "CNN_STEPS", 10)                    # with sample quality: per seed, mean ± std
    assert ablation.main(["--out-dir", str(tmp_path / "abl"), "--ckpt", *runs[1:], "--fid-samples", "8", "--sample-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out real images: FD-cnn-8 " in out and "DyDi-LiT, seed 1: FD-cnn-8 " in out
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    assert table[0][3:5] == ["FD-cnn-8 (per seed)", "mean ± std"] and table[0][5] == "accuracy % (per seed)"
    dydi = next(r for r in table if r[0] == "| DyDi-LiT")
    fd = [float(v) for v in dydi[3].split(" / ")]
    assert len(fd) == 2 and dydi[4] == f"{np.mean(fd):.2f} ± {np.std(fd, ddof=1):.2f}"
    (tmp_path / "linear" / "log.jsonl").unlink()
    assert ablation.main(["--out-dir", str(tmp_path / "abl"), "--ckpt", *runs]) == 2
    assert "log.jsonl is missing: tools/ablation.py reads each run's log" in capsys.readouterr().err


def test_bench_writes_csv_and_plot(tmp_path):
    assert bench.main(["--out-dir", str(tmp_path), "--max-tokens", "1024", "--repeats", "1", "--width", "32", "--heads", "2"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [int(r["tokens"]) for r in rows] == [256, 1024]
    assert all(float(r[f"{k}_ms"]) > 0 and float(r[f"{k}_mem_mib"]) > 0 for r in rows for k in V.MECHANISMS)
    assert all(0 < float(r["dydila_over_linear"]) < math.inf for r in rows)
    # the ratio is the median of per-round ratios, not the ratio of medians
    assert bench.paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == 2.0   # ratios 2, 3, 1; the medians' ratio is 4 / 3
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_bench_compiles_each_size_with_static_shapes(tmp_path, monkeypatch):
    # one static graph per size (recompiling for a new N with dynamic shapes crashed inductor on a
    # CPU); a real compile takes minutes on 2 cores, so the test records the calls and runs eager
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    for name in ("cache_size_limit", "accumulated_cache_size_limit"):    # --compile raises them: restore after
        monkeypatch.setattr(torch._dynamo.config, name, getattr(torch._dynamo.config, name))
    argv = ["--out-dir", str(tmp_path), "--compile", "--max-tokens", "1024", "--repeats", "1", "--width", "32", "--heads", "2"]
    assert bench.main(argv) == 0
    assert [int(r["tokens"]) for r in csv.DictReader(open(tmp_path / "scaling.csv"))] == [256, 1024]
    assert calls == [{"dynamic": False}] * 2 * len(V.MECHANISMS)


def test_visualize_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "FASHION_DIRS", [])
    for argv, message in ((["--index", "999999"], "--index 999999 is out of range: the synthetic held-out set has images 0..499"),
                          (["--data-dir", "/nonexistent"], "--data-dir /nonexistent does not exist"),
                          (["--ckpt", "missing.pt"], "missing.pt: no such checkpoint file")):
        assert V.main(["--out-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    cases = [(["--max-tokens", "100"], "--max-tokens 100 is below the smallest size timed, 256"),
             (["--width", "30", "--heads", "4"], "--width 30 is not divisible by --heads 4")]
    if not torch.cuda.is_available():
        cases.append((["--cuda-graphs"], "--cuda-graphs needs a CUDA GPU"))
    for argv, message in cases:
        assert bench.main(["--out-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
