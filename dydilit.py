"""
DyDiLA and DyDi-LiT in one file: the attention, the diffusion transformer, the objectives.

Paper: "Dynamic Differential Linear Attention: Enhancing Linear Diffusion Transformer for
High-Quality Image Generation", Cao, Wang, Shan, Ye, Yao, Wei, arXiv 2601.13683 (2026).

DyDiLA fixes the over-smoothed attention of linear attention with three designs:
  (i)   dynamic projection     Q'_i = X_i W_Q^{u_i},  u_i = argmax_u (X_i R_Q^P)_u      -> DynamicProjection
  (ii)  dynamic measure kernel phi_{g_i} with g_i = argmax over a kernel bank          -> DynamicMeasureKernel
  (iii) token differential     q~_i = relu(phi(q_i) - lambda_h phi(q'_i))               -> TokenDifferential
and DyDi-LiT is DiT with DyDiLA as its attention (DyDiLiT below).

The method section is not public: every place where this file fills a gap is marked
`# choice:` and listed in README.md ("Where this implementation interprets the paper").

Follows: DiT (Peebles & Xie 2023, facebookresearch/DiT models.py) for the backbone,
LiT (Wang et al. 2025, arXiv 2501.12976) and SANA for ReLU linear attention with a 5x5
depthwise conv, FLatten (Han et al. 2023) for the focused kernel, DDPM (Ho et al. 2020),
DDIM (Song et al. 2021) and rectified flow (Liu et al. 2022; minRF) for the objectives.

Shapes: B batch, N tokens, C channels, h heads, d head dim, H x W token grid, N = H * W
(row-major). Needs torch and nothing else.
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
    H, W = hw
    if N != H * W:
        raise ValueError(f"N = {N} tokens does not match hw = ({H}, {W}): N must equal H * W = {H * W}")
    if C != dim:
        raise ValueError(f"x has C = {C} channels but the attention was built with dim = {dim}")
    return B, N, C


def _check_heads(dim, num_heads):
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"dim = {dim} is not divisible by num_heads = {num_heads}: pick heads that divide dim")


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


def _fp32_contiguous(t):
    """_fp32(t) in the contiguous layout, in one copy: the cast and the relayout share a pass."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.to(torch.float32, memory_format=torch.contiguous_format)
    return t.contiguous()


def _no_autocast(t):
    return torch.autocast(t.device.type, enabled=False)


# ----------------------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------------------

def _power(s, g):
    """s^(g-1) for s >= 0; g is a number, or per token a one-hot row over the exponents 1..K,
    shape (..., K). Then s^(g-1) is a polynomial in s with one-hot coefficients: Horner's rule
    takes K-1 multiply-adds, where a float-exponent pow costs ~15 multiplies per element (CPU)."""
    if not torch.is_tensor(g):
        return s.pow(g - 1)
    if g.shape[-1] == 1:
        return torch.ones_like(s)
    w = torch.addcmul(g[..., -2], s, g[..., -1])
    for k in range(g.shape[-1] - 3, -1, -1):
        torch.addcmul(g[..., k], s, w, out=w)                   # w <- a_k + s w, in place
    return w


def _exponent(g):
    """The exponent: a number, or per token from the one-hot rows: (..., K) -> (..., 1)."""
    if not torch.is_tensor(g):
        return g
    return g @ torch.arange(1.0, g.shape[-1] + 1, dtype=g.dtype, device=g.device)


