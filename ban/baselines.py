"""The baselines BAN is measured against, built from the same parts and trained by the same engine.

- `UnitaryAttentionVQA` (`BANConfig(attention="unitary")`): bottom-up top-down attention
  (Anderson et al., CVPR 2018; Teney et al., CVPR 2018), the model BAN's Table 1 starts from.
  One question vector q (the GRU state at the last real token) attends over the boxes only:

      s_n = w^T ReLU(W [v_n; q]) + c            one logit per box (concatenation attention)
      a = softmax_n(s)                          one glimpse                          [B, N]
      v_hat = sum_n a_n v_n                                                          [B, Dv]
      h = ReLU(W_q q) * ReLU(W_v v_hat) [+ C(Counter(boxes, s))]                     [B, H]
      logits = classifier(h)

  Weight-normalised ReLU layers replace the paper's gated tanh, as in the PyTorch
  re-implementation that the BAN release grew from.
- `QuestionOnly` (`attention="none"`): the same question vector straight into the classifier. It
  never looks at the image, so it measures what the questions alone give away.
- `UnitaryGrounding` (`attention="unitary"`, `task="grounding"`): the grounding model with the
  bilinear attention logits replaced by concatenation attention between each phrase and each box.

All three take the inputs of `BAN` / `BANGrounding` and return the same output types; build them
with `ban.build(config)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ban.counting import Counter
from ban.layers import Dropout, FCNet, WeightNormLinear
from ban.model import (
    BANConfig,
    BANGrounding,
    BANOutput,
    Classifier,
    QuestionModel,
    box_mask_from_features,
    check_inputs,
)


class ConcatAttention(nn.Module):
    """Unitary attention logits `s[b, n, e] = w^T ReLU(W [v_n; q_e] + c) + d`.

    `W` is one weight-normalised `[H, Dv + Dq]` matrix; it is applied as `W_v v_n + W_q q_e`
    (its two column blocks), which equals the concatenation and never builds `[v; q]`.
    """

    def __init__(self, visual_dim: int, question_dim: int, hidden: int, dropout: float = 0.2):
        super().__init__()
        self.visual_dim = visual_dim
        self.hidden = WeightNormLinear(visual_dim + question_dim, hidden)
        self.dropout = Dropout(dropout)
        self.output = WeightNormLinear(hidden, 1)

    def forward(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """`v [B, N, Dv]`, `q [B, E, Dq]` -> logits `[B, N, E]`."""
        weight = self.hidden.weight  # [H, Dv + Dq]
        visual = F.linear(v, weight[:, : self.visual_dim])  # [B, N, H]
        question = F.linear(q, weight[:, self.visual_dim :], self.hidden.bias)  # [B, E, H]
        joint = F.relu(visual.unsqueeze(2) + question.unsqueeze(1))  # [B, N, E, H]
        return self.output(self.dropout(joint)).squeeze(3)


def last_token_states(states: torch.Tensor, q: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """The GRU state at each question's last real token: `[B, T, H]`, `[B, T]` -> `[B, H]`.

    Questions are right-padded; an empty question gives the state after its first (padding)
    token."""
    lengths = (q != padding_idx).sum(dim=1)
    index = (lengths - 1).clamp(min=0)
    return states[torch.arange(states.shape[0], device=states.device), index]


class _QuestionVectorModel(QuestionModel):
    """The embedding and GRU of BAN, read out at the last real token."""

    def question_vector(self, q: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        states = self.encode_question(q, check_values)
        return last_token_states(states, q, self.config.vocab_size)


class UnitaryAttentionVQA(_QuestionVectorModel):
    """Bottom-up top-down attention for VQA (see the module docstring). `model(v, b, q)` as `BAN`;
    the attention in the output is `[B, 1, N, 1]` (one glimpse over boxes)."""

    def __init__(self, config: BANConfig):
        super().__init__(config)
        c = config
        self.attention = ConcatAttention(c.visual_dim, c.hidden, c.hidden, c.dropout)
        self.question_net = FCNet(c.hidden, c.hidden, relu=True, dropout=c.dropout)
        self.visual_net = FCNet(c.visual_dim, c.hidden, relu=True, dropout=c.dropout)
        if c.counter:
            self.counter = Counter(c.max_objects)
            self.count_projection = FCNet(c.max_objects + 1, c.hidden, relu=True)
        self.classifier = Classifier(c.hidden, 2 * c.hidden, c.num_answers, c.classifier_dropout)

    def forward(self, v, b, q, box_mask=None, check_values=True) -> BANOutput:
        box_mask = check_inputs(self.config, v, b, box_mask, check_values)
        question = self.question_vector(q, check_values)  # [B, H]
        logits = self.attention(v, question.unsqueeze(1)).squeeze(2)  # [B, N]
        logits = logits.masked_fill(~box_mask, float("-inf"))
        weights = F.softmax(logits, dim=1)
        attended = torch.bmm(weights.unsqueeze(1), v).squeeze(1)  # [B, Dv]
        joint = self.question_net(question) * self.visual_net(attended)
        if self.config.counter:
            counts = self.counter(b[:, :, :4].transpose(1, 2), logits)  # [B, objects + 1]
            joint = joint + self.count_projection(counts)
        maps, logits = weights[:, None, :, None], logits[:, None, :, None]  # [B, 1, N, 1]
        return BANOutput(self.classifier(joint), maps, logits)


class QuestionOnly(_QuestionVectorModel):
    """The question vector into the classifier; the image is checked but never read. The
    attention in the output is empty, `[B, 0, N, 1]`."""

    def __init__(self, config: BANConfig):
        super().__init__(config)
        c = config
        self.question_net = FCNet(c.hidden, c.hidden, relu=True, dropout=c.dropout)
        self.classifier = Classifier(c.hidden, 2 * c.hidden, c.num_answers, c.classifier_dropout)

    def forward(self, v, b, q, box_mask=None, check_values=True) -> BANOutput:
        check_inputs(self.config, v, b, box_mask, check_values)
        logits = self.classifier(self.question_net(self.question_vector(q, check_values)))
        empty = v.new_zeros(v.shape[0], 0, v.shape[1], 1)
        return BANOutput(logits, empty, empty)


class UnitaryGrounding(_QuestionVectorModel):
    """`BANGrounding` with concatenation attention in place of the bilinear logits: the score of
    box n for phrase e is `w^T ReLU(W [v_n; x_e]) + d`. Inputs and outputs as `BANGrounding`."""

    padding_score = BANGrounding.padding_score

    def __init__(self, config: BANConfig):
        super().__init__(config)
        c = config
        self.attention = ConcatAttention(c.visual_dim, c.hidden, c.hidden, c.dropout)

    def forward(self, v, q, phrase_index, box_mask=None, check_values=True) -> torch.Tensor:
        if box_mask is None:
            box_mask = box_mask_from_features(v)
        x = self.encode_question(q, check_values)  # [B, T, H]
        index = phrase_index.clamp(min=0).unsqueeze(2).expand(-1, -1, x.shape[2])
        phrases = x.gather(1, index)  # [B, E, H]
        logits = self.attention(v, phrases)  # [B, N, E]
        logits = logits.masked_fill(~box_mask.unsqueeze(2), self.padding_score)
        return logits.transpose(1, 2)  # [B, E, N]
