"""An independent, deliberately naive re-statement of the original release's forward computation,
working directly on a state dict in the release's layout (`module.`-prefixed keys, weight_g and
weight_v pairs). It shares no code with `ban`: it exists to hold `ban.load_official` to the
original computation. Inference only (no dropout).

Also: `random_release_state`, which writes random weights in the release's exact key layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wn_linear(state, prefix, x):
    g, v, bias = state[prefix + "weight_g"], state[prefix + "weight_v"], state[prefix + "bias"]
    weight = g.reshape(()) * v / torch.norm(v)  # dim=None: one gain for the whole matrix
    return x @ weight.t() + bias


def _piecewise(weight, x):
    n = weight.numel() - 1
    w = weight.abs() / weight.abs().sum()
    w = w.view([n + 1] + [1] * x.dim())
    csum = w.cumsum(dim=0).expand((n + 1,) + tuple(x.shape))
    w = w.expand_as(csum)
    y = n * x.unsqueeze(0)
    idx = y.long()
    frac = y.frac()
    out = csum.gather(0, idx.clamp(max=n)) + frac * w.gather(0, (idx + 1).clamp(max=n))
    return out.squeeze(0)


def _counter(state, boxes, attention, objects=10):
    f = [state[f"module.counter.f.{i}.weight"] for i in range(16)]

    def outer(x):
        size = tuple(x.size()) + (x.size()[-1],)
        return x.unsqueeze(-1).expand(*size), x.unsqueeze(-2).expand(*size)

    def outer_product(x):
        a, b = outer(x)
        return a * b

    def outer_diff(x):
        a, b = outer(x)
        return (a - b).abs()

    def area(box):
        return (box[:, 2, :] - box[:, 0, :]).clamp(min=0) * (box[:, 3, :] - box[:, 1, :]).clamp(
            min=0
        )

    def iou(a, b):
        size = (a.size(0), 2, a.size(2), b.size(2))
        lo = torch.max(
            a[:, :2, :].unsqueeze(3).expand(*size), b[:, :2, :].unsqueeze(2).expand(*size)
        )
        hi = torch.min(
            a[:, 2:, :].unsqueeze(3).expand(*size), b[:, 2:, :].unsqueeze(2).expand(*size)
        )
        inter = (hi - lo).clamp(min=0)
        inter = inter[:, 0] * inter[:, 1]
        area_a = area(a).unsqueeze(2).expand_as(inter)
        area_b = area(b).unsqueeze(1).expand_as(inter)
        return inter / (area_a + area_b - inter + 1e-12)

    attention, idx = attention.topk(objects, dim=1, sorted=False)
    idx = idx.unsqueeze(1).expand(boxes.size(0), boxes.size(1), idx.size(1))
    boxes = boxes.gather(2, idx)
    attention = torch.sigmoid(attention)
    relevancy = outer_product(attention)
    distance = 1 - iou(boxes, boxes)
    score = _piecewise(f[0], relevancy) * _piecewise(f[1], distance)
    dedup_score = _piecewise(f[3], relevancy) * _piecewise(f[4], distance)
    sim = _piecewise(f[2], 1 - outer_diff(dedup_score)).prod(dim=1) * _piecewise(
        f[2], 1 - outer_diff(attention)
    )
    row_sims = sim.sum(dim=2)
    score = score / outer_product(row_sims)
    correction = _piecewise(f[0], attention * attention) / row_sims
    score = score.sum(dim=2).sum(dim=1, keepdim=True) + correction.sum(dim=1, keepdim=True)
    score = (score + 1e-20).sqrt()
    scores = score.clamp(min=0, max=objects)
    i = scores.long()
    frac = scores.frac()
    left = torch.zeros(i.size(0), objects + 1).scatter_(1, i.clamp(max=objects), 1)
    right = torch.zeros(i.size(0), objects + 1).scatter_(1, (i + 1).clamp(max=objects), 1)
    one_hot = (1 - frac) * left + frac * right
    att_conf = (_piecewise(f[5], attention) - 0.5).abs()
    dist_conf = (_piecewise(f[6], distance) - 0.5).abs()
    conf = _piecewise(
        f[7], att_conf.mean(dim=1, keepdim=True) + dist_conf.mean(dim=2).mean(dim=1, keepdim=True)
    )
    return one_hot * conf


def _gru(state, x):
    w_ih, w_hh = state["module.q_emb.rnn.weight_ih_l0"], state["module.q_emb.rnn.weight_hh_l0"]
    b_ih, b_hh = state["module.q_emb.rnn.bias_ih_l0"], state["module.q_emb.rnn.bias_hh_l0"]
    hidden = w_hh.shape[1]
    h = torch.zeros(x.shape[0], hidden)
    outputs = []
    for t in range(x.shape[1]):  # gates r, z, n in PyTorch's order
        gi = x[:, t] @ w_ih.t() + b_ih
        gh = h @ w_hh.t() + b_hh
        r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = torch.sigmoid(gi[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
        n = torch.tanh(gi[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
        h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def _question_states(state, q):
    emb = F.embedding(q, state["module.w_emb.emb.weight"])
    if "module.w_emb.emb_.weight" in state:
        emb = torch.cat([emb, F.embedding(q, state["module.w_emb.emb_.weight"])], dim=2)
    return _gru(state, emb)


def _attention_logits(state, v, x):
    p = "module.v_att.logits."
    v_ = torch.relu(_wn_linear(state, p + "v_net.main.1.", v))
    q_ = torch.relu(_wn_linear(state, p + "q_net.main.1.", x))
    h_mat = (
        state[p + "h_mat_g"].reshape(()) * state[p + "h_mat_v"] / torch.norm(state[p + "h_mat_v"])
    )
    logits = torch.einsum("xhyk,bvk,bqk->bhvq", h_mat, v_, q_)
    return logits + state[p + "h_bias"]


def release_vqa_forward(state, v, b, q):
    """The release's `BanModel.forward(v, b, q, labels)` at eval time: (logits, att)."""
    x = _question_states(state, q)
    glimpses = state["module.v_att.logits.h_mat_v"].shape[1]
    logits = _attention_logits(state, v, x)
    v_mask = (v.abs().sum(2) == 0).unsqueeze(1).unsqueeze(3).expand(logits.size())
    logits = logits.masked_fill(v_mask, -float("inf"))
    att = F.softmax(logits.view(-1, glimpses, logits.shape[2] * logits.shape[3]), 2)
    att = att.view(logits.shape)
    boxes = b[:, :, :4].transpose(1, 2)
    has_counter = "module.counter.f.0.weight" in state
    for g in range(glimpses):
        v_ = torch.relu(_wn_linear(state, f"module.b_net.{g}.v_net.main.1.", v))
        q_ = torch.relu(_wn_linear(state, f"module.b_net.{g}.q_net.main.1.", x))
        b_emb = torch.einsum("bvk,bvq,bqk->bk", v_, att[:, g], q_)
        x = _wn_linear(state, f"module.q_prj.{g}.main.1.", b_emb.unsqueeze(1)) + x
        if has_counter:
            atten, _ = logits[:, g].max(2)
            embed = _counter(state, boxes, atten)
            x = x + torch.relu(_wn_linear(state, f"module.c_prj.{g}.main.0.", embed)).unsqueeze(1)
    hidden = torch.relu(_wn_linear(state, "module.classifier.main.0.", x.sum(1)))
    return _wn_linear(state, "module.classifier.main.3.", hidden), att