class _FocusedKernel(torch.autograd.Function):
    """scale * phi_g(x) with a closed-form backward that keeps two tensors of x's size (autograd
    would keep about ten), written for few passes over memory: that is what it costs on a CPU.

    phi_g is 1-homogeneous, so it is computed at s = relu(x) / m, m = max_j relu(x)_j: s lies in
    [0, 1] with largest entry exactly 1, so s^g cannot overflow and ||s||, ||s^g|| lie in [1, sqrt(d)].
    With w = s^(g-1), u = w s = s^g, n = ||s||, P = ||u||:  phi_g(x) = m n u / P."""

    @staticmethod
    def forward(ctx, x, g, scale):
        s = F.relu(x)
        m = s.amax(dim=-1, keepdim=True)
        s.div_(torch.where(m > 0, m, 1.0))                      # s (a row with x <= 0 everywhere stays 0)
        w = _power(s, g)                                        # s^(g-1)
        u = w * s                                               # s^g
        n = s.norm(dim=-1, keepdim=True).clamp_min(1)           # >= 1, or 0 -> 1 on a zero row (u = 0 = phi)
        P = u.norm(dim=-1, keepdim=True).clamp_min(1)
        k = m * n / P
        ctx.save_for_backward(s, w, n, P, k, *[t for t in (g, scale) if torch.is_tensor(t)])
        ctx.g = None if torch.is_tensor(g) else g
        ctx.scale = None if torch.is_tensor(scale) else scale
        # out of place: under torch.compile, torch 2.11 gives no gradient to a Function whose output was written in place
        return u * (k * scale)                                  # scale relu(x)^g ||relu(x)|| / ||relu(x)^g||

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        s, w, n, P, k, *rest = ctx.saved_tensors
        g = rest[0] if ctx.g is None else ctx.g                 # saved as (..., g, scale) where tensors
        c = rest[-1] if ctx.scale is None else ctx.scale        # the scale
        e = _exponent(g)                                        # a number or (..., 1), like P
        # The Jacobian of a 1-homogeneous map is the same at relu(x) and at s = relu(x) / m:
        #   dL/dr = c (n e/P) w (G - (G.u) u / P^2) + c (G.u) s / (n P),   dL/dx = dL/dr where x > 0,
        #   dL/dscale = (G.u) m n / P.   u, s and the last term vanish where x <= 0: mask G first.
        G = torch.ops.aten.threshold_backward(G, s, 0)          # relu' (s == 0 exactly where x <= 0)
        u = w * s
        Gu = (G * u).sum(-1, keepdim=True)
        d_scale = (Gu * k).sum_to_size(c.shape) if ctx.needs_input_grad[2] else None
        A = c * e * n / P
        d_x = G.mul_(A).addcmul_(u, A * Gu / P**2, value=-1).mul_(w).addcmul_(s, c * Gu / (n * P))
        return d_x, None, d_scale


def focused_kernel(x, g, scale=1.0):
    """Focused power kernel (FLatten; LiT "focused kernel"), norms over the head dim:

        phi_g(x) = relu(x)^g * ||relu(x)|| / ||relu(x)^g||

    g >= 1 is a number, or one exponent per token given as a one-hot row over the exponents
    1..K: a tensor of shape (..., K) whose leading dims broadcast to x[..., :1].
    g = 1 is the plain ReLU kernel of LiT / SANA. A larger g keeps the norm of relu(x) but
    moves its mass onto its largest coordinates: a sharper similarity.
    Returns scale * phi_g(x); a per-token scale (broadcastable to x[..., :1]) is applied inside
    the kernel's own output scaling, without a pass of its own (DyDiLA's gates and lambda).
    """
    if torch.is_tensor(g) or g != 1:
        return _FocusedKernel.apply(x, g, scale)
    return F.relu(x) if not torch.is_tensor(scale) and scale == 1 else F.relu(x) * scale  # phi_1 = relu


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
        # channels-last (d innermost, as tokens already are): oneDNN's depthwise conv ran its
        # forward+backward 2.5x faster this way than on NCHW (CPU; LiT 20% faster at 1,024 tokens)
        v = v.contiguous().view(B * h, *hw, d).permute(0, 3, 1, 2)  # (B*h, d, H, W), channels-last in memory
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
# 3. The three DyDiLA designs (DyDiLA paper, abstract designs (i)-(iii); the method section is not public)
# ----------------------------------------------------------------------------------------

class Router(nn.Module):
    """A hard per-token choice among n options: idx_i = argmax_u (X_i R)_u, R in R^{C x n}.

    The forward is the hard argmax.
    # choice: gradient reaches R through a straight-through gate g_i = 1 + p_i - sg(p_i),
    # p_i the softmax probability of the chosen option; g_i == 1 in the forward, and the
    # caller multiplies the chosen output by it. Logits are computed in float32 so that
    # autocast does not flip near-tied choices.
    """

    def __init__(self, dim, num_choices):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_choices, dim))   # R^T, like nn.Linear(dim, n, bias=False)
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x):
        """(B, N) hard choice and straight-through gate for tokens x: (B, N, C)."""
        with _no_autocast(x):
            return self.choose(F.linear(_fp32(x), _fp32(self.weight)))  # logits (B, N, n)

    @staticmethod
    def choose(logits):
        """(B, N) hard choice and straight-through gate from float32 logits (B, N, n)."""
        top, idx = logits.max(dim=-1, keepdim=True)             # (B, N, 1) hard choice
        p = 1 / (logits - top).exp().sum(dim=-1)                # its softmax probability (B, N)
        return idx.squeeze(-1), 1 + p - p.detach()              # gate == 1 in value


