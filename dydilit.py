"""
DyDiLA and DyDi-LiT in one file: the attention, the diffusion transformer, the objectives.

Paper: "Dynamic Differential Linear Attention: Enhancing Linear Diffusion Transformer for
High-Quality Image Generation", Cao, Yao, Wang, Ye, Wei, Shan, arXiv 2601.13683 (2026).

DyDiLA fixes the over-smoothed attention of linear attention with three designs:
  (i)   dynamic projection     Q'_i = X_i W_Q^{u_i},  u_i = argmax_u (X_i R_Q^P)_u           -> DynamicProjection
  (ii)  dynamic measure kernel phi_{g_i}, g_i one of n_K learnable exponents, routed per token -> DynamicMeasureKernel
  (iii) token differential     q~_i = relu(phi(q_i) - lambda_i phi(q'_i)), lambda_i routed    -> TokenDifferential
and DyDi-LiT is DiT with DyDiLA as its attention (DyDiLiT below).

The method section is not public: every line where this file fills a gap carries the comment
"choice (README item n): ...", and item n of README.md's list "Where this implementation
interprets the paper" gives the evidence and its grade.

Follows: DiT (Peebles & Xie 2023, facebookresearch/DiT models.py) for the backbone,
LiT (Wang et al. 2025, arXiv 2501.12976) and SANA for ReLU linear attention with a 5x5
depthwise conv, FLatten (Han et al. 2023) for the focused kernel, DDPM (Ho et al. 2020),
DDIM (Song et al. 2021) and rectified flow (Liu et al. 2022; minRF) for the objectives.

Shapes: B batch, N tokens, C channels, h heads, d head dim, H x W token grid, N = H * W
(row-major). Needs torch and nothing else. On a GPU, wrap the model in torch.compile: it
compiles as one graph (no host synchronisation anywhere in the forward).
"""

import functools
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# Helpers: input checks, heads, precision
# ----------------------------------------------------------------------------------------

