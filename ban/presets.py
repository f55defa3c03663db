"""Named model configurations, and the function that builds the model a configuration describes.

The training recipes (epochs, schedule, batch size) are `ban.configs.RECIPES`; `ban info --list`
lists both.
"""

from __future__ import annotations

from torch import nn

from ban import baselines
from ban.model import BAN, BANConfig, BANGrounding

PRESETS: dict[str, BANConfig] = {
    # The released best single model: BAN-8, H 1280, 'c' embedding, counter (90,618,566 params).
    "ban-8-vqa": BANConfig(),
    # The paper's ablation size: H 1024, one GloVe table, no counter (Table 1-2).
    "ban-8-ablation": BANConfig(hidden=1024, tfidf_embedding=False, counter=False),
    # The release's Flickr30k Entities model: attention logits only, one glimpse.
    "ban-flickr": BANConfig(tfidf_embedding=False, glimpses=1, counter=False, task="grounding"),
    # A CPU-sized model for the built-in scene benchmark: BAN-8 without the counter at H 128.
    # Eight glimpses leave the benchmark's initial plateau in the first epoch for every seed
    # measured (12 of 12 on two CPUs: 81.59 +- 1.26 and 81.86 +- 0.90 over six seeds each);
    # BAN-4 + counter, at 0.7-0.8x the time, did so for one seed in six and ended 2.94 apart
    # (docs/benchmark.md). Without dropout: with the release's (0.2 / 0.5 / 0.5) it stays at
    # chance there for as long as a CPU run lasts.
    "ban-small": BANConfig(
        vocab_size=200, embedding_dim=64, tfidf_embedding=False, hidden=128, glimpses=8,
        num_answers=100, visual_dim=128, counter=False,
        dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> BANConfig:
    """A named configuration, with fields overridden: `preset('ban-8-vqa', glimpses=4)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return BANConfig.from_dict({**PRESETS[name].to_dict(), **overrides})


def build(config: BANConfig) -> nn.Module:
    """The model a configuration describes: BAN, or a baseline of ban/baselines.py."""
    if config.task == "grounding":
        if config.attention == "unitary":
            return baselines.UnitaryGrounding(config)
        return BANGrounding(config)
    return {
        "bilinear": BAN,
        "unitary": baselines.UnitaryAttentionVQA,
        "none": baselines.QuestionOnly,
    }[config.attention](config)