def route_together(routers, x):
    """[router(x) for router in routers], from one product: routers that read the same X_i are
    the columns of one matrix [R_1 ... R_m], so X [R_1 ... R_m] is one matmul, split after.
    Same values as routing one by one; on a CPU DyDiLA's four routers cost half as much this way."""
    with _no_autocast(x):
        W = torch.cat([_fp32(r.weight) for r in routers])      # (sum n, C)
        logits = F.linear(_fp32(x), W).split([len(r.weight) for r in routers], dim=-1)  # (B, N, n) each
        return [Router.choose(l) for l in logits]


class _GroupedMatmul(torch.autograd.Function):
    """y_i = x_i W_{u_i}^T for rows x: (M, C) and nn.Linear weights W_j: (C_out, C); the rows
    are sorted by u (`order`, its `inverse`, `counts` per W) so each W multiplies one block:

        forward   y_i = x_i W_{u_i}^T       backward  dx_i = dy_i W_{u_i},  dW_j = sum_{i: u_i = j} dy_i^T x_i

    Written out (not autograd over index_select / split / cat) so that the sort and the unsort
    are one gather each way and the blocks are written in place: autograd's version also
    concatenates the blocks both ways and zero-fills and scatters for each gather's backward,
    twice the passes over the (M, C) rows (DyDiLA 1-4% faster on a CPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse, counts, *Ws):
        xs = x.index_select(0, order)                           # rows grouped by projector (M, C)
        ys = torch.empty_like(xs)
        for W, a, out in zip(Ws, xs.split(counts), ys.split(counts)):
            torch.mm(a, W.to(a.dtype).t(), out=out)             # one block, one product
        ctx.save_for_backward(xs, order, inverse, *Ws)
        ctx.counts = counts
        return ys.index_select(0, inverse)                      # back to token order (M, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xs, order, inverse, *Ws = ctx.saved_tensors
        dys = dy.index_select(0, order)                         # (M, C) grouped like xs
        dxs, dWs = torch.empty_like(dys), []
        for W, a, g, out in zip(Ws, xs.split(ctx.counts), dys.split(ctx.counts), dxs.split(ctx.counts)):
            torch.mm(g, W.to(g.dtype), out=out)
            dWs.append(g.t() @ a)
        return dxs.index_select(0, inverse), None, None, None, *dWs


class DynamicProjection(nn.Module):
    """DyDiLA design (i), dynamic projection: each token picks one of n_P projectors,

        X'_i = X_i W^{u_i},  u_i = argmax_u (X_i R^P)_u,  W^j in R^{C x C} (shared across heads).

    On a CPU only the chosen projector runs for each token (`grouped`: one C x C matmul per
    token whatever n_P is); on a GPU all of them do and each token keeps its own (`dense`).
    n_P = 1 is a static projector.
    """

    def __init__(self, dim, num_projectors):
        super().__init__()
        if num_projectors < 1:
            raise ValueError(f"num_projectors = {num_projectors} must be >= 1")
        self.projectors = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_projectors))  # W^1..W^{n_P}
        self.router = Router(dim, num_projectors) if num_projectors > 1 else None                        # R^P

    def forward(self, x, route=None):
        """X'_i = X_i W^{u_i}: (B, N, C) -> (B, N, C), and the router's straight-through gate
        (B, N) (None when static). The caller scales by the gate (see TokenDifferential).
        route: this projection's (u, gate) if already computed (see route_together)."""
        if self.router is None:
            return self.projectors[0](x), None                  # (B, N, C)
        idx, gate = self.router(x) if route is None else route  # (B, N) hard choice u_i, straight-through gate
        # Same values either way: on a CPU each token runs only its projector (FLOPs cost there);
        # on a GPU every projector runs on every token and each keeps its own: n_P x the matmul
        # work, but no host synchronisation and a few large kernels instead of many small ones.
        return (self.grouped(x, idx) if x.device.type == "cpu" else self.dense(x, idx)), gate

    def grouped(self, x, idx):
        """X_i W^{u_i} with tokens grouped by projector: one C x C product per token. (B, N, C)."""
        B, N, C = x.shape
        idx = idx.reshape(B * N)
        order = idx.argsort()                                   # tokens grouped by their projector
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)  # the inverse permutation
        counts = torch.bincount(idx, minlength=len(self.projectors)).tolist()  # (host sync)
        y = _GroupedMatmul.apply(x.reshape(B * N, C), order, inverse, counts, *[W.weight for W in self.projectors])
        return y.view(B, N, C)

    def dense(self, x, idx):
        """X_i W^{u_i} from every projector on every token: one (C, n_P C) product. (B, N, C)."""
        W = torch.cat([p.weight for p in self.projectors])     # (n_P C, C)
        y = F.linear(x, W).unflatten(-1, (len(self.projectors), -1))  # X_i W^u for all u  (B, N, n_P, C)
        return y.gather(2, idx[:, :, None, None].expand(-1, -1, 1, y.shape[-1])).squeeze(2)  # (B, N, C)


