"""The specification of the library, dydilit.py: the O(N) paths equal the explicit N x N ones,
routing follows the equations, the banks learn, one compiled graph, precision, the model, the
objectives, a loss that drops, clear errors. CPU only, offline, fast: `python -m pytest test_dydilit.py`.
The scripts' tests are in tests/ (`python -m pytest -q` runs both; `-m "not slow"` the quick loop)."""

import copy
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

import dydilit as D

HW = (6, 10)                    # a non-square token grid

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


def gradients_in_five_steps(m):
    """Train m 5 Adam steps on a random regression; each parameter's summed |gradient| by name."""
    x, target = torch.randn(8, N, 32), torch.randn(8, N, 32)
    touched = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        ((m(x, HW) - target) ** 2).mean().backward()
        for n, p in m.named_parameters():
            touched[n] += p.grad.abs()
        opt.step()
    return touched


def test_every_router_exponent_and_lambda_learns_in_a_short_run():
    torch.manual_seed(0)
    m = D.DyDiLA(32, 4)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    touched = gradients_in_five_steps(m)
    learned = [n for n in touched if "router" in n or "theta" in n or "lambda" in n]
    assert len(learned) == 10                                   # 6 routers, 2 exponent banks, 2 lambda banks
    for n in learned:
        assert (touched[n] > 0).all(), f"{n}: an entry got no gradient in 5 steps: {touched[n]}"
        assert not torch.equal(m.get_parameter(n), before[n]), n
    for W in [*m.redundancy_q.projectors, *m.redundancy_k.projectors]:
        assert W.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------
# Readings: DyDiLA where the paper is read otherwise ([C]'s initial values, routing, output)
# ---------------------------------------------------------------------------------------

def make_reading(reading, C=32, heads=4, seed=0):
    torch.manual_seed(seed)
    return D.make_attention("dydila", C, heads, reading=reading).double()


@pytest.mark.parametrize("reading", ["c-init", "c-routing"])
def test_a_normalised_reading_applies_its_explicit_weights(reading):
    m, x = make_reading(reading), tokens()
    torch.testing.assert_close(m(x, HW), explicit_forward(m, x, HW), rtol=1e-6, atol=1e-6)
    A = m.attention_matrix(x, HW)
    rows = A.sum(-1)                                            # s / (s + eps): distributions, short by eps / s
    assert (A >= 0).all() and (rows <= 1).all() and ((rows - 1).abs() < 1e-3).float().mean() > 0.9


