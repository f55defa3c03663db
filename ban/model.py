"""BAN for VQA and for phrase grounding, assembled from `ban.layers` and `ban.counting`.

Read next to the paper (Kim, Jun and Zhang, NeurIPS 2018) and docs/reference.md section 1:

    X0 = GRU(embed(q))                                  question token states   [B, T, H]
    A, L = BilinearAttentionMap(Y, X0)                  maps and logits         [B, G, N, T]
    for g in 1..G:                                      residual learning (Eq. 6)
        f_g = BilinearPooling_g(Y, X_g; A_g)            joint vector (Eq. 5)    [B, H]
        X_{g+1} = X_g + P_g(f_g) [+ C_g(Counter(boxes, max_t L_g))]   (added to every token)
    logits = classifier(sum_t X_{G+1})                                          [B, A]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from ban.counting import Counter
from ban.layers import BilinearAttentionMap, BilinearPooling, Dropout, FCNet, WeightNormLinear

FUSIONS = ("residual", "sum", "concat")
ATTENTIONS = ("bilinear", "unitary", "none")  # BAN, and the baselines of ban/baselines.py


@dataclass
class BANConfig:
    """Every size and switch of a BAN model. Saved with each checkpoint."""

    vocab_size: int = 19901  # V real words; the padding index is V
    embedding_dim: int = 300
    tfidf_embedding: bool = True  # the release's 'c': a second embedding table, concatenated
    hidden: int = 1280  # H
    glimpses: int = 8  # G
    rank: int = 3  # K: the attention's joint size is H * K
    num_answers: int = 3129
    visual_dim: int = 2048
    counter: bool = True
    max_objects: int = 10  # boxes the counter looks at; also the largest count
    fusion: str = "residual"  # 'residual' (the paper), 'sum' or 'concat' (its ablation)
    dropout: float = 0.2  # before every projection
    attention_dropout: float = 0.5  # on the visual side of the attention logits
    classifier_dropout: float = 0.5
    mask_question_padding: bool = False  # the release does not mask padded tokens
    # grounding under --compat: the release's -99 on the phrase columns whose token position is
    # 0, except the first column (in practice only padded slots and repeated one-word phrases)
    release_entity_mask: bool = False
    task: str = "vqa"  # 'vqa' or 'grounding'
    # 'bilinear' (BAN), or a baseline: 'unitary' (bottom-up top-down attention), 'none' (question
    # only, VQA); see ban/baselines.py. The baselines read the embedding, hidden and dropout
    # fields, and the unitary VQA model the counter switch too.
    attention: str = "bilinear"

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.attention == "none" and self.task == "grounding":
            raise ValueError("a grounding model needs attention 'bilinear' or 'unitary'")
        if not 1 <= self.glimpses <= 32:
            raise ValueError(f"glimpses must be in 1..32, got {self.glimpses}")
        if self.task not in ("vqa", "grounding"):
            raise ValueError(f"task must be 'vqa' or 'grounding', got {self.task!r}")
        for name in ("vocab_size", "embedding_dim", "hidden", "rank", "num_answers", "visual_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BANConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BANConfig field(s): {', '.join(unknown)}")
        return cls(**values)


class BANOutput(NamedTuple):
    logits: torch.Tensor  # [B, A] answer logits (VQA) or [B, E, N] box scores (grounding)
    attention: torch.Tensor  # [B, G, N, T] attention maps (softmax over N x T per glimpse)
    attention_logits: torch.Tensor  # [B, G, N, T] pre-softmax logits, -inf on masked positions


class WordEmbedding(nn.Module):
    """Token ids `[B, T]` -> `[B, T, D]` (or `2D` with the release's second 'c' table).

    Row V (= vocab_size) is the padding row: zero and without gradient.
    """

    def __init__(self, vocab_size: int, dim: int, tfidf: bool):
        super().__init__()
        self.padding_idx = vocab_size
        self.words = nn.Embedding(vocab_size + 1, dim, padding_idx=vocab_size)
        self.tfidf = nn.Embedding(vocab_size + 1, dim, padding_idx=vocab_size) if tfidf else None
        self.out_dim = dim * (2 if tfidf else 1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.tfidf is None:
            return self.words(q)
        return torch.cat([self.words(q), self.tfidf(q)], dim=2)


class Classifier(nn.Module):
    """Weight-normalised H -> 2H, ReLU, dropout, weight-normalised 2H -> A."""

    def __init__(self, in_features: int, hidden: int, num_answers: int, dropout: float):
        super().__init__()
        self.hidden = FCNet(in_features, hidden, relu=True)
        self.dropout = Dropout(dropout)
        self.output = WeightNormLinear(hidden, num_answers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(self.hidden(x)))


def box_mask_from_features(v: torch.Tensor) -> torch.Tensor:
    """The release's rule: a box whose feature row is all zero is padding. `[B, N, D] -> [B, N]`."""
    return v.abs().sum(dim=2) != 0


def bad_token_rows(q: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[B]` bool: the rows of token ids `q [B, T]` with an id outside 0..V (V is padding)."""
    return ((q < 0) | (q > vocab_size)).any(dim=1)


def _check_boxes(box_mask: torch.Tensor) -> None:
    empty = (~box_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"batch rows {empty} have no boxes (all region features are zero or masked); "
            "an image needs at least one box"
        )


def check_inputs(
    config: BANConfig,
    v: torch.Tensor,
    b: torch.Tensor,
    box_mask: torch.Tensor | None,
    check_values: bool = True,
) -> torch.Tensor:
    """Check the shapes of a VQA model's `v [B, N, Dv]` and `b [B, N, >=4]` and (with
    `check_values`) that every image has a box; returns the box mask `[B, N]` (from the features
    when not given)."""
    if v.dim() != 3 or v.shape[2] != config.visual_dim:
        raise ValueError(f"v must be [B, N, {config.visual_dim}], got {list(v.shape)}")
    if b.dim() != 3 or b.shape[:2] != v.shape[:2] or b.shape[2] < 4:
        raise ValueError(f"b must be [B, {v.shape[1]}, >=4], got {list(b.shape)}")
    if box_mask is None:
        box_mask = box_mask_from_features(v)
    if check_values:
        _check_boxes(box_mask)
    return box_mask


def _require_bilinear(config: BANConfig) -> None:
    if config.attention != "bilinear":
        raise ValueError(
            f"attention={config.attention!r} is a baseline model: build it with ban.build(config)"
        )


class QuestionModel(nn.Module):
    """What every model here starts with: the word embedding and the GRU over all tokens, plus
    the vocabulary, answers and notes that checkpoints carry."""

    def __init__(self, config: BANConfig):
        super().__init__()
        self.config = c = config
        self.vocabulary: list[str] | None = None  # set by loaders when known
        self.answers: list[str] | None = None
        self.notes: dict = {}  # saved with checkpoints (e.g. where the weights came from)
        self.embedding = WordEmbedding(c.vocab_size, c.embedding_dim, c.tfidf_embedding)
        self.question_encoder = nn.GRU(self.embedding.out_dim, c.hidden, batch_first=True)

    @torch.no_grad()
    def init_embeddings(self, glove=None, tfidf=None) -> None:
        """Copy `[V, D]` initial vectors into the tables (GloVe; tf-idf-weighted GloVe for 'c').

        Given GloVe but no tf-idf init, a second ('c') table gets a copy of GloVe and is frozen,
        as the release's `init_embedding` without tf-idf.
        """
        second = self.embedding.tfidf
        if tfidf is None and glove is not None and second is not None:
            tfidf = glove
            second.weight.requires_grad_(False)
        for table, values, name in ((self.embedding.words, glove, "glove"),
                                    (self.embedding.tfidf, tfidf, "tfidf")):  # fmt: skip
            if values is None:
                continue
            if table is None:
                raise ValueError(f"{name} given but this model has no second ('c') embedding")
            values = torch.as_tensor(values, dtype=table.weight.dtype)
            expected = (table.num_embeddings - 1, table.embedding_dim)
            if tuple(values.shape) != expected:
                raise ValueError(
                    f"{name} init has shape {tuple(values.shape)}, expected {expected}"
                )
            table.weight[:-1].copy_(values)

    def encode_question(self, q: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """Token ids `[B, T]` -> GRU states of every token `[B, T, H]` (padding included)."""
        if q.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"question token ids must be integers, got {q.dtype}")
        if check_values and q.numel() and (q.min() < 0 or q.max() > self.config.vocab_size):
            raise ValueError(
                f"question token ids must be in 0..{self.config.vocab_size} "
                f"(the last is padding), got {q.min().item()}..{q.max().item()}"
            )
        states, _ = self.question_encoder(self.embedding(q))
        # A batch-first GRU returns a time-major view; contiguous, every linear layer on the
        # token states is one matrix product instead of B small ones over a broadcast weight.
        return states.contiguous()


class BAN(QuestionModel):
    """Bilinear Attention Network for VQA.

    `model(v, b, q)` with region features `v [B, N, Dv]` (all-zero rows are padding, or pass
    `box_mask [B, N]`), spatials `b [B, N, >=4]` (normalised x1, y1, x2, y2 first) and token ids
    `q [B, T]` right-padded with `config.vocab_size`, returns `BANOutput`.

    Shapes are always checked. `check_values=False` skips the checks that read the inputs'
    values (token ids in range, a box in every image): on a GPU they wait for the device, a host
    synchronisation in every step (and a graph break under torch.compile). ban's data pipeline
    checks values on the host, so its engine passes False.
    """

    def __init__(self, config: BANConfig):
        _require_bilinear(config)
        super().__init__(config)
        c = config
        self.attention = BilinearAttentionMap(
            c.visual_dim, c.hidden, c.hidden, c.glimpses, c.rank, c.dropout, c.attention_dropout
        )
        self.pooling = nn.ModuleList(
            BilinearPooling(c.visual_dim, c.hidden, c.hidden, rank=1, dropout=c.dropout)
            for _ in range(c.glimpses)
        )
        self.question_projections = nn.ModuleList(
            FCNet(c.hidden, c.hidden, relu=False, dropout=c.dropout) for _ in range(c.glimpses)
        )
        if c.counter:
            self.counter = Counter(c.max_objects)
            self.count_projections = nn.ModuleList(
                FCNet(c.max_objects + 1, c.hidden, relu=True) for _ in range(c.glimpses)
            )
        classifier_in = c.hidden * c.glimpses if c.fusion == "concat" else c.hidden
        self.classifier = Classifier(
            classifier_in, 2 * c.hidden, c.num_answers, c.classifier_dropout
        )

    def forward(
        self,
        v: torch.Tensor,
        b: torch.Tensor,
        q: torch.Tensor,
        box_mask: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> BANOutput:
        c = self.config
        box_mask = check_inputs(c, v, b, box_mask, check_values)
        question_mask = q != c.vocab_size if c.mask_question_padding else None

        x = self.encode_question(q, check_values)  # X0 [B, T, H]
        maps, logits = self.attention(v, x, box_mask, question_mask)  # [B, G, N, T], from X0
        if c.counter:
            # The counter reads the pre-softmax logits, maximised over tokens. It has no
            # per-glimpse weights, so all G glimpses are counted in one call.
            batch, glimpses, boxes = logits.shape[:3]
            box_attention = logits.max(dim=3).values.reshape(batch * glimpses, boxes)
            corners = b[:, None, :, :4].expand(-1, glimpses, -1, -1).reshape(-1, boxes, 4)
            counts = self.counter(corners.transpose(1, 2), box_attention)
            counts = counts.view(batch, glimpses, -1)  # [B, G, objects + 1]

        joint = []  # the per-glimpse terms, for the 'sum' and 'concat' ablations
        for g in range(c.glimpses):
            # Residual: glimpse g pools with the updated X_g; sum/concat leave X at X0.
            term = self.question_projections[g](self.pooling[g](v, x, maps[:, g]))  # P_g(f_g)
            if c.counter:
                term = term + self.count_projections[g](counts[:, g])  # C_g(count_g)
            if c.fusion == "residual":
                x = x + term.unsqueeze(1)  # Eq. 6: added to every token
            else:
                joint.append(term)

        if c.fusion == "residual":
            pooled = x.sum(dim=1)  # sum over all T positions, padding included
        elif c.fusion == "sum":
            pooled = torch.stack(joint, dim=0).sum(dim=0)
        else:
            pooled = torch.cat(joint, dim=1)
        return BANOutput(self.classifier(pooled), maps, logits)


class BANGrounding(QuestionModel):
    """The release's phrase-grounding model: bilinear attention logits of phrases over boxes.

    The caption goes through the embedding and GRU; phrase j is the GRU state at its last token;
    the box scores are the raw bilinear attention logits (Eq. 4, one glimpse, no softmax).
    `model(v, q, phrase_index)` with `v [B, N, Dv]`, caption ids `q [B, T]`, and
    `phrase_index [B, E]` (the last token of each phrase) returns box scores `[B, E, N]`;
    padded boxes get the finite score `padding_score` so that a BCE loss stays finite.
    `check_values` as for `BAN`.
    """

    padding_score = -99.0

    def __init__(self, config: BANConfig):
        _require_bilinear(config)
        super().__init__(config)
        c = config
        self.attention = BilinearAttentionMap(
            c.visual_dim, c.hidden, c.hidden, c.glimpses, c.rank, c.dropout, c.attention_dropout
        )

    def forward(
        self,
        v: torch.Tensor,
        q: torch.Tensor,
        phrase_index: torch.Tensor,
        box_mask: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> torch.Tensor:
        if box_mask is None:
            box_mask = box_mask_from_features(v)
        x = self.encode_question(q, check_values)  # [B, T, H]
        index = phrase_index.clamp(min=0).unsqueeze(2).expand(-1, -1, x.shape[2])
        phrases = x.gather(1, index)  # [B, E, H]
        logits = self.attention.logits(v, phrases)[:, 0]  # [B, N, E], one glimpse
        logits = logits.masked_fill(~box_mask.unsqueeze(2), self.padding_score)
        if self.config.release_entity_mask:
            hit = phrase_index == 0
            hit[:, :1] = False  # "at least one entity per sentence"
            # the release overwrites the values (`.data`), not the graph: the scores read -99 and
            # the gradient still reaches the unmasked logits
            masked = logits - logits.detach() + self.padding_score
            logits = torch.where(hit.unsqueeze(1), masked, logits)
        return logits.transpose(1, 2)  # [B, E, N]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_example(config: BANConfig, boxes: int = 36, tokens: int = 14) -> int:
    """Forward FLOPs of one example (2 per multiply-add), counted from the shapes.

    Counts the matrix products: GRU (3 gates, input and hidden), the attention's two projections
    to H*K, its G*N*T*H*K bilinear logits (plus folding p_g into the question side), per glimpse
    the pooling projections, A X'' (N*T*H) and the row-wise dot (N*H), P_g and C_g, and the
    classifier. Elementwise work (softmax, ReLU, counter) is left out: it is below 1%. For the
    baselines (`attention` 'unitary' or 'none') the same rule counts their own products.
    """
    c = config
    n, t, h, g = boxes, tokens, c.hidden, c.glimpses
    joint = h * c.rank
    embedding = c.embedding_dim * (2 if c.tfidf_embedding else 1)
    macs = t * 3 * h * (embedding + h)  # GRU
    classifier = h * 2 * h + 2 * h * c.num_answers
    if c.attention == "none":  # question only: question_net and the classifier
        return 2 * (macs + h * h + classifier)
    if c.attention == "unitary":  # concatenation attention of ban/baselines.py
        phrases = t if c.task == "grounding" else 1
        macs += n * c.visual_dim * h + phrases * h * h + n * phrases * h
        if c.task == "grounding":
            return 2 * macs
        macs += n * c.visual_dim + h * h + c.visual_dim * h  # v_hat, question_net, visual_net
        if c.counter:
            macs += (c.max_objects + 1) * h
        return 2 * (macs + classifier)
    macs += n * c.visual_dim * joint + t * h * joint  # attention projections
    macs += g * t * joint + g * n * t * joint  # p_g folded into X', then the bilinear logits
    if c.task == "grounding":
        return 2 * macs
    per_glimpse = n * c.visual_dim * h + t * h * h + n * t * h + n * h + h * h
    if c.counter:
        per_glimpse += (c.max_objects + 1) * h
    macs += g * per_glimpse
    classifier_in = h * g if c.fusion == "concat" else h
    macs += classifier_in * 2 * h + 2 * h * c.num_answers
    return 2 * macs


def describe(model: nn.Module, boxes: int = 36, tokens: int = 14) -> str:
    """A short text: the configuration, parameter count and forward FLOPs per example."""
    config = model.config
    lines = [f"{type(model).__name__}: {config}"]
    lines.append(f"parameters: {count_parameters(model):,}")
    flops = flops_per_example(config, boxes, tokens)
    lines.append(f"forward FLOPs per example ({boxes} boxes, {tokens} tokens): {flops / 1e9:.3f} G")
    return "\n".join(lines)