class DynamicMeasureKernel(nn.Module):
    """DyDiLA design (ii), dynamic measure kernel: each token picks its kernel function,

        phi(x_i) = phi_{g_{c_i}}(x_i),  c_i = argmax_c (X_i R^K)_c,

    # choice: the bank is the focused power kernel with fixed whole exponents g in (1, 2, 3, 4);
    # g = 1 is plain ReLU. The paper's bank is not public.
    # choice: one choice per token, shared by all heads (the router reads X_i, like the
    # dynamic projection's router), and one router per side (queries, keys).
    A single exponent is a static kernel (no router).
    """

    def __init__(self, dim, exponents):
        super().__init__()
        for g in exponents:
            if isinstance(g, bool) or not isinstance(g, (int, float)):
                raise ValueError(f"unknown kernel {g!r}: the bank holds focused-kernel exponents, whole numbers >= 1 (1 is ReLU)")
        exponents = tuple(float(g) for g in exponents)
        if len(exponents) == 0:
            raise ValueError("kernel_exponents is empty: give at least one exponent, e.g. (1, 2, 3, 4)")
        if min(exponents) < 1 or any(g != int(g) for g in exponents):
            raise ValueError(f"kernel_exponents = {exponents}: every exponent must be a whole number >= 1 (1 is ReLU)")
        self.register_buffer("exponents", torch.tensor(exponents), persistent=False)  # (n_K,)
        # row c: one-hot of exponent g_c over 1..max g, the form focused_kernel takes per token
        self.register_buffer("one_hot", F.one_hot(self.exponents.long() - 1).float(), persistent=False)  # (n_K, max g)
        self.static_exponent = exponents[0] if len(exponents) == 1 else None          # a plain number: no device sync
        self.router = Router(dim, len(exponents)) if len(exponents) > 1 else None     # R^K

    def forward(self, t, idx, scale=1.0):
        """scale * phi_{g_i}(t_i) for head features t: (B, h, N, d), idx: (B, N) -> (B, h, N, d).
        scale: per token, broadcastable to (B, h, N, 1) (see focused_kernel)."""
        if self.static_exponent is not None:                    # one kernel for every token
            return focused_kernel(t, self.static_exponent, scale)
        g = self.one_hot.to(t.dtype)[idx]                       # (B, N, K) one exponent per token, one-hot
        return focused_kernel(t, g[:, None, :, None], scale)    # (B, 1, N, 1, K): broadcast over heads and d


class TokenDifferential(nn.Module):
    """DyDiLA design (iii), token differential operator: subtract from each token's features
    the features of its redundancy (from design (i), through the same kernel of design (ii)):

        q~_i = relu( phi(q_i) - lambda_h * phi(q'_i) )

    # choice: lambda_h = sigmoid(theta_h), one learnable scalar per head (initial 0.5), and
    # the outer relu keeps features non-negative so attention rows stay distributions.
    # (Differential Transformer subtracts two attention maps, A1 - lambda A2; here the
    # difference is taken on tokens, before the product, so the cost stays O(N).)
    """

    def __init__(self, num_heads, lambda_init=0.5):
        super().__init__()
        if not 0 < lambda_init < 1:
            raise ValueError(f"lambda_init = {lambda_init} must lie in (0, 1) (lambda = sigmoid(theta))")
        self.theta = nn.Parameter(torch.full((num_heads,), math.log(lambda_init / (1 - lambda_init))))

    @property
    def lam(self):
        return torch.sigmoid(self.theta)                        # (h,)

    def weight(self, gate=None):
        """lambda_h as a per-token scale for phi(t'): (h, 1, 1), or (B, h, N, 1) times the
        projection router's straight-through gate (B, N) (== 1 in value). The kernel applies it
        in its own output scaling: phi is 1-homogeneous, so lambda phi(gate t') = (lambda gate) phi(t'),
        the same values and gradients as scaling the tensors, without a pass over them."""
        lam = self.lam[:, None, None]                           # (h, 1, 1)
        return lam if gate is None else lam * gate[:, None, :, None]

    def forward(self, phi_x, lam_phi_r):
        """relu(phi(t) - lambda_h phi(t')), given phi(t) and lambda_h phi(t'): (B, h, N, d) each."""
        return (phi_x - lam_phi_r).relu_()