@pytest.mark.parametrize("reading", ["c-output", "c"])
def test_a_signed_reading_is_its_direct_quadratic_product(reading):
    m, x = make_reading(reading), tokens()
    q_t, k_t, v = m.features(x)                                 # (B, h, N, d), signed
    assert (q_t < 0).any() and (k_t < 0).any()                  # no outer relu
    A = q_t @ k_t.transpose(-2, -1) * (32 // 4) ** -0.5         # Q~ K~^T d^-1/2, O(N^2), no normaliser
    torch.testing.assert_close(m.attention_matrix(x, HW), A)
    torch.testing.assert_close(m(x, HW), explicit_forward(m, x, HW), rtol=1e-6, atol=1e-6)   # (Q~ K~^T V) d^-1/2 + DWC


@pytest.mark.parametrize("reading", ["ours", "banks-lr"])
def test_the_readings_of_ours_are_dydila_itself(reading):
    m = make_reading(reading)
    assert type(m) is D.DyDiLA
    torch.testing.assert_close(m(tokens(), HW), make_attention("dydila")(tokens(), HW))


@pytest.mark.parametrize("reading", ["c-init", "c"])
def test_cs_initial_values_are_every_exponent_3_and_every_lambda_001(reading):
    m = make_reading(reading)
    for bank in (m.kernel_q.exponents, m.kernel_k.exponents):
        torch.testing.assert_close(bank, torch.full((9,), 3.0, dtype=torch.float64))
    for bank in (m.differential.lambda_q, m.differential.lambda_k):
        torch.testing.assert_close(bank, torch.full((9,), 0.01, dtype=torch.float64))


def test_cs_routing_chooses_per_token_and_head_and_each_follows_the_equations():
    m, x = make_reading("c-routing", seed=3), tokens(seed=4)
    r = m.routing(x)
    assert r["proj_q"].shape == (2, N) and all(r[k].shape == (2, 4, N) for k in r if not k.startswith("proj"))
    h, d = 4, 8
    q_feat, k_feat, _ = m.features(x)
    assert m.differential.lambda_q is m.differential.lambda_k   # one lambda bank for both sides
    for side, feat, W0, b0 in (("q", q_feat, m.qkv.weight[:32], m.qkv.bias[:32]),
                               ("k", k_feat, m.qkv.weight[32:64], m.qkv.bias[32:64])):
        proj = getattr(m, f"redundancy_{side}")
        kern, kern_r = getattr(m, f"kernel_{side}"), getattr(m, f"kernel_{side}_r")
        lam_router = getattr(m.differential, f"router_{side}")
        for b, i in itertools.product(range(2), range(0, N, 7)):
            xi = x[b, i]
            t = (W0 @ xi + b0).view(h, d)                       # q_ih, per head
            t_r = (proj.projectors[r[f"proj_{side}"][b, i]].weight @ xi).view(h, d)   # q'_ih = X_i W^{u_i}
            c, c_r = kern.router(t).argmax(-1), kern_r.router(t_r).argmax(-1)          # per head, on head features
            assert torch.equal(c, r[f"kernel_{side}"][b, :, i]) and torch.equal(c_r, r[f"kernel_{side}_r"][b, :, i])
            phi = torch.stack([plain_focused_kernel(t[j], kern.exponents[c[j]]) for j in range(h)])
            phi_r = torch.stack([plain_focused_kernel(t_r[j], kern_r.exponents[c_r[j]]) for j in range(h)])
            l = lam_router(torch.cat([phi, phi_r], -1)).argmax(-1)                      # on [phi(z), phi(z')]
            assert torch.equal(l, r[f"lambda_{side}"][b, :, i])
            want = F.relu(phi - m.differential.bank[l][:, None] * phi_r)
            torch.testing.assert_close(feat[b, :, i], want, msg=f"{side} token {b},{i}")


def test_every_router_and_bank_of_cs_reading_learns():
    torch.manual_seed(0)
    m = D.make_attention("dydila", 32, 4, reading="c")
    touched = gradients_in_five_steps(m)
    learned = [n for n in touched if "router" in n or "bank" in n]
    assert len(learned) == 2 + 2 * 4 + 1 + 4 + 2 * 2            # 2 projector routers; 4 kernels (router w, b; bank)...
    for n in learned:
        assert touched[n].sum() > 0, f"{n} got no gradient in 5 steps"
    assert {id(p) for p in D.bank_parameters(m)} == {id(m.get_parameter(n)) for n in learned if n.endswith("bank")}


def test_banks_lr_puts_exactly_the_banks_in_a_faster_group():
    m = make_reading("banks-lr")
    plain, banks = D.optimizer_groups(m, "banks-lr")
    assert (plain["lr_scale"], banks["lr_scale"]) == (1.0, D.BANK_LR) and D.BANK_LR > 1
    names = {n for n, p in m.named_parameters() if any(p is b for b in banks["params"])}
    assert names == {"kernel_q.theta", "kernel_k.theta", "differential.lambda_q", "differential.lambda_k"}
    assert len(plain["params"]) + len(banks["params"]) == len(list(m.parameters()))
    assert len(D.optimizer_groups(m)) == 1                       # any other reading: one group


def test_a_reading_is_refused_by_name_and_for_other_attentions():
    with pytest.raises(ValueError, match="unknown reading 'x'"):
        D.make_attention("dydila", 32, 4, reading="x")
    with pytest.raises(ValueError, match="reading 'c' is a reading of DyDiLA, not of linear"):
        D.make_attention("linear", 32, 4, reading="c")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.fixture
def scalar_inductor(monkeypatch):
    """Inductor's CPU code generator without SIMD: the same lowering and fusion a GPU user's
    Inductor does (only the last step, C++ here and Triton there, differs), compiled in about
    two thirds of the time on 2 cores."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "simdlen", 1)
    torch._dynamo.reset()


def tiny_model(attn, seed=0):
    """A one-block DyDi-LiT on 8 x 8 inputs (16 tokens), not adaLN-zero (the attention shows in the
    output), without label dropout (Inductor draws random numbers differently from eager)."""
    torch.manual_seed(seed)
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4, attn=attn, class_dropout_prob=0.0)
    for w in [model.final_linear.weight] + [b.adaLN_modulation[1].weight for b in model.blocks]:
        torch.nn.init.normal_(w, std=0.1)
    return model


@pytest.mark.slow
def test_inductor_forward_and_backward_match_eager_in_float32_and_bf16(scalar_inductor):
    """The compiler a GPU user gets (Inductor; here its CPU code generator), one graph, on DyDi-LiT
    (LiT's attention is DyDiLA's last step, so its operations are compiled here too). float32:
    the loss and every gradient agree to 1e-4 of their scale (Inductor fuses and reorders float32
    sums). bf16 autocast: a near-tied hard routing choice can flip between two roundings of the same
    input, so the gradients are compared by direction (cosine) and the loss to bf16's precision."""
    model = tiny_model("dydila")
    x, t, y = batch(model, B=4)
    params = list(model.parameters())
    compiled = torch.compile(model, fullgraph=True)

    def loss_and_grads(m, amp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = m(x, t, y).float().square().mean()
        return loss, torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    (loss_c, grad_c), (loss_e, grad_e) = loss_and_grads(compiled, False), loss_and_grads(model, False)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-4 * grad_e.abs().max().item())
    (loss_c, grad_c), (loss_e, grad_e) = loss_and_grads(compiled, True), loss_and_grads(model, True)
    assert abs(loss_c - loss_e) <= 1e-2 * loss_e
    assert F.cosine_similarity(grad_c, grad_e, dim=0) > 0.999


@pytest.mark.slow
def test_sampling_with_a_compiled_model_runs_compiled_and_compiles_at_most_twice():
    """Guidance doubles the batch inside the sampler, whose loop stays eager: a compiled model is
    called with the same shapes at every step, so a whole sampling run compiles once or twice.
    (What is counted is Dynamo's graph capture, the same for every backend: the test skips Inductor.)"""
    torch._dynamo.reset()
    model = tiny_model("dydila").eval()
    compiled = torch.compile(model, backend="eager")
    y = torch.tensor([0, 1, 2])
    counters.clear()
    got = D.FlowMatching().sample(compiled, (3, 3, 8, 8), y, steps=8, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    want = D.FlowMatching().sample(model, (3, 3, 8, 8), y, steps=8, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "-B/" in n else n for n in sorted(D.MODELS)])
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
    model = D.DyDiLiT(input_size=16, patch_size=4, hidden_size=64, depth=2, num_heads=2, num_classes=2)
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
    for _ in range(120):
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


def test_ema_refuses_a_decay_outside_0_1_and_another_architecture_before_changing_anything():
    lit, dydi = (D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, attn=attn) for attn in ("linear", "dydila"))
    before = copy.deepcopy(lit.state_dict())
    for decay in (2.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"decay = .* must lie in \[0, 1\]"):
            D.update_ema(lit, lit, decay=decay)
    for ema, model in ((lit, dydi), (dydi, lit)):               # LiT's parameters are a prefix of DyDi-LiT's
        with pytest.raises(ValueError, match="ema and model differ in architecture"):
            D.update_ema(ema, model)
    assert all(torch.equal(p, before[n]) for n, p in lit.state_dict().items())