def release_flickr_logits(state, v, q, entity_index):
    """The release's grounding scores: attention logits of each phrase's last token, [B, E, N]."""
    x = _question_states(state, q)
    phrases = torch.stack([x[i, entity_index[i]] for i in range(x.shape[0])])
    logits = _attention_logits(state, v, phrases)[:, 0]  # [B, N, E]
    logits = logits.masked_fill((v.abs().sum(2) == 0).unsqueeze(2), -99.0)
    return logits.transpose(1, 2)


def random_release_state(
    vocab=50, dim=12, tfidf=True, hidden=16, glimpses=2, visual=20, answers=7, counter=True,
    grounding=False, gain_shape=(), seed=0,
):  # fmt: skip
    """Random weights under the release's exact keys and shapes (SPEC section 2)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=gen) * scale

    def gain(matrix_norm):
        return (matrix_norm * (0.5 + torch.rand((), generator=gen))).reshape(gain_shape)

    def wn(prefix, out_f, in_f):
        v = rand(out_f, in_f)
        return {
            prefix + "weight_g": gain(v.norm()),
            prefix + "weight_v": v,
            prefix + "bias": rand(out_f, scale=0.1),
        }

    state = {"w_emb.emb.weight": rand(vocab + 1, dim, scale=1.0)}
    state["w_emb.emb.weight"][vocab] = 0
    if tfidf:
        state["w_emb.emb_.weight"] = rand(vocab + 1, dim, scale=1.0)
        state["w_emb.emb_.weight"][vocab] = 0
    gru_in = dim * (2 if tfidf else 1)
    rnn = "q_emb.rnn."
    state[rnn + "weight_ih_l0"] = rand(3 * hidden, gru_in)
    state[rnn + "weight_hh_l0"] = rand(3 * hidden, hidden)
    state[rnn + "bias_ih_l0"] = rand(3 * hidden)
    state[rnn + "bias_hh_l0"] = rand(3 * hidden)
    h_mat = rand(1, glimpses, 1, 3 * hidden, scale=1.0)
    state.update({"v_att.logits.h_mat_v": h_mat, "v_att.logits.h_mat_g": gain(h_mat.norm()) * 0.1,
                  "v_att.logits.h_bias": rand(1, glimpses, 1, 1, scale=1.0)})  # fmt: skip
    state.update(wn("v_att.logits.v_net.main.1.", 3 * hidden, visual))
    state.update(wn("v_att.logits.q_net.main.1.", 3 * hidden, hidden))
    if not grounding:
        for g in range(glimpses):
            state.update(wn(f"b_net.{g}.v_net.main.1.", hidden, visual))
            state.update(wn(f"b_net.{g}.q_net.main.1.", hidden, hidden))
            state.update(wn(f"q_prj.{g}.main.1.", hidden, hidden))
            if counter:
                state.update(wn(f"c_prj.{g}.main.0.", hidden, 11))
        state.update(wn("classifier.main.0.", 2 * hidden, hidden))
        state.update(wn("classifier.main.3.", answers, 2 * hidden))
        if counter:
            for i in range(16):
                w = 0.2 + torch.rand(17, generator=gen)
                w[0] = 0
                state[f"counter.f.{i}.weight"] = w
    return {"module." + k: v for k, v in state.items()}