# ----------------------------------------------------------------------------------------
# 4. DyDiLA
# ----------------------------------------------------------------------------------------

class DyDiLA(LinearAttention):
    """Dynamic Differential Linear Attention: LiT's linear attention with features

        q~_i = relu( phi_{g_i}(q_i) - lambda_h phi_{g_i}(q'_i) ),   q_i = X_i W_Q^0,  q'_i = X_i W_Q^{u_i}
        k~_j = relu( phi_{g_j}(k_j) - lambda_h phi_{g_j}(k'_j) ),   k_j = X_j W_K^0,  k'_j = X_j W_K^{v_j}
        O_i  = q~_i^T (sum_j k~_j v_j^T) / (q~_i^T sum_j k~_j + eps)  +  DWC(V)_i

    # choice: the ablation switches mean: dynamic_projection=False uses one static
    # projector for Q', K'; dynamic_kernel=False uses the ReLU kernel; token_differential=False
    # drops Q', K' altogether (so dynamic_projection has nothing to act on). All three off is
    # exactly LinearAttention.
    """

    def __init__(self, dim, num_heads, num_projectors=3, kernel_exponents=(1, 2, 3, 4),
                 dynamic_projection=True, dynamic_kernel=True, token_differential=True,
                 lambda_init=0.5, dwc_kernel_size=5, eps=1e-6):
        super().__init__(dim, num_heads, dwc_kernel_size, eps)
        if num_projectors < 1:
            raise ValueError(f"num_projectors = {num_projectors} must be >= 1")
        if len(tuple(kernel_exponents)) == 0:
            raise ValueError("kernel_exponents is empty: give at least one exponent, e.g. (1, 2, 3, 4)")
        exponents = tuple(kernel_exponents) if dynamic_kernel else (1,)
        self.kernel_q = DynamicMeasureKernel(dim, exponents)    # design (ii), query side
        self.kernel_k = DynamicMeasureKernel(dim, exponents)    # design (ii), key side
        self.redundancy_q = self.redundancy_k = self.differential = None
        if token_differential:
            n_P = num_projectors if dynamic_projection else 1
            self.redundancy_q = DynamicProjection(dim, n_P)     # design (i): Q' = X W_Q^{u}
            self.redundancy_k = DynamicProjection(dim, n_P)     # design (i): K' = X W_K^{v}
            self.differential = TokenDifferential(num_heads, lambda_init)  # design (iii)

    def _routes(self, x):
        """Every router's (B, N) choice and straight-through gate, by name, from one product
        (route_together); a static design chooses 0 and has no gate."""
        routers = {"proj_q": getattr(self.redundancy_q, "router", None), "proj_k": getattr(self.redundancy_k, "router", None),
                   "kernel_q": self.kernel_q.router, "kernel_k": self.kernel_k.router}
        live = {name: r for name, r in routers.items() if r is not None}
        chosen = dict(zip(live, route_together(list(live.values()), x))) if live else {}
        static = (x.new_zeros(x.shape[:-1], dtype=torch.long), None)
        return {name: chosen.get(name, static) for name in routers}

    def _side(self, x, t, kernel, redundancy, kernel_route, proj_route):
        """Features of one side (queries or keys) from t = X W^0 in heads: (B, h, N, d), float32."""
        c, kernel_gate = kernel_route                           # (B, N) kernel choice per token, router gate
        # choice: the kernel router's gate scales phi(t_i) only, not phi(t'_i): a per-query scale
        # cancels in the normaliser, so the query router learns through the difference
        # (with token_differential off, the query-side kernel router gets no gradient).
        gate = 1.0 if kernel_gate is None else kernel_gate[:, None, :, None]  # (B, 1, N, 1)
        # contiguous: the kernel's input in the (B, h, N, d) layout of the gradients that come back
        # from the product; under autocast the float32 cast and this relayout are one copy.
        phi = kernel(_fp32_contiguous(t), c, gate)              # phi_{g_i}(t_i)          (B, h, N, d)
        if self.differential is None:
            return phi
        # choice: the redundancy t'_i goes through the same kernel phi_{g_i} as t_i, so the
        # difference compares like with like (the abstract: the redundancy is "produced by
        # the dynamic measure kernel").
        r, proj_gate = redundancy(x, proj_route)                # t'_i = X_i W^{u_i}      (B, N, C)
        r = _fp32_contiguous(_split_heads(r, self.num_heads))   # (B, h, N, d)
        lam_phi_r = kernel(r, c, self.differential.weight(proj_gate))  # lambda_h phi_{g_i}(t'_i)
        return self.differential(phi, lam_phi_r)                # relu(phi(t) - lambda_h phi(t'))

    def features(self, x):
        """q~, k~ (non-negative, float32) and V, each (B, h, N, d)."""
        q, k, v = _qkv_heads(self.qkv, x, self.num_heads)      # 3 x (B, h, N, d)
        r = self._routes(x)
        return (self._side(x, q, self.kernel_q, self.redundancy_q, r["kernel_q"], r["proj_q"]),
                self._side(x, k, self.kernel_k, self.redundancy_k, r["kernel_k"], r["proj_k"]), v)

    def attention_parts(self, x, hw):
        """For plots: the explicit (B, h, N, N) maps of DyDiLA's pieces.
        "base": phi(q).phi(k) normalised (kernels chosen, nothing subtracted); "redundancy":
        phi(q').phi(k') normalised; "differential": the weights forward applies (attention_matrix)."""
        _check_tokens(x, hw, self.dim)
        q, k, _ = _qkv_heads(self.qkv, x, self.num_heads)      # 3 x (B, h, N, d)
        r = self._routes(x)                                     # every router once, as in forward
        c_q, c_k = r["kernel_q"][0], r["kernel_k"][0]          # (B, N) kernel choices
        parts = {"base": normalised_scores(self.kernel_q(_fp32(q), c_q), self.kernel_k(_fp32(k), c_k), self.eps)}
        if self.differential is not None:
            q_r = _split_heads(self.redundancy_q(x, r["proj_q"])[0], self.num_heads)  # (B, h, N, d)
            k_r = _split_heads(self.redundancy_k(x, r["proj_k"])[0], self.num_heads)
            parts["redundancy"] = normalised_scores(self.kernel_q(_fp32(q_r), c_q), self.kernel_k(_fp32(k_r), c_k), self.eps)
        parts["differential"] = self.attention_matrix(x, hw)
        return parts

    @torch.no_grad()
    def routing(self, x):
        """The hard choices per token: dict of (B, N) long tensors (all zeros where static)."""
        return {name: idx for name, (idx, _) in self._routes(x).items()}


