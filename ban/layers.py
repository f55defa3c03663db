"""The building blocks of BAN, each usable on its own.

    from ban.layers import BilinearAttentionMap, BilinearPooling

Equation numbers refer to Kim, Jun and Zhang, "Bilinear Attention Networks", NeurIPS 2018.
Every linear layer is weight-normalised with ONE scalar gain per matrix (w = g * v / ||v||_F),
as in the original release (`weight_norm(..., dim=None)`), not one gain per output row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """A linear layer whose weight is `g * v / ||v||_F` with a single scalar gain `g`.

    Initialised like `nn.Linear`, with `g = ||v||_F`, so the initial weight equals `v`.
    Parameter names (`weight_g`, `weight_v`, `bias`) match the release's checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.empty(()))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._cached_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm())
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight `[out, in]`.

        Without autograd (inference) it is computed once and reused until `weight_v` or
        `weight_g` change (in-place updates bump their version counters) or move.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return weight_norm(self.weight_v, self.weight_g)
        v, g = self.weight_v, self.weight_g
        key = (v._version, g._version, v.device, v.dtype, v.data_ptr(), g.data_ptr())
        if key != self._cache_key:
            self._cached_weight = weight_norm(v, g)
            self._cache_key = key
        return self._cached_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Dropout(nn.Dropout):
    """`nn.Dropout`, whose mask on CPU is drawn as `rand >= p`: the same distribution, but torch's
    CPU Bernoulli sampler is ~2.3x slower than `rand`, which made dropout 13% of a paper-size
    training step there. On other devices, torch's fused dropout (one kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self.training or self.p in (0.0, 1.0) or self.inplace:
            return super().forward(x)
        return torch.where(torch.rand_like(x) >= self.p, x * (1 / (1 - self.p)), 0)


def weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`g * v / ||v||_F` with one scalar gain for the whole tensor (weight_norm with dim=None)."""
    return _WeightNorm.apply(v, g)