def _check_tokens(x, hw, dim):
    """Validate attention input; returns B, N, C."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C) tokens, got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if not (isinstance(hw, (tuple, list, torch.Size)) and len(hw) == 2):
        raise ValueError(f"hw must be the token grid (H, W), a pair of ints with H * W = N, got {hw!r}")
    H, W = hw
    if N != H * W:
        raise ValueError(f"N = {N} tokens does not match hw = ({H}, {W}): N must equal H * W = {H * W}")
    if N == 0:
        raise ValueError(f"x has no tokens (shape {tuple(x.shape)}, hw = ({H}, {W})): attention needs N >= 1")
    if C != dim:
        raise ValueError(f"x has C = {C} channels but the attention was built with dim = {dim}")
    return B, N, C


def _check_heads(dim, num_heads):
    if dim < 1:
        raise ValueError(f"dim = {dim} must be >= 1")
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"dim = {dim} is not divisible by num_heads = {num_heads}: pick heads that divide dim")


def _check_count(name, n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} = {n!r} must be a whole number >= 1")


def _split_heads(t, h):
    B, N, C = t.shape
    return t.view(B, N, h, C // h).transpose(1, 2)              # (B, N, C) -> (B, h, N, d)


def _qkv_heads(qkv, x, h):
    B, N, C = x.shape
    return qkv(x).view(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (B, N, 3C) -> 3 x (B, h, N, d)


def _merge_heads(t):
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)               # (B, h, N, d) -> (B, N, C)


def _fp32(t):
    """At least float32: half precision goes up, float64 stays (tests run in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _no_autocast(t):
    return torch.autocast(t.device.type, enabled=False)


# ----------------------------------------------------------------------------------------
# 1. Kernels and linear attention
# ----------------------------------------------------------------------------------------

def focused_kernel(x, g):
    """Focused power kernel (FLatten; LiT's "focused kernel"), norms over the head dim:

        phi_g(x) = relu(x)^g * ||relu(x)|| / ||relu(x)^g||

    g >= 1: a number, or a tensor that broadcasts to x[..., :1] (one exponent per token).
    g = 1 is the ReLU kernel of LiT / SANA; a larger g keeps the norm of relu(x) and moves its
    mass onto its largest coordinates: a sharper similarity.
    """
    tiny = torch.finfo(x.dtype).tiny
    r = F.relu(x)
    # phi_g is 1-homogeneous: phi_g(r) = m phi_g(r / m) for any m > 0. With m the row maximum, r / m
    # lies in [0, 1] and (r / m)^g cannot overflow; the output does not depend on m, so autograd may
    # treat it as a constant (detach: the same gradient, without differentiating the max)
    m = r.detach().amax(dim=-1, keepdim=True).clamp_min(tiny)   # row maximum  (B, h, N, 1)
    r = r / m
    p = r ** g                                                  # relu(x)^g / m^g
    return p * (m * r.norm(dim=-1, keepdim=True) / p.norm(dim=-1, keepdim=True).clamp_min(tiny))  # (B, h, N, d)


def linear_attention(q, k, v, eps):
    """O_i = q_i^T (sum_j k_j v_j^T) / (q_i^T sum_j k_j + eps), in O(N d^2), never N x N.

    q, k: non-negative features (B, h, N, d); v: (B, h, N, d). The sums and the division run
    in float32 even under autocast (linear attention overflows in fp16/bf16; SANA does the same).
    """
    with _no_autocast(q):
        q, k, v32 = _fp32(q), _fp32(k), _fp32(v)
        kv = torch.einsum("bhnd,bhne->bhde", k, v32)            # sum_j k_j v_j^T   (B, h, d, d)
        z = k.sum(dim=2)                                        # sum_j k_j         (B, h, d)
        num = torch.einsum("bhnd,bhde->bhne", q, kv)            # (B, h, N, d)
        den = torch.einsum("bhnd,bhd->bhn", q, z)               # (B, h, N)
        return (num / (den.unsqueeze(-1) + eps)).to(v.dtype)


def normalised_scores(q, k, eps):
    """The explicit N x N weights of linear attention: A_ij = q_i.k_j / (sum_j' q_i.k_j' + eps)."""
    with _no_autocast(q):
        a = _fp32(q) @ _fp32(k).transpose(-2, -1)               # (B, h, N, N)
        return a / (a.sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------
# 2. Baseline attentions: DiT (softmax) and LiT (ReLU linear attention + DWC)
# ----------------------------------------------------------------------------------------

class SoftmaxAttention(nn.Module):
    """DiT's multi-head self-attention: softmax(Q K^T / sqrt(d)) V, O(N^2)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        _check_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw):
        _check_tokens(x, hw, self.dim)
        q, k, v = _qkv_heads(self.qkv, x, self.num_heads)      # 3 x (B, h, N, d)
        o = F.scaled_dot_product_attention(q, k, v)             # (B, h, N, d)
        return self.proj(_merge_heads(o))                       # (B, N, C)

    def attention_matrix(self, x, hw):
        _check_tokens(x, hw, self.dim)
        q, k, _ = _qkv_heads(self.qkv, x, self.num_heads)
        with _no_autocast(q):
            a = _fp32(q) @ _fp32(k).transpose(-2, -1) / math.sqrt(q.shape[-1])
            return a.softmax(dim=-1)                            # (B, h, N, N)


class LinearAttention(nn.Module):
    """LiT's linear attention: ReLU kernel, normaliser, and a depthwise conv on V.

    DyDiLA below subclasses this and only replaces `features`: everything after the
    features (the O(N) product, the DWC, the output projection) is shared.
    """

    def __init__(self, dim, num_heads, dwc_kernel_size=5, eps=1e-6):
        super().__init__()
        _check_heads(dim, num_heads)
        if dwc_kernel_size and dwc_kernel_size % 2 == 0:
            raise ValueError(f"dwc_kernel_size = {dwc_kernel_size} must be odd (or 0 for no conv) to keep the H x W grid")
        self.dim, self.num_heads, self.eps = dim, num_heads, eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        d = dim // num_heads
        # LiT guideline: a 5x5 depthwise conv on V, added to the attention output; its
        # weights are shared across heads (LiT / FLatten apply it to (B*h, d, H, W)).
        self.dwc = nn.Conv2d(d, d, dwc_kernel_size, padding=dwc_kernel_size // 2, groups=d) if dwc_kernel_size else None

    def features(self, x):
        """phi(Q), phi(K), V, each (B, h, N, d); phi = ReLU (LiT, SANA), features in float32."""
        q, k, v = _qkv_heads(self.qkv, x, self.num_heads)      # 3 x (B, h, N, d)
        return F.relu(_fp32(q)), F.relu(_fp32(k)), v

    def local(self, v, hw):
        """DWC(V) on the token grid: (B, h, N, d) -> (B, h, N, d), or 0 without a conv."""
        if self.dwc is None:
            return 0
        B, h, N, d = v.shape
        # the grid as a channels-last view of the token layout (d innermost), the layout the
        # depthwise conv kernels prefer; the same conv as on a (B*h, d, H, W) NCHW tensor
        v = v.contiguous().view(B * h, *hw, d).permute(0, 3, 1, 2)  # (B*h, d, H, W)
        return self.dwc(v).permute(0, 2, 3, 1).reshape(B, h, N, d)  # (B, h, N, d)

    def forward(self, x, hw):
        _check_tokens(x, hw, self.dim)
        q, k, v = self.features(x)                              # (B, h, N, d) each
        o = linear_attention(q, k, v, self.eps) + self.local(v, hw)  # (B, h, N, d)
        return self.proj(_merge_heads(o))                       # (B, N, C)

    def attention_matrix(self, x, hw):
        """The weights that `forward` applies to V, made explicit: (B, h, N, N), O(N^2)."""
        _check_tokens(x, hw, self.dim)
        q, k, _ = self.features(x)
        return normalised_scores(q, k, self.eps)


# ----------------------------------------------------------------------------------------
# 3. The three DyDiLA designs ((i)-(iii) of the DyDiLA paper's abstract)
# ----------------------------------------------------------------------------------------

class Router(nn.Module):
    """A hard per-token choice among n options: c_i = argmax_c (X_i R)_c, R in R^{C x n}.

    Returns the choice (B, N) and a straight-through gate (B, N) that the caller multiplies
    onto the chosen output: the forward is the hard argmax (gate == 1 in value), the backward
    lets the router learn whether its choice should weigh more. Logits in float32, so that
    autocast does not flip near-tied choices.
    """

    def __init__(self, dim, num_choices):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_choices, dim))   # R^T, like nn.Linear(dim, n, bias=False)
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x):
        """x: (B, N, C) -> choice (B, N) long, gate (B, N)."""
        with _no_autocast(x):
            logits = F.linear(_fp32(x), _fp32(self.weight))    # X_i R              (B, N, n)
        c = logits.argmax(dim=-1)                               # hard choice        (B, N)
        p = logits.softmax(dim=-1).gather(-1, c[..., None]).squeeze(-1)  # its probability (B, N)
        return c, 1 + p - p.detach()                            # choice (README item 2): gate 1 + p_i - stopgrad(p_i)


class DynamicProjection(nn.Module):
    """DyDiLA design (i), dynamic projection: each token picks one of n_P projectors, and its
    projection is the token's "information redundancy":

        X'_i = X_i W^{u_i},   u_i = argmax_u (X_i R^P)_u,   W^j in R^{C x C}, shared by the heads.

    n_P = 1 is a static projector (no router).
    """

    def __init__(self, dim, num_projectors):
        super().__init__()
        _check_count("num_projectors", num_projectors)
        # choice (README item 1): C x C projectors, one choice per token for all heads
        self.projectors = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_projectors))  # W^1..W^{n_P}
        self.router = Router(dim, num_projectors) if num_projectors > 1 else None                        # R^P

    def forward(self, x):
        """X'_i = X_i W^{u_i}: (B, N, C) -> (B, N, C)."""
        if self.router is None:
            return self.projectors[0](x)
        B, N, C = x.shape
        u, gate = self.router(x)                                # (B, N) projector per token, straight-through gate
        # every projector on every token, then a gather: n_P x the FLOPs of running only the
        # chosen one, but static shapes and no host sync, so torch.compile sees one graph
        # (grouping tokens by projector has data-dependent sizes and breaks it)
        every = F.linear(x, torch.cat([W.weight for W in self.projectors]))  # X_i W^j for every j  (B, N, n_P*C)
        every = every.view(B, N, -1, C)                         # (B, N, n_P, C)
        chosen = every.gather(2, u.view(B, N, 1, 1).expand(B, N, 1, C)).squeeze(2)  # X_i W^{u_i}  (B, N, C)
        return chosen * gate[..., None]


class DynamicMeasureKernel(nn.Module):
    """DyDiLA design (ii), dynamic measure kernel: each token is assigned its kernel function,
    the focused kernel with one of n_K learnable exponents ([C] source):

        phi(t_i) = phi_{g_{c_i}}(t_i),   c_i = argmax_c (X_i R^K)_c,   g_c = 1 + softplus(theta_c) >= 1.

    The exponent chosen for token i applies to t_i and to its redundancy t'_i. n_K = 1: one
    learnable exponent, 3.0 at first. dynamic=False is the static ReLU kernel of LiT
    (exponents == [1], no router).
    """

    def __init__(self, dim, num_kernels, dynamic=True):
        super().__init__()
        _check_count("num_kernels", num_kernels)
        self.theta = self.router = None
        if not dynamic:
            self.register_buffer("relu_exponent", torch.ones(1), persistent=False)  # (1,): phi_1 = relu
            return
        # choice (README item 3): initial exponents spread evenly over [1.5, 4.5] (mean 3.0, FLatten's
        # focusing factor), not all 3.0: with identical exponents every choice computes the same
        # kernel, and the router learns nothing about which exponent suits a token
        g = torch.linspace(1.5, 4.5, num_kernels) if num_kernels > 1 else torch.tensor([3.0])
        self.theta = nn.Parameter(torch.log(torch.expm1(g - 1)))  # softplus^-1(g - 1)   (n_K,)
        self.router = Router(dim, num_kernels) if num_kernels > 1 else None  # R^K

    @property
    def exponents(self):
        """The current exponents g_1..g_{n_K}, each >= 1: (n_K,)."""
        return self.relu_exponent if self.theta is None else 1 + F.softplus(self.theta)

    def forward(self, x, t, t_r=None):
        """phi_{g_i}(t_i) times the router's gate, and phi_{g_i}(t'_i) (None without t_r), for
        tokens x: (B, N, C) and head features t, t_r: (B, h, N, d) -> (B, h, N, d) each, float32."""
        t, t_r = _fp32(t), None if t_r is None else _fp32(t_r)
        if self.theta is None:                                  # static ReLU kernel
            return F.relu(t), None if t_r is None else F.relu(t_r)
        if self.router is None:                                 # one learnable exponent for every token
            g, gate = self.exponents, 1.0
        else:
            c, gate = self.router(x)                            # (B, N) kernel per token, straight-through gate
            # choice (README item 4): one exponent per token, shared by the heads, routed from X_i
            g = self.exponents[c][:, None, :, None]             # g_{c_i}  (B, 1, N, 1)
            gate = gate[:, None, :, None]                       # (B, 1, N, 1)
        # choice (README item 6): the gate multiplies phi(t_i) only. A scale on a whole query's features
        # cancels in the normaliser, so on phi(t_i) and phi(t'_i) alike the query side's router would
        # get no gradient; on phi(t_i) alone it learns through the difference (iii).
        return focused_kernel(t, g) * gate, None if t_r is None else focused_kernel(t_r, g)


class TokenDifferential(nn.Module):
    """DyDiLA design (iii), token differential operator: each token minus its redundancy (from
    design (i), through the kernel of design (ii)), weighed by a lambda routed per token ([C] source):

        q~_i = relu( phi(q_i) - lambda^Q_i phi(q'_i) ),   lambda^Q_i = Lambda^Q_{c_i},  c_i = argmax_c (X_i R^D_Q)_c
        k~_j = relu( phi(k_j) - lambda^K_j phi(k'_j) ),   likewise with its own bank Lambda^K and router R^D_K

    Lambda^Q, Lambda^K: banks of n_D learnable values, unconstrained (n_D = 1: one value, no
    router). Differential Transformer subtracts attention maps, A1 - lambda A2; here tokens,
    before the product, so attention stays O(N).
    """

    def __init__(self, dim, num_lambdas):
        super().__init__()
        _check_count("num_lambdas", num_lambdas)
        # choice (README item 7): initial values spread evenly over [0.1, 0.9] (0.5 for n_D = 1), so that
        # every choice subtracts a different share of the redundancy from the start; routers read X_i
        init = torch.linspace(0.1, 0.9, num_lambdas) if num_lambdas > 1 else torch.tensor([0.5])
        self.lambda_q = nn.Parameter(init.clone())              # Lambda^Q  (n_D,)
        self.lambda_k = nn.Parameter(init.clone())              # Lambda^K  (n_D,)
        self.router_q = Router(dim, num_lambdas) if num_lambdas > 1 else None  # R^D_Q
        self.router_k = Router(dim, num_lambdas) if num_lambdas > 1 else None  # R^D_K

    @staticmethod
    def choose(bank, router, x):
        """lambda_i per token, times the router's gate: (B, 1, N, 1), or the single value."""
        if router is None:
            return bank
        c, gate = router(x)                                     # (B, N)
        return (bank[c] * gate)[:, None, :, None]               # (B, 1, N, 1), shared by the heads

    def forward(self, x, phi_q, phi_q_r, phi_k, phi_k_r):
        """q~, k~ from phi(Q), phi(Q'), phi(K), phi(K'): (B, h, N, d) each; x: (B, N, C) tokens."""
        lam_q = self.choose(self.lambda_q, self.router_q, x)    # lambda^Q_i
        lam_k = self.choose(self.lambda_k, self.router_k, x)    # lambda^K_j
        # choice (README item 8): the outer relu keeps q~, k~ non-negative, so (with the normaliser)
        # every attention row stays a probability distribution, which the maps and entropies need
        return F.relu(phi_q - lam_q * phi_q_r), F.relu(phi_k - lam_k * phi_k_r)


# ----------------------------------------------------------------------------------------
# 4. DyDiLA
# ----------------------------------------------------------------------------------------

class DyDiLA(LinearAttention):
    """Dynamic Differential Linear Attention: LiT's linear attention with the features

        q_i = X_i W_Q^0,  q'_i = X_i W_Q^{u_i}                               (i)   dynamic projection
        phi(q_i) = phi_{g_i}(q_i),  phi(q'_i) = phi_{g_i}(q'_i)               (ii)  dynamic measure kernel
        q~_i = relu( phi(q_i) - lambda_i phi(q'_i) )                          (iii) token differential
        (k~_j likewise, with its own projectors, routers, exponents and lambdas)
        O_i  = q~_i^T (sum_j k~_j v_j^T) / (q~_i^T sum_j k~_j + eps)  +  DWC(V)_i

    Ablation switches: dynamic_projection=False uses one static projector for Q', K';
    dynamic_kernel=False the ReLU kernel; token_differential=False drops Q', K' altogether (so
    dynamic_projection has nothing to act on). All three off is exactly LinearAttention (same
    weights, same output).
    """

    # choice (README item 9): n_P = 3, n_K = n_D = 9, the [C] source's "Small" setting
    def __init__(self, dim, num_heads, num_projectors=3, num_kernels=9, num_lambdas=9,
                 dynamic_projection=True, dynamic_kernel=True, token_differential=True,
                 dwc_kernel_size=5, eps=1e-6):
        super().__init__(dim, num_heads, dwc_kernel_size, eps)
        for name, n in (("num_projectors", num_projectors), ("num_kernels", num_kernels), ("num_lambdas", num_lambdas)):
            _check_count(name, n)
        self.kernel_q = DynamicMeasureKernel(dim, num_kernels, dynamic_kernel)  # (ii), query side
        self.kernel_k = DynamicMeasureKernel(dim, num_kernels, dynamic_kernel)  # (ii), key side
        self.redundancy_q = self.redundancy_k = self.differential = None
        if token_differential:                                  # choice (README item 10): what each switch turns off
            n_P = num_projectors if dynamic_projection else 1
            self.redundancy_q = DynamicProjection(dim, n_P)     # (i)   Q' = X W_Q^{u}
            self.redundancy_k = DynamicProjection(dim, n_P)     # (i)   K' = X W_K^{v}
            self.differential = TokenDifferential(dim, num_lambdas)  # (iii)

    def features(self, x, parts=False):
        """q~, k~ (non-negative, float32) and V, each (B, h, N, d), in the paper's order.
        parts=True also returns the kernel features {"phi_q", "phi_k", "phi_q_r", "phi_k_r"}."""
        h = self.num_heads
        q, k, v = _qkv_heads(self.qkv, x, h)                    # Q, K, V = X W^0      3 x (B, h, N, d)
        q_r = k_r = None
        if self.differential is not None:                       # (i) redundancy
            q_r = _split_heads(self.redundancy_q(x), h)         # Q'_i = X_i W_Q^{u_i}  (B, h, N, d)
            k_r = _split_heads(self.redundancy_k(x), h)         # K'_j = X_j W_K^{v_j}  (B, h, N, d)
        # choice (README item 5): the redundancy goes through its token's kernel
        phi_q, phi_q_r = self.kernel_q(x, q, q_r)               # (ii) kernel: phi_{g_i} on q_i and q'_i
        phi_k, phi_k_r = self.kernel_k(x, k, k_r)               #      and on k_j and k'_j
        q_t, k_t = phi_q, phi_k
        if self.differential is not None:                       # (iii) differential
            q_t, k_t = self.differential(x, phi_q, phi_q_r, phi_k, phi_k_r)
        if parts:
            return q_t, k_t, v, dict(phi_q=phi_q, phi_k=phi_k, phi_q_r=phi_q_r, phi_k_r=phi_k_r)
        return q_t, k_t, v

    def attention_parts(self, x, hw):
        """For plots: the explicit (B, h, N, N) maps of DyDiLA's pieces.
        "base": phi(q).phi(k) normalised (kernels chosen, nothing subtracted); "redundancy":
        phi(q').phi(k') normalised; "differential": the weights forward applies (attention_matrix)."""
        _check_tokens(x, hw, self.dim)
        q_t, k_t, _, p = self.features(x, parts=True)
        maps = {"base": normalised_scores(p["phi_q"], p["phi_k"], self.eps)}
        if self.differential is not None:
            maps["redundancy"] = normalised_scores(p["phi_q_r"], p["phi_k_r"], self.eps)
        maps["differential"] = normalised_scores(q_t, k_t, self.eps)
        return maps

    @torch.no_grad()
    def routing(self, x):
        """The hard choice of every router per token: dict of (B, N) long tensors, keys among
        "proj_q", "proj_k", "kernel_q", "kernel_k", "lambda_q", "lambda_k" (the routers that exist)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}) tokens, got shape {tuple(x.shape)}")
        routers = {"kernel_q": self.kernel_q.router, "kernel_k": self.kernel_k.router}
        if self.differential is not None:
            routers = {"proj_q": self.redundancy_q.router, "proj_k": self.redundancy_k.router, **routers,
                       "lambda_q": self.differential.router_q, "lambda_k": self.differential.router_k}
        return {name: r(x)[0] for name, r in routers.items() if r is not None}


# ----------------------------------------------------------------------------------------
# 4b. Readings: DyDiLA where the paper is read otherwise, as the one public re-implementation
#     ([C]; README, "Where this implementation interprets the paper") reads it
# ----------------------------------------------------------------------------------------

# What each reading changes of DyDiLA above ("ours"). "c" changes all three: DyDiLA as [C] reads it.
# "banks-lr" is DyDiLA itself, its exponent and lambda banks (bank_parameters) trained at a higher rate.
READINGS = {"ours": (),
            "c-init": ("init",),                    # every exponent 3.0, every lambda 0.01 (README items 3, 7)
            "c-routing": ("routing",),              # per token per head, straight-through weights (items 2, 4, 7)
            "c-output": ("output",),                # the signed difference, no normaliser, d^-1/2 (item 8)
            "c": ("init", "routing", "output"),
            "banks-lr": ()}


def straight_through(logits):
    """[C]'s router weights: one-hot of the argmax forward, the softmax's gradient backward.
    (..., n) logits -> weights (..., n), choice (...)."""
    p = logits.softmax(dim=-1)
    c = p.argmax(dim=-1)
    return F.one_hot(c, p.shape[-1]).to(p.dtype) + p - p.detach(), c


class HeadKernel(nn.Module):
    """[C]'s dynamic measure kernel: a bank of n_K exponents of its own (one per stream Q, K, Q', K'),
    clamped at 1, one chosen per token **and head** by a router reading the detached head features:

        g_ih = sum_c w_ihc G_c,   w_ih = straight_through(t_ih R + b),   phi(t_ih) = phi_{g_ih}(t_ih)
    """

    def __init__(self, head_dim, exponents):
        super().__init__()
        self.bank = nn.Parameter(exponents.clone())             # G  (n_K,)
        self.router = nn.Linear(head_dim, len(exponents))       # R, b

    @property
    def exponents(self):
        return self.bank.clamp(min=1)

    def forward(self, t):
        """t (B, h, N, d) float32 -> phi_{g_ih}(t_ih) (B, h, N, d), choice (B, h, N)."""
        with _no_autocast(t):
            w, c = straight_through(self.router(t.detach()))    # (B, h, N, n_K)
        return focused_kernel(t, (w * self.exponents).sum(-1, keepdim=True)), c   # g_ih  (B, h, N, 1)


class SharedLambda(nn.Module):
    """[C]'s lambdas: **one** bank of n_D values for the query and the key side, chosen per token and
    head by a router per side reading the detached [phi(z_ih), phi(z'_ih)]:

        lambda^Q_ih = sum_c w_ihc Lambda_c,   w_ih = straight_through([phi(q_ih), phi(q'_ih)] R_Q + b_Q)
    """

    def __init__(self, head_dim, lambdas):
        super().__init__()
        self.bank = nn.Parameter(lambdas.clone())               # Lambda  (n_D,), unconstrained
        self.router_q = nn.Linear(2 * head_dim, len(lambdas))   # R_Q, b_Q
        self.router_k = nn.Linear(2 * head_dim, len(lambdas))   # R_K, b_K

    lambda_q = lambda_k = property(lambda self: self.bank)     # both sides read the one bank

    def choose(self, router, phi, phi_r):
        """lambda per token and head (B, h, N, 1), choice (B, h, N)."""
        with _no_autocast(phi):
            w, c = straight_through(router(torch.cat([phi, phi_r], dim=-1).detach()))   # (B, h, N, n_D)
        return (w * self.bank).sum(-1, keepdim=True), c


class WeightedProjection(DynamicProjection):
    """[C]'s dynamic projection: the same projectors and router, straight-through weights on the
    projections instead of a gate on the chosen one: X'_i = sum_u w_iu X_i W^u."""

    def forward(self, x):
        B, N, C = x.shape
        with _no_autocast(x):
            w, _ = straight_through(F.linear(_fp32(x), _fp32(self.router.weight)))      # (B, N, n_P)
        every = F.linear(x, torch.cat([W.weight for W in self.projectors])).view(B, N, -1, C)   # (B, N, n_P, C)
        return (every * w[..., None].to(every.dtype)).sum(2)   # forward: X_i W^{u_i}  (B, N, C)


def signed_attention(q, k, v):
    """[C]'s output: O = Q~ (K~^T V) d^-1/2, no normaliser, in O(N d^2) and float32 (q, k signed)."""
    with _no_autocast(q):
        kv = torch.einsum("bhnd,bhne->bhde", _fp32(k), _fp32(v))   # sum_j k~_j v_j^T  (B, h, d, d)
        return (torch.einsum("bhnd,bhde->bhne", _fp32(q), kv) * q.shape[-1] ** -0.5).to(v.dtype)


class DyDiLAReading(DyDiLA):
    """DyDiLA under another reading (READINGS) of what the paper leaves open:

        (i)   q'_i = X_i W_Q^{u_i}                      "routing": the projections weighed (WeightedProjection)
        (ii)  phi(q_ih) = phi_{g_ih}(q_ih)              "routing": per token and head, a bank per stream (HeadKernel)
        (iii) q~_ih = phi(q_ih) - lambda_ih phi(q'_ih)  "routing": one lambda bank (SharedLambda); relu'd unless "output"
        O_i = q~_i^T (sum_j k~_j v_j^T) / (q~_i^T sum_j k~_j + eps) + DWC(V)_i
                                                        "output": O_i = q~_i^T (sum_j k~_j v_j^T) d^-1/2 + DWC(V)_i

    "init" starts every exponent at 3.0 and every lambda at 0.01. The three designs are always on.
    """

    def __init__(self, dim, num_heads, reading="c", num_projectors=3, num_kernels=9, num_lambdas=9,
                 dwc_kernel_size=5, eps=1e-6):
        if reading not in READINGS:
            raise ValueError(f"unknown reading {reading!r}: choose one of {', '.join(READINGS)}")
        super().__init__(dim, num_heads, num_projectors, num_kernels, num_lambdas, dwc_kernel_size=dwc_kernel_size,
                         eps=eps)
        self.reading, changes = reading, READINGS[reading]
        self.per_head, self.signed = "routing" in changes, "output" in changes
        d = dim // num_heads
        # [C]: every exponent starts at 3.0 ("per FLatten"), every lambda at 0.01
        g0 = torch.full((num_kernels,), 3.0) if "init" in changes else self.kernel_q.exponents.detach().clone()
        lam0 = torch.full((num_lambdas,), 0.01) if "init" in changes else self.differential.lambda_q.detach().clone()
        if self.per_head:                                       # [C]'s routing: banks and routers of its own
            self.redundancy_q = WeightedProjection(dim, num_projectors)   # (i)  Q' = sum_u w_u X W_Q^u
            self.redundancy_k = WeightedProjection(dim, num_projectors)   #      K'
            # (ii) four kernels, each its own bank; (iii) one lambda bank for both sides
            self.kernel_q, self.kernel_k, self.kernel_q_r, self.kernel_k_r = (HeadKernel(d, g0) for _ in range(4))
            self.differential = SharedLambda(d, lam0)
        elif "init" in changes:
            with torch.no_grad():
                for kernel in (self.kernel_q, self.kernel_k):
                    kernel.theta.copy_(torch.log(torch.expm1(g0 - 1)))   # 1 + softplus(theta) = 3.0
                self.differential.lambda_q.fill_(0.01)
                self.differential.lambda_k.fill_(0.01)

    def features(self, x, parts=False):
        """q~, k~ (float32; signed with "output") and V, each (B, h, N, d)."""
        h = self.num_heads
        q, k, v = _qkv_heads(self.qkv, x, h)                    # Q, K, V = X W^0      3 x (B, h, N, d)
        q_r = _split_heads(self.redundancy_q(x), h)             # (i) Q'               (B, h, N, d)
        k_r = _split_heads(self.redundancy_k(x), h)             #     K'
        if self.per_head:
            (phi_q, _), (phi_k, _) = self.kernel_q(_fp32(q)), self.kernel_k(_fp32(k))          # (ii) per head
            (phi_q_r, _), (phi_k_r, _) = self.kernel_q_r(_fp32(q_r)), self.kernel_k_r(_fp32(k_r))
            lam_q = self.differential.choose(self.differential.router_q, phi_q, phi_q_r)[0]    # (B, h, N, 1)
            lam_k = self.differential.choose(self.differential.router_k, phi_k, phi_k_r)[0]
        else:
            phi_q, phi_q_r = self.kernel_q(x, q, q_r)           # (ii) as DyDiLA
            phi_k, phi_k_r = self.kernel_k(x, k, k_r)
            lam_q = TokenDifferential.choose(self.differential.lambda_q, self.differential.router_q, x)
            lam_k = TokenDifferential.choose(self.differential.lambda_k, self.differential.router_k, x)
        q_t, k_t = phi_q - lam_q * phi_q_r, phi_k - lam_k * phi_k_r   # (iii) differential
        if not self.signed:
            q_t, k_t = F.relu(q_t), F.relu(k_t)
        if parts:
            return q_t, k_t, v, dict(phi_q=phi_q, phi_k=phi_k, phi_q_r=phi_q_r, phi_k_r=phi_k_r)
        return q_t, k_t, v

    def forward(self, x, hw):
        if not self.signed:
            return super().forward(x, hw)
        _check_tokens(x, hw, self.dim)
        q, k, v = self.features(x)                              # (B, h, N, d) each, q~ and k~ signed
        return self.proj(_merge_heads(signed_attention(q, k, v) + self.local(v, hw)))   # (B, N, C)

    def attention_matrix(self, x, hw):
        """The weights forward applies to V: (B, h, N, N); signed and unnormalised with "output"."""
        if not self.signed:
            return super().attention_matrix(x, hw)
        _check_tokens(x, hw, self.dim)
        q, k, _ = self.features(x)
        with _no_autocast(q):
            return _fp32(q) @ _fp32(k).transpose(-2, -1) * q.shape[-1] ** -0.5   # Q~ K~^T d^-1/2

    def attention_parts(self, x, hw):
        maps = super().attention_parts(x, hw)
        if self.signed:
            maps["differential"] = self.attention_matrix(x, hw)
        return maps

    @torch.no_grad()
    def routing(self, x):
        """As DyDiLA.routing; with "routing" the kernel and lambda choices are per head, (B, h, N),
        and the redundancies' kernels have routers of their own ("kernel_q_r", "kernel_k_r")."""
        if not self.per_head:
            return super().routing(x)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}) tokens, got shape {tuple(x.shape)}")
        h = self.num_heads
        q, k, _ = _qkv_heads(self.qkv, x, h)
        q_r, k_r = _split_heads(self.redundancy_q(x), h), _split_heads(self.redundancy_k(x), h)
        out = {"proj_q": self.redundancy_q.router(x)[0], "proj_k": self.redundancy_k.router(x)[0]}
        phi = {}
        for name, kernel, t in (("q", self.kernel_q, q), ("k", self.kernel_k, k), ("q_r", self.kernel_q_r, q_r),
                                ("k_r", self.kernel_k_r, k_r)):
            phi[name], out[f"kernel_{name}"] = kernel(_fp32(t))
        out["lambda_q"] = self.differential.choose(self.differential.router_q, phi["q"], phi["q_r"])[1]
        out["lambda_k"] = self.differential.choose(self.differential.router_k, phi["k"], phi["k_r"])[1]
        return out


BANK_LR = 10                    # "banks-lr": the banks' learning rate over the model's (docs/BENCHMARKS.md: how picked)


def bank_parameters(module):
    """The exponent and lambda banks of every DyDiLA in module (for "banks-lr": a higher learning rate)."""
    return [p for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] in ("theta", "lambda_q", "lambda_k",
                                                                                        "bank")]


def optimizer_groups(module, reading="ours"):
    """The optimiser's parameter groups, each with its "lr_scale" (the learning rate is lr x lr_scale):
    one group, or with reading "banks-lr" the banks (bank_parameters) at BANK_LR x the rest's rate."""
    banks = bank_parameters(module) if reading == "banks-lr" else []
    rest = [p for p in module.parameters() if all(p is not b for b in banks)]
    return [{"params": rest, "lr_scale": 1.0}] + ([{"params": banks, "lr_scale": float(BANK_LR)}] if banks else [])


# ----------------------------------------------------------------------------------------
# 5. DyDi-LiT: the DiT backbone with a swappable attention (DiT, Peebles & Xie 2023)
# ----------------------------------------------------------------------------------------

ATTENTIONS = {"softmax": SoftmaxAttention, "linear": LinearAttention, "dydila": DyDiLA}


def make_attention(attn, dim, num_heads, reading="ours", **kwargs):
    """An attention of ATTENTIONS by name; DyDiLA under a reading of READINGS ("ours", "banks-lr": DyDiLA)."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}: choose one of {', '.join(READINGS)}")
    if not READINGS[reading]:
        return ATTENTIONS[attn](dim, num_heads, **kwargs)
    if attn != "dydila":
        raise ValueError(f"reading {reading!r} is a reading of DyDiLA, not of {attn} attention")
    return DyDiLAReading(dim, num_heads, reading, **kwargs)


def sincos_pos_embed(dim, H, W):
    """Fixed 2-D sin-cos position embedding, in DiT's (and MAE's) channel order: the first half of
    the channels encodes the column, the second half the row, each as [sin(pos w), cos(pos w)]
    with w = 10000^(-k / (dim/4)); tokens row-major. -> (H*W, dim). A DiT checkpoint's weights
    mean the same here (LiT initialises from a trained DiT)."""
    if dim % 4 != 0:
        raise ValueError(f"dim = {dim} must be a multiple of 4: sin and cos of the column and of the row")
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    def embed(pos):                                             # (H, W) -> (H*W, dim/2)
        a = pos.reshape(-1, 1) * w
        return torch.cat([a.sin(), a.cos()], dim=1)
    return torch.cat([embed(cols), embed(rows)], dim=1).float()  # (H*W, dim): column first, as DiT


def timestep_embedding(t, dim, max_period=10000):
    """DiT's sinusoidal timestep embedding (TimestepEmbedder), of t in [0, 1] (float32, (B, dim))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    s = 1000 * t.float()                                        # choice (README item 12): DiT's step range  (B,)
    # k / 1000 in float32, times 1000, can miss the integer k by half an ulp (k = 3, 6, ...):
    # snap to an integer within an ulp, below float32's own rounding of the product for any t
    near = s.round()
    s = torch.where((s - near).abs() <= torch.finfo(torch.float32).eps * near, near, s)
    a = s[:, None] * freqs[None]                                # (B, dim/2)
    return torch.cat([a.cos(), a.sin()], dim=-1)                # (B, dim)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)   # (B, N, C), DiT adaLN


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; the attention is the only thing that varies."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, attn, attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = make_attention(attn, hidden_size, num_heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, hw):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, C)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), hw)    # (B, N, C)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))         # (B, N, C)
        return x


class DyDiLiT(nn.Module):
    """DyDi-LiT: a class-conditional diffusion transformer (DiT) whose attention is DyDiLA.

    attn="softmax" is DiT, attn="linear" is LiT, attn="dydila" is DyDi-LiT; attn_kwargs go to
    the attention constructor (e.g. the DyDiLA ablation switches). The output has the input's
    shape: epsilon (DDPM) or velocity (flow matching); t is a float in [0, 1] for both.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12,
                 num_heads=6, mlp_ratio=4.0, num_classes=10, class_dropout_prob=0.1,
                 attn="dydila", attn_kwargs=None):
        super().__init__()
        if attn not in ATTENTIONS:
            raise ValueError(f"unknown attention '{attn}': choose one of {sorted(ATTENTIONS)}")
        if input_size % patch_size != 0:
            raise ValueError(f"image size {input_size} is not divisible by patch size {patch_size}: "
                             f"use an image size that is a multiple of {patch_size}")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size = {hidden_size} must be a multiple of 4 (2-D sin-cos position embedding)")
        _check_heads(hidden_size, num_heads)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.hw = (input_size // patch_size, input_size // patch_size)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)  # patchify
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, *self.hw)[None], persistent=False)  # (1, N, C)
        self.t_embedder = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # id num_classes = null class (guidance)
        # choice (README item 11): DyDi-LiT is DiT's backbone with DyDiLA as its attention
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, attn, attn_kwargs or {}) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation, in one place."""
        for m in self.modules():                                # every Linear (qkv, proj, MLP, DyDiLA projectors): xavier
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # DyDiLA's routers, exponents and lambdas keep their own initial values (see their
        # classes); the DWC keeps PyTorch's conv default (LiT does not re-initialise it).
        w = self.x_embedder.weight                              # patchify like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)       # label table
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)    # timestep MLP
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:                               # DiT: adaLN-Zero, each block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_adaLN[-1].weight)             # DiT: zero final layer, the model starts at output 0
        nn.init.zeros_(self.final_adaLN[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def unpatchify(self, x):
        B = x.shape[0]
        (H, W), p, c = self.hw, self.patch_size, self.in_channels
        x = x.view(B, H, W, p, p, c)                            # (B, N, p*p*c) -> (B, H, W, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, c, H * p, W * p)  # (B, c, H*p, W*p)

    def _check_inputs(self, x, t, y):
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be (B, {want[0]}, {want[1]}, {want[2]}), got shape {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must be (B,) = ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be integers (torch.long), got {y.dtype}")
        # the range checks read y's and t's values: a host sync, and under torch.compile a graph
        # break that would also keep the step out of a CUDA graph. Compiled, they are skipped.
        if torch.compiler.is_compiling():
            return
        if int(y.min()) < 0 or int(y.max()) > self.num_classes:
            raise ValueError(f"labels must be integers in [0, {self.num_classes - 1}] "
                             f"(or {self.num_classes} for the null class), got range [{y.min().item()}, {y.max().item()}]")
        if not (t.min() >= 0 and t.max() <= 1):                 # also false for NaN
            raise ValueError(f"t must be times in [0, 1] (DDPM passes step / num_timesteps), "
                             f"got range [{t.min().item():g}, {t.max().item():g}]")

    def forward(self, x, t, y):
        """x: (B, c, S, S) noisy images, t: (B,) float in [0, 1], y: (B,) class ids -> (B, c, S, S)."""
        self._check_inputs(x, t, y)
        if self.training and self.class_dropout_prob > 0:       # label dropout, for classifier-free guidance
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        t_freq = timestep_embedding(t, 256).to(self.t_embedder[0].weight.dtype)  # (B, 256)
        c = self.t_embedder(t_freq) + self.y_embedder(y)            # (B, C) conditioning
        for block in self.blocks:
            x = block(x, c, self.hw)                            # (B, N, C)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)      # 2 x (B, C)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))  # (B, N, p*p*c)
        return self.unpatchify(x)                               # (B, c, S, S)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance: see guided_prediction."""
        return guided_prediction(self, x, t, y, cfg_scale)


def guided_prediction(model, x, t, y, cfg_scale):
    """Classifier-free guidance in one batched pass over [y; null]: uncond + s (cond - uncond),
    on all channels (unlike DiT, which guides 3 of 4). x, t, y: the conditional batch. It calls
    model(...), so a torch.compile'd model runs compiled (its forward_with_cfg would not: an
    attribute of the compiled wrapper is the plain module's)."""
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))   # (2B, c, S, S)
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


# DiT's naming and sizes (DiT-S, DiT-B; T is a tiny 6-layer model for one-GPU runs).
_SIZES = {"T": dict(hidden_size=192, depth=6, num_heads=3),
          "S": dict(hidden_size=384, depth=12, num_heads=6),
          "B": dict(hidden_size=768, depth=12, num_heads=12)}
MODELS = {f"DyDiLiT-{name}/{p}": functools.partial(DyDiLiT, patch_size=p, **size)
          for name, size in _SIZES.items() for p in (2, 4)}


# ----------------------------------------------------------------------------------------
# 6. Objectives: DDPM (epsilon prediction) and flow matching (rectified flow)
# ----------------------------------------------------------------------------------------

def _randn(shape, generator, device):
    """Noise from `generator` (on its own device, so CPU generators work for CUDA models)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps = {steps!r} must be a whole number >= 1 (sampler steps)")


def _predict(model, x, t, y, cfg_scale):
    return model(x, t, y) if cfg_scale == 1 else guided_prediction(model, x, t, y, cfg_scale)


class DDPM:
    """DDPM (Ho et al. 2020): epsilon prediction, fixed variance; ancestral or DDIM sampling.

    The model sees t = step / num_timesteps in [0, 1).
    """

    def __init__(self, num_timesteps=1000, schedule="linear"):
        _check_count("num_timesteps", num_timesteps)
        if schedule == "linear":                                # DDPM: beta from 1e-4 to 0.02
            betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
        elif schedule == "cosine":                              # Nichol & Dhariwal 2021, betas clipped at 0.999
            f = torch.cos((torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule '{schedule}': choose 'linear' or 'cosine'")
        self.num_timesteps = num_timesteps
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # abar_t, float64 (T,)

    def _abar(self, steps, like):
        return self.alphas_cumprod.to(like.device)[steps].to(like.dtype).view(-1, *[1] * (like.dim() - 1))  # (B, 1, 1, 1)

    def q_sample(self, x0, steps, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self._abar(steps, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def losses(self, model, x0, y, steps=None, noise=None):
        """Per-sample MSE on eps (B,) and the time in [0, 1] it was taken at (B,)."""
        if steps is None:
            steps = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        t = steps.float() / self.num_timesteps
        eps = model(self.q_sample(x0, steps, noise), t, y)
        return (eps.float() - noise.float()).pow(2).mean(dim=(1, 2, 3)), t

    def loss(self, model, x0, y):
        return self.losses(model, x0, y)[0].mean()

    @torch.no_grad()
    def sample(self, model, shape, y, steps=50, cfg_scale=1.0, generator=None, sampler="ancestral", progress=None):
        """Ancestral (fixed posterior variance) or DDIM (eta = 0) on `steps` evenly spaced steps.
        progress: wraps the loop over steps, e.g. tqdm.tqdm, for a progress bar."""
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampler '{sampler}' for DDPM: choose 'ancestral' or 'ddim'")
        _check_steps(steps)
        device = y.device
        ts = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()  # increasing
        abar = self.alphas_cumprod[ts]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])   # respaced: the step before each one
        x = _randn(shape, generator, device)
        order = range(len(ts) - 1, -1, -1)                      # from the noisiest step down
        for i in progress(order) if progress else order:
            a, a_prev = abar[i].item(), abar_prev[i].item()
            t = torch.full((shape[0],), ts[i].item() / self.num_timesteps, device=device)
            eps = _predict(model, x, t, y, cfg_scale).float()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)    # predicted clean image
            if sampler == "ddim":                               # DDIM, eta = 0: deterministic
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            else:                                               # DDPM posterior q(x_{t-1} | x_t, x0)
                # choice (README item 13): the fixed variance is the posterior's beta~ (DDPM's "sigma^2 = beta~")
                beta = 1 - a / a_prev
                mean = (math.sqrt(a_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a)
                var = beta * (1 - a_prev) / (1 - a)
                x = mean + math.sqrt(var) * _randn(shape, generator, device) if i > 0 else mean
        return x


class FlowMatching:
    """Rectified flow (Liu et al. 2022; SD3; minRF): x_t = (1 - t) x0 + t eps, the model
    predicts the velocity eps - x0; sampling integrates from t = 1 (noise) to t = 0."""

    def __init__(self, t_sampling="logit-normal"):
        if t_sampling not in ("logit-normal", "uniform"):
            raise ValueError(f"unknown t_sampling '{t_sampling}': choose 'logit-normal' or 'uniform'")
        self.t_sampling = t_sampling

    @staticmethod
    def interpolate(x0, t, noise):
        t = t.view(-1, *[1] * (x0.dim() - 1))
        return (1 - t) * x0 + t * noise

    def losses(self, model, x0, y, t=None, noise=None):
        """Per-sample MSE on the velocity (B,) and the time t in [0, 1] (B,)."""
        if t is None:
            n = torch.randn(x0.shape[0], device=x0.device)
            # choice (README item 13): t ~ logit-normal(0, 1) by default (SD3, minRF)
            t = torch.sigmoid(n) if self.t_sampling == "logit-normal" else torch.rand_like(n)
        noise = torch.randn_like(x0) if noise is None else noise
        v = model(self.interpolate(x0, t, noise), t, y)
        return (v.float() - (noise - x0).float()).pow(2).mean(dim=(1, 2, 3)), t

    def loss(self, model, x0, y):
        return self.losses(model, x0, y)[0].mean()

    @torch.no_grad()
    def sample(self, model, shape, y, steps=50, cfg_scale=1.0, generator=None, sampler="euler", progress=None):
        """Euler or Heun (2nd order; its last step is Euler) from t = 1 to t = 0.
        progress: wraps the loop over steps, e.g. tqdm.tqdm, for a progress bar."""
        if sampler not in ("euler", "heun"):
            raise ValueError(f"unknown sampler '{sampler}' for flow matching: choose 'euler' or 'heun'")
        _check_steps(steps)
        device = y.device
        x = _randn(shape, generator, device)
        ts = torch.linspace(1, 0, steps + 1).tolist()
        for k in progress(range(steps)) if progress else range(steps):
            t, t_next = ts[k], ts[k + 1]
            v = _predict(model, x, torch.full((shape[0],), t, device=device), y, cfg_scale).float()
            x_next = x + (t_next - t) * v
            if sampler == "heun" and t_next > 0:
                v_next = _predict(model, x_next, torch.full((shape[0],), t_next, device=device), y, cfg_scale).float()
                x_next = x + (t_next - t) * (v + v_next) / 2
            x = x_next
        return x


# ----------------------------------------------------------------------------------------
# 7. Training step and EMA (what train_tiny.py calls)
# ----------------------------------------------------------------------------------------

def training_step(model, objective, optimizer, x0, y, grad_clip=1.0, amp_dtype=None):
    """One update: loss under autocast (amp_dtype, e.g. torch.bfloat16) -> backward -> clip -> step.
    grad_clip: the largest gradient norm (None or 0: no clipping). A non-finite loss or gradient
    norm skips the optimizer step, so no NaN ever reaches the weights (this check is the step's one
    host sync). Returns the loss, per-sample losses, their t and the grad norm (detached tensors),
    and skipped (bool)."""
    if grad_clip is not None and not grad_clip >= 0:            # a negative max norm would flip the gradient
        raise ValueError(f"grad_clip = {grad_clip} must be a gradient norm > 0, or 0 / None for no clipping")
    ctx = torch.autocast(x0.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with ctx:
        losses, t = objective.losses(model, x0, y)
    loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    skipped = not bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    return {"loss": loss.detach(), "losses": losses.detach(), "t": t.detach(), "grad_norm": grad_norm.detach(),
            "skipped": skipped}


@torch.no_grad()
def update_ema(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, parameters only (DiT). decay=0 copies. Two models
    of different architectures are refused before any parameter changes."""
    if not 0 <= decay <= 1:
        raise ValueError(f"decay = {decay} must lie in [0, 1]")
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if [e.shape for e in ema_params] != [p.shape for p in params]:
        raise ValueError("ema and model differ in architecture (their parameters' number or shapes): "
                         "the EMA must be a copy of the model")
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach(), 1 - decay)