# ----------------------------------------------------------------------------------------
# 5. DyDi-LiT: the DiT backbone with a swappable attention (DiT, Peebles & Xie 2023)
# ----------------------------------------------------------------------------------------

ATTENTIONS = {"softmax": SoftmaxAttention, "linear": LinearAttention, "dydila": DyDiLA}


def sincos_pos_embed(dim, H, W):
    """Fixed 2-D sin-cos position embedding (DiT / MAE): half the channels encode the row,
    half the column, each as [sin(pos w), cos(pos w)] with w = 10000^(-k / (dim/4)). -> (H*W, dim)."""
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    def embed(pos):                                             # (H*W,) -> (H*W, dim/2)
        a = pos.reshape(-1, 1) * w
        return torch.cat([a.sin(), a.cos()], dim=1)
    return torch.cat([embed(rows), embed(cols)], dim=1).float()  # (H*W, dim)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1] (DiT's TimestepEmbedder).
    # choice: t is scaled by 1000 first, so the frequencies match DiT's integer steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = 1000 * t.float()[:, None] * freqs[None]                 # (B, dim/2)
    return torch.cat([a.cos(), a.sin()], dim=-1)                # (B, dim)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)   # (B, N, C), DiT adaLN


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; the attention is the only thing that varies."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, attn, attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = ATTENTIONS[attn](hidden_size, num_heads, **attn_kwargs)
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
        # DyDiLA routers initialise themselves (xavier, as Router does); the DWC keeps
        # PyTorch's conv default (LiT does not re-initialise it).
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
        # the range check reads y's values: a host sync, and under torch.compile a graph break
        # that would also keep the step out of a CUDA graph. Compiled, it is left to the embedding.
        if torch.compiler.is_compiling():
            return
        if int(y.min()) < 0 or int(y.max()) > self.num_classes:
            raise ValueError(f"labels must be integers in [0, {self.num_classes - 1}] "
                             f"(or {self.num_classes} for the null class), got range [{y.min().item()}, {y.max().item()}]")

    def forward(self, x, t, y):
        """x: (B, c, S, S) noisy images, t: (B,) float in [0, 1], y: (B,) class ids -> (B, c, S, S)."""
        self._check_inputs(x, t, y)
        if self.training and self.class_dropout_prob > 0:       # label dropout, for classifier-free guidance
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        c = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)  # (B, C) conditioning
        for block in self.blocks:
            x = block(x, c, self.hw)                            # (B, N, C)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)      # 2 x (B, C)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))  # (B, N, p*p*c)
        return self.unpatchify(x)                               # (B, c, S, S)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance in one batched pass over [y; null]: uncond + s (cond - uncond),
        on all channels (unlike DiT, which guides 3 of 4). x, t, y: the conditional batch."""
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, c, S, S)
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


def _predict(model, x, t, y, cfg_scale):
    return model(x, t, y) if cfg_scale == 1 else model.forward_with_cfg(x, t, y, cfg_scale)


class DDPM:
    """DDPM (Ho et al. 2020): epsilon prediction, fixed variance; ancestral or DDIM sampling.

    The model sees t = step / num_timesteps in [0, 1).
    """

    def __init__(self, num_timesteps=1000, schedule="linear"):
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
    def sample(self, model, shape, y, steps=50, cfg_scale=1.0, generator=None, sampler="ancestral"):
        """Ancestral (fixed posterior variance) or DDIM (eta = 0) on `steps` evenly spaced steps."""
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampler '{sampler}' for DDPM: choose 'ancestral' or 'ddim'")
        device = y.device
        ts = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()  # increasing
        abar = self.alphas_cumprod[ts]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])   # respaced: the step before each one
        x = _randn(shape, generator, device)
        for i in reversed(range(len(ts))):
            a, a_prev = abar[i].item(), abar_prev[i].item()
            t = torch.full((shape[0],), ts[i].item() / self.num_timesteps, device=device)
            eps = _predict(model, x, t, y, cfg_scale).float()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)    # predicted clean image
            if sampler == "ddim":                               # DDIM, eta = 0: deterministic
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            else:                                               # DDPM posterior q(x_{t-1} | x_t, x0)
                # choice: the fixed variance is the posterior's beta~ (DDPM's "sigma^2 = beta~" option)
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
            # choice: t ~ logit-normal(0, 1) by default (SD3, minRF); the paper's objective is not public
            t = torch.sigmoid(n) if self.t_sampling == "logit-normal" else torch.rand_like(n)
        noise = torch.randn_like(x0) if noise is None else noise
        v = model(self.interpolate(x0, t, noise), t, y)
        return (v.float() - (noise - x0).float()).pow(2).mean(dim=(1, 2, 3)), t

    def loss(self, model, x0, y):
        return self.losses(model, x0, y)[0].mean()

    @torch.no_grad()
    def sample(self, model, shape, y, steps=50, cfg_scale=1.0, generator=None, sampler="euler"):
        """Euler or Heun (2nd order; its last step is Euler) from t = 1 to t = 0."""
        if sampler not in ("euler", "heun"):
            raise ValueError(f"unknown sampler '{sampler}' for flow matching: choose 'euler' or 'heun'")
        device = y.device
        x = _randn(shape, generator, device)
        ts = torch.linspace(1, 0, steps + 1).tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
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
    Returns detached tensors (no host sync): loss, per-sample losses, their t, grad norm."""
    ctx = torch.autocast(x0.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with ctx:
        losses, t = objective.losses(model, x0, y)
    loss = losses.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    return {"loss": loss.detach(), "losses": losses.detach(), "t": t.detach(), "grad_norm": grad_norm.detach()}


@torch.no_grad()
def update_ema(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, parameters only (DiT). decay=0 copies."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