def test_grad_clip_bounds_the_norm_zero_or_none_is_off_and_a_negative_one_is_refused():
    torch.manual_seed(0)
    model = D.DyDiLiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    x, _, y = batch(model)
    with torch.no_grad():                                       # a non-zero output layer: gradients everywhere
        model.final_linear.weight.normal_(std=0.5)
    start = copy.deepcopy(model.state_dict())

    def step_size(grad_clip):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        torch.manual_seed(1)
        out = D.training_step(model, D.FlowMatching(), opt, x, y, grad_clip=grad_clip)
        moved = torch.cat([(p - start[n]).flatten() for n, p in model.named_parameters()]).norm().item()
        return out["grad_norm"].item(), moved

    norm, moved = step_size(None)
    assert norm > 0.02 and moved == pytest.approx(norm, rel=1e-4)           # SGD, lr 1: the step is the gradient
    assert step_size(0) == pytest.approx((norm, moved), rel=1e-5)            # 0: no clipping, as None
    assert step_size(norm / 4)[1] == pytest.approx(norm / 4, rel=1e-3)       # clipped to the bound
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_clip = .* must be a gradient norm > 0, or 0 / None for no clipping"):
            D.training_step(model, D.FlowMatching(), torch.optim.SGD(model.parameters(), lr=1.0), x, y, grad_clip=bad)


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
    with pytest.raises(ValueError, match=r"x has no tokens \(shape \(2, 0, 32\), hw = \(0, 4\)\): attention needs N >= 1"):
        m(torch.zeros(2, 0, 32, dtype=torch.float64), (0, 4))
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


def test_the_position_embedding_refuses_a_width_it_cannot_split_in_four():
    with pytest.raises(ValueError, match="dim = 6 must be a multiple of 4"):
        D.sincos_pos_embed(6, 2, 2)


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
    for n in (0, -5, 1.5):
        with pytest.raises(ValueError, match=f"num_timesteps = {n} must be a whole number >= 1"):
            D.DDPM(num_timesteps=n)
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


# ---------------------------------------------------------------------------------------
# The interpretations: every marker has its README item, every item its marker
# ---------------------------------------------------------------------------------------

def test_every_interpretation_is_marked_in_the_code_and_listed_in_the_readme():
    root = Path(__file__).resolve().parent
    section = (root / "README.md").read_text().split("## Where this implementation interprets the paper")[1].split("\n## ")[0]
    items = [int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.M)]
    assert items == list(range(1, len(items) + 1)) and len(items) >= 10
    marked = set()
    for path in [root / "dydilit.py", root / "train_tiny.py", *sorted((root / "training").glob("*.py"))]:
        text = path.read_text()
        bad = re.findall(r"#\s*choice\b(?! \(README item \d+\): ).*", text)   # one form of marker
        assert not bad, f"{path.name}: a marker not of the form '# choice (README item n): ': {bad}"
        marked |= {int(n) for n in re.findall(r"# choice \(README item (\d+)\): ", text)}
    assert marked == set(items), f"items without a marker: {set(items) - marked}; markers without an item: {marked - set(items)}"