class _WeightNorm(torch.autograd.Function):
    """w = s v with s = g / ||v||_F. With G = dL/dw and d = <G, v>:

        dL/dv = s G - (s d / ||v||^2) v,        dL/dg = d / ||v||

    computed in three passes over v (a dot product, a scaling, a fused multiply-add); autograd's
    own backward of `v * (g / v.norm())` takes about eight, which made weight normalisation ~10%
    of a paper-size training step on CPU.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(v)
        scale = g / norm
        ctx.save_for_backward(v, scale, norm)
        return v * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, scale, norm = ctx.saved_tensors
        dot = torch.tensordot(grad, v, dims=grad.dim())  # <G, v>, without a temporary
        grad_v = (grad * scale).addcmul_(v, scale * dot / norm**2, value=-1)
        return grad_v, dot / norm


class FCNet(nn.Module):
    """Dropout (if p > 0), then a weight-normalised linear layer, then ReLU (if `relu`).

    The release's `FCNet([in, out], act, dropout)` for a single layer.
    """

    def __init__(self, in_features: int, out_features: int, relu: bool = True, dropout=0.0):
        super().__init__()
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = WeightNormLinear(in_features, out_features)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(self.dropout(x))
        return F.relu(x) if self.relu else x


class BilinearAttentionMap(nn.Module):
    """Low-rank bilinear attention maps, G glimpses at once (Eq. 3-4).

    With Y' = ReLU(Y W_v) `[B, N, HK]` and X' = ReLU(X W_q) `[B, T, HK]`:

        logits[b, g, n, t] = sum_k p_g[k] * Y'[b, n, k] * X'[b, t, k] + b_g        (Eq. 4)

    and the map of glimpse g is one softmax over the joint N x T grid (Eq. 3). The matrix of all
    p_g is weight-normalised with one shared gain. Padded boxes get -inf logits and so exactly zero
    attention; padded question tokens are masked only when a `question_mask` is given (the
    release does not mask them).

    Args:
        visual_dim: Dv, the region feature size.
        question_dim: the question token state size (H of the GRU).
        hidden: H; the joint rank is `hidden * rank` (the paper's K' = 3K).
        glimpses: G, the number of attention maps.
        rank: K, the rank multiplier (3 in the paper).
    """

    def __init__(
        self,
        visual_dim: int,
        question_dim: int,
        hidden: int,
        glimpses: int,
        rank: int = 3,
        dropout: float = 0.2,
        attention_dropout: float = 0.5,
    ):
        super().__init__()
        joint = hidden * rank
        self.glimpses = glimpses
        self.v_net = FCNet(visual_dim, joint, relu=True, dropout=dropout)
        self.q_net = FCNet(question_dim, joint, relu=True, dropout=dropout)
        self.visual_dropout = Dropout(attention_dropout)
        # p_g of Eq. 4 for all glimpses, weight-normalised as one matrix (the release's h_mat).
        self.h_mat_v = nn.Parameter(torch.randn(glimpses, joint))
        self.h_mat_g = nn.Parameter(self.h_mat_v.detach().norm().clone())
        self.h_bias = nn.Parameter(torch.randn(glimpses))

    @property
    def h_mat(self) -> torch.Tensor:
        """The glimpse vectors p_g, `[G, HK]`."""
        return weight_norm(self.h_mat_v, self.h_mat_g)

    def logits(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Unmasked bilinear logits (Eq. 4).

        Args:
            v: `[B, N, Dv]` region features.
            q: `[B, T, Dq]` question token states.
        Returns:
            `[B, G, N, T]`.
        """
        v_ = self.visual_dropout(self.v_net(v))  # [B, N, HK]
        q_ = self.q_net(q)  # [B, T, HK]
        batch, tokens, _ = q_.shape
        fold = _FoldedLogits.apply if v_.device.type == "cpu" else _folded_logits
        logits = fold(v_, q_, self.h_mat)  # [B, N, G*T]
        logits = logits.view(batch, -1, self.glimpses, tokens).permute(0, 2, 1, 3)
        return logits + self.h_bias.view(1, -1, 1, 1)

    def forward(
        self,
        v: torch.Tensor,
        q: torch.Tensor,
        box_mask: torch.Tensor,
        question_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention maps and their pre-softmax logits.

        Args:
            v: `[B, N, Dv]` region features.
            q: `[B, T, Dq]` question token states.
            box_mask: `[B, N]` bool, True for real boxes.
            question_mask: optional `[B, T]` bool, True for real tokens.
        Returns:
            `(maps, logits)`, both `[B, G, N, T]`; each map sums to 1 over (N, T); the logits of
            masked positions are -inf.
        """
        logits = self.logits(v, q)
        mask = box_mask[:, None, :, None]
        if question_mask is not None:
            mask = mask & question_mask[:, None, None, :]
        logits = logits.masked_fill(~mask, float("-inf"))
        batch, glimpses, boxes, tokens = logits.shape
        maps = F.softmax(logits.reshape(batch, glimpses, boxes * tokens), dim=-1)  # Eq. 3
        return maps.view(batch, glimpses, boxes, tokens), logits


def _folded_logits(v_: torch.Tensor, q_: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_k p[g, k] v_[b, n, k] q_[b, t, k] as `[B, N, G*T]`: p_g is folded into the question
    side (T <= N), `[B, G*T, HK]`, then one batched matmul."""
    batch, _, joint = q_.shape
    q_g = (q_.unsqueeze(1) * p[None, :, None, :]).reshape(batch, -1, joint)
    return torch.bmm(v_, q_g.transpose(1, 2))


class _FoldedLogits(torch.autograd.Function):
    """`_folded_logits` with its backward written out, used on CPU. With Q_g = q_ * p_g and the
    incoming gradient G `[B, N, G*T]`:

        dv_ = G Q,    dQ = G^T v_,    dq_ = sum_g dQ_g * p_g,    dp_g = sum_{b,t} dQ_g * q_

    autograd's own backward of the broadcast product reduces `[B, G, T, HK]` over two strided
    dimensions and runs its batched products on transposed operands: forward and backward took
    38.9 ms at `ban-small`'s size (batch 128, one CPU thread), this 22.2 ms (docs/performance.md,
    change 8). The forward is `bmm(Q, v_^T)`, a faster layout there. Same values up to the order
    of the sums."""

    @staticmethod
    def forward(ctx, v_: torch.Tensor, q_: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        batch, _, joint = q_.shape
        q_g = (q_.unsqueeze(1) * p[None, :, None, :]).reshape(batch, -1, joint)
        ctx.save_for_backward(v_, q_, p, q_g)
        return torch.bmm(q_g, v_.transpose(1, 2)).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v_, q_, p, q_g = ctx.saved_tensors
        batch, tokens, joint = q_.shape
        grad_v = torch.bmm(grad, q_g.to(grad.dtype)).to(v_.dtype)
        grad_q_g = torch.bmm(grad.transpose(1, 2), v_.to(grad.dtype)).to(q_g.dtype)
        grad_q_g = grad_q_g.view(batch, -1, tokens, joint)  # [B, G, T, HK]
        grad_q = grad_q_g[:, 0] * p[0]
        for g in range(1, len(p)):
            grad_q.addcmul_(grad_q_g[:, g], p[g])
        grad_p = torch.stack([(dq * q_).reshape(-1, joint).sum(0) for dq in grad_q_g.unbind(1)])
        return grad_v, grad_q.to(q_.dtype), grad_p.to(p.dtype)


class BilinearPooling(nn.Module):
    """Bilinear pooling of one attention map into a joint vector (Eq. 5).

        f[b, k] = sum_{n,t} Y''[b, n, k] * A[b, n, t] * X''[b, t, k]

    with Y'' = ReLU(Y U) and X'' = ReLU(X V) of size `hidden * rank`; when rank K > 1 the
    result is sum-pooled over consecutive groups of K, giving `[B, hidden]`. The released VQA
    model uses rank 1 here (no pooling).
    """

    def __init__(self, visual_dim: int, question_dim: int, hidden: int, rank: int = 1, dropout=0.2):
        super().__init__()
        self.rank = rank
        self.v_net = FCNet(visual_dim, hidden * rank, relu=True, dropout=dropout)
        self.q_net = FCNet(question_dim, hidden * rank, relu=True, dropout=dropout)

    def forward(self, v: torch.Tensor, q: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """
        Args:
            v: `[B, N, Dv]`, q: `[B, T, Dq]`, attention: `[B, N, T]`.
        Returns:
            `[B, hidden]`.
        """
        v_ = self.v_net(v)  # [B, N, HK]
        q_ = self.q_net(q)  # [B, T, HK]
        # (A X'') first: the intermediate is [B, N, HK], never [B, N, T, HK].
        joint = (v_ * torch.bmm(attention, q_)).sum(dim=1)  # [B, HK]
        if self.rank > 1:
            joint = joint.view(joint.shape[0], -1, self.rank).sum(dim=2)
        return joint
