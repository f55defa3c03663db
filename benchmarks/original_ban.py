"""The baseline of the speed benchmarks: a straightforward re-statement of the original release's
computation as trainable modules (its classes FCNet, BCNet, BiAttention and BanModel, in its
layout: torch's weight-norm hook with dim=None on every linear layer, one einsum per bilinear
product, a per-glimpse loop that also runs the counting module once per glimpse).

`OriginalBAN.from_ban(model)` copies the weights of a `ban.BAN`, so both compute the same logits.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import weight_norm

from ban.counting import Counter

warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated")


class _OriginalPiecewiseLin(nn.Module):
    """The release's piecewise-linear map: a cumulative sum gathered at the input's segment."""

    def __init__(self, n=16):
        super().__init__()
        self.n = n
        self.weight = nn.Parameter(torch.ones(n + 1))
        self.weight.data[0] = 0

    def forward(self, x):
        w = self.weight.abs()
        w = w / w.sum()
        w = w.view([self.n + 1] + [1] * x.dim())
        csum = w.cumsum(dim=0).expand((self.n + 1,) + tuple(x.size()))
        w = w.expand_as(csum)
        y = self.n * x.unsqueeze(0)
        idx = y.long()
        f = y.frac()
        x = csum.gather(0, idx.clamp(max=self.n))
        x = x + f * w.gather(0, (idx + 1).clamp(max=self.n))
        return x.squeeze(0)


class _OriginalCounter(Counter):
    """The counting module with the release's piecewise-linear maps (same math, same keys)."""

    def __init__(self, objects=10):
        super().__init__(objects)
        self.f = nn.ModuleList(_OriginalPiecewiseLin(16) for _ in range(16))


def _fc(in_dim, out_dim, relu=True, dropout=0.0):
    layers = [nn.Dropout(dropout)] if dropout > 0 else []
    layers.append(weight_norm(nn.Linear(in_dim, out_dim), dim=None))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _BCNet(nn.Module):
    def __init__(self, v_dim, q_dim, h_dim, glimpses, k):
        super().__init__()
        self.v_net = _fc(v_dim, h_dim * k, dropout=0.2)
        self.q_net = _fc(q_dim, h_dim * k, dropout=0.2)
        self.dropout = nn.Dropout(0.5)
        if glimpses:
            self.h_mat = nn.Parameter(torch.randn(1, glimpses, 1, h_dim * k))
            self.h_bias = nn.Parameter(torch.randn(1, glimpses, 1, 1))

    def forward(self, v, q):
        v_ = self.dropout(self.v_net(v))
        q_ = self.q_net(q)
        return torch.einsum("xhyk,bvk,bqk->bhvq", self.h_mat, v_, q_) + self.h_bias

    def forward_with_weights(self, v, q, w):
        v_ = self.v_net(v)
        q_ = self.q_net(q)
        return torch.einsum("bvk,bvq,bqk->bk", v_, w, q_)


class OriginalBAN(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        emb_in = c.embedding_dim * (2 if c.tfidf_embedding else 1)
        self.emb = nn.Embedding(c.vocab_size + 1, c.embedding_dim, padding_idx=c.vocab_size)
        self.emb_ = nn.Embedding(c.vocab_size + 1, c.embedding_dim, padding_idx=c.vocab_size)
        self.rnn = nn.GRU(emb_in, c.hidden, batch_first=True)
        self.v_att = weight_norm(
            _BCNet(c.visual_dim, c.hidden, c.hidden, c.glimpses, c.rank), "h_mat", dim=None
        )
        self.b_net = nn.ModuleList(
            _BCNet(c.visual_dim, c.hidden, c.hidden, None, 1) for _ in range(c.glimpses)
        )
        self.q_prj = nn.ModuleList(
            _fc(c.hidden, c.hidden, relu=False, dropout=0.2) for _ in range(c.glimpses)
        )
        self.c_prj = nn.ModuleList(_fc(c.max_objects + 1, c.hidden) for _ in range(c.glimpses))
        self.counter = _OriginalCounter(c.max_objects)
        self.classifier = nn.Sequential(
            weight_norm(nn.Linear(c.hidden, 2 * c.hidden), dim=None), nn.ReLU(), nn.Dropout(0.5),
            weight_norm(nn.Linear(2 * c.hidden, c.num_answers), dim=None),
        )  # fmt: skip

    def forward(self, v, b, q):
        w = self.emb(q)
        if self.config.tfidf_embedding:
            w = torch.cat([w, self.emb_(q)], dim=2)
        q_emb, _ = self.rnn(w)
        logits = self.v_att(v, q_emb)
        mask = (v.abs().sum(2) == 0).unsqueeze(1).unsqueeze(3).expand(logits.size())
        logits = logits.masked_fill(mask, float("-inf"))
        g, n, t = logits.shape[1:]
        att = torch.softmax(logits.view(-1, g, n * t), 2).view(logits.shape)
        boxes = b[:, :, :4].transpose(1, 2)
        for i in range(g):
            b_emb = self.b_net[i].forward_with_weights(v, q_emb, att[:, i])
            q_emb = self.q_prj[i](b_emb.unsqueeze(1)) + q_emb
            if self.config.counter:
                embed = self.counter(boxes, logits[:, i].max(2).values)
                q_emb = q_emb + self.c_prj[i](embed).unsqueeze(1)
        return self.classifier(q_emb.sum(1)), att

    @classmethod
    def from_ban(cls, model) -> OriginalBAN:
        """The same weights as a `ban.BAN` (fusion 'residual')."""
        original = cls(model.config)
        ours = model.state_dict()
        mapping = {
            "emb.weight": "embedding.words.weight",
            "rnn.": "question_encoder.",
            "v_att.h_mat_g": "attention.h_mat_g",
            "v_att.h_bias": "attention.h_bias",
            "v_att.v_net.1.": "attention.v_net.linear.",
            "v_att.q_net.1.": "attention.q_net.linear.",
            "classifier.0.": "classifier.hidden.linear.",
            "classifier.3.": "classifier.output.",
            "counter.": "counter.",
        }
        if model.config.tfidf_embedding:
            mapping["emb_.weight"] = "embedding.tfidf.weight"
        for i in range(model.config.glimpses):
            mapping[f"b_net.{i}.v_net.1."] = f"pooling.{i}.v_net.linear."
            mapping[f"b_net.{i}.q_net.1."] = f"pooling.{i}.q_net.linear."
            mapping[f"q_prj.{i}.1."] = f"question_projections.{i}.linear."
            mapping[f"c_prj.{i}.0."] = f"count_projections.{i}.linear."
        state = {}
        for key, value in original.state_dict().items():
            if key == "v_att.h_mat_v":
                state[key] = ours["attention.h_mat_v"].view(value.shape)
                continue
            if key == "v_att.h_bias":
                state[key] = ours["attention.h_bias"].view(value.shape)
                continue
            for old, new in mapping.items():
                if key.startswith(old) and key.replace(old, new, 1) in ours:
                    state[key] = ours[key.replace(old, new, 1)].view(value.shape)
                    break
            else:
                state[key] = value  # parts the configuration leaves unused (emb_, counter)
        original.load_state_dict(state)
        return original
