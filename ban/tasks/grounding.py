"""The phrase-grounding task (Flickr30k Entities, or the built-in benchmark's captions): the
dataset of captions with their phrases, the release's loss, and Recall@K evaluation.

Protocols (docs/reference.md): 'any' (the release's: a proposal is positive when its IoU with ANY
ONE ground-truth box of the phrase is >= 0.5) and 'merged' (one union box per phrase), the same
definition for targets and evaluation. Recall@K counts every evaluated phrase; phrases that no
proposal covers are misses. The upper bound is the fraction with a positive proposal. Every
report names its protocol.

Why it is long (about 430 lines): as `ban/tasks/vqa.py`, for the grounding task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from ban import presets
from ban.configs import TrainConfig
from ban.data import flickr, scenes
from ban.data.features import FeatureStore
from ban.distributed import DistEnv, autocast
from ban.metrics import KS, phrase_hits, ranked_boxes, recall_report
from ban.model import bad_token_rows
from ban.text import Dictionary

# ---------------------------------------------------------------------------------------------
# Dataset


class GroundingDataset(Dataset):
    """Captions of a prepared split; item = one caption with its evaluated phrases.

    Item: `features [N, D]`, `boxes [N, 4]`, `tokens [T]`, `positions [E]` (last token of each
    phrase), `targets [E, N]` bool, `types` (per phrase), `meta`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        protocol: str = "any",
        compat: bool = False,
        in_memory: bool = True,
    ) -> None:
        if protocol not in flickr.PROTOCOLS:
            raise ValueError(f"protocol must be one of {flickr.PROTOCOLS}, got {protocol!r}")
        self.data_dir = Path(data_dir)
        self.split, self.protocol, self.compat = split, protocol, compat
        self.records = flickr.read_records(data_dir, split)
        self.dictionary = Dictionary.load(self.data_dir / "dictionary.json")
        self.store = FeatureStore(self.data_dir / "features" / f"{split}.h5", in_memory=in_memory)
        self._targets: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        features, _ = self.store[r["image_id"]]
        boxes = self.store.boxes(r["image_id"])
        if index not in self._targets:
            gt = [np.asarray(e["boxes"], dtype=np.float64) for e in r["entities"]]
            self._targets[index] = flickr.targets(boxes, gt, self.protocol)
        tokens = self.dictionary.ids(" ".join(r["words"]))
        if self.compat:
            tokens = tokens[: flickr.COMPAT_LENGTH]
        positions = flickr.phrase_positions(r["words"], r["entities"], self.compat)
        return {
            "features": torch.from_numpy(features),
            "boxes": torch.from_numpy(boxes),
            "tokens": torch.tensor(tokens, dtype=torch.long),
            "length": flickr.COMPAT_LENGTH if self.compat else max(len(tokens), max(positions) + 1),
            "positions": torch.tensor(positions, dtype=torch.long),
            "targets": torch.from_numpy(self._targets[index]),
            "types": [e["types"] for e in r["entities"]],
            "meta": r,
        }


class Collate:
    """Pad boxes to the batch's most (zero features, masked), phrases to the most per caption
    (masked), tokens with `padding_idx` at the end (the GRU is unidirectional, so end padding
    does not change the states at real tokens). A class, not a closure, so that DataLoader
    workers can pickle it."""

    def __init__(self, padding_idx: int):
        self.padding_idx = padding_idx

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        b = len(samples)
        n = max(s["features"].shape[0] for s in samples)
        e = max(s["positions"].shape[0] for s in samples)
        t = max(s["length"] for s in samples)
        d = samples[0]["features"].shape[1]
        v = torch.zeros(b, n, d)
        box_mask = torch.zeros(b, n, dtype=torch.bool)
        q = torch.full((b, t), self.padding_idx, dtype=torch.long)
        positions = torch.zeros(b, e, dtype=torch.long)
        phrase_mask = torch.zeros(b, e, dtype=torch.bool)
        target = torch.zeros(b, e, n)
        for i, s in enumerate(samples):
            k, m = s["features"].shape[0], s["positions"].shape[0]
            v[i, :k] = s["features"]
            box_mask[i, :k] = True
            q[i, : len(s["tokens"])] = s["tokens"]
            positions[i, :m] = s["positions"]
            phrase_mask[i, :m] = True
            target[i, :m, :k] = s["targets"].float()
        return {
            "v": v,
            "box_mask": box_mask,
            "q": q,
            "positions": positions,
            "phrase_mask": phrase_mask,
            "target": target,
            "boxes": [s["boxes"] for s in samples],
            "types": [s["types"] for s in samples],
            "meta": [s["meta"] for s in samples],
        }


def collate(samples: list[dict], padding_idx: int) -> dict[str, Any]:
    return Collate(padding_idx)(samples)


def loader(dataset: GroundingDataset, batch_size: int) -> DataLoader:
    """The captions in order (evaluation)."""
    return DataLoader(
        dataset, batch_size=batch_size, collate_fn=Collate(dataset.dictionary.padding_idx)
    )


# ---------------------------------------------------------------------------------------------
# Loss and the forward pass


def grounding_loss(
    scores: torch.Tensor, target: torch.Tensor, phrase_mask: torch.Tensor
) -> torch.Tensor:
    """BCE with logits summed over every (real phrase, box) pair, divided by the number of
    captions. `scores`, `target [B, E, N]`; padded boxes carry the model's finite -99 score and
    target 0, so they add about 0, as in the release."""
    loss = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    return (loss * phrase_mask.unsqueeze(2)).sum() / scores.shape[0]


def forward(model: nn.Module, batch: dict, device: torch.device, vocab_size: int) -> torch.Tensor:
    """Box scores `[B, E, N]` of a batch; token ids are checked on the host first (the step never
    waits for the device), naming the image of a bad caption."""
    q = batch["q"]
    bad_rows = bad_token_rows(q, vocab_size)
    if bad_rows.any():
        bad = int(bad_rows.nonzero()[0, 0])
        raise ValueError(
            f"a caption of image {batch['meta'][bad].get('image_id')}: token ids must be in "
            f"0..{vocab_size} (the last is padding), got {q[bad].tolist()}"
        )
    return model(
        batch["v"].to(device),
        q.to(device),
        batch["positions"].to(device),
        batch["box_mask"].to(device),
        check_values=False,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data_dir: str | Path,
    split: str,
    *,
    protocol: str = "any",
    compat: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    top_k: int = 10,
    dataset: GroundingDataset | None = None,
    amp: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report, per-phrase predictions) of `model` on a prepared grounding split.

    The report: protocol, phrases, R@1/5/10, upper_bound, per_type, loss. A prediction row:
    image_id, caption, phrase, chain_id, types, top boxes (index, x1 y1 x2 y2, score), hit@K.
    """
    device = torch.device(device)
    dataset = dataset or GroundingDataset(data_dir, split, protocol, compat)
    check_vocabulary(model, dataset)
    was_training = model.training
    model.eval()
    all_hits, all_covered, all_types, rows = [], [], [], []
    loss_sum, captions = 0.0, 0
    batches = tqdm(loader(dataset, batch_size), desc="evaluate", disable=not progress, leave=False)
    for batch in batches:
        with autocast(device, amp):
            scores = forward(model, batch, device, model.config.vocab_size).float().cpu()
        if not torch.isfinite(scores).all():
            raise ValueError(
                f"a caption of image {batch['meta'][0].get('image_id')} or its batch: the model's "
                "box scores are not finite; the checkpoint or the region features hold "
                "non-finite values"
            )
        loss_sum += float(grounding_loss(scores, batch["target"], batch["phrase_mask"])) * len(
            batch["meta"]
        )
        captions += len(batch["meta"])
        mask = batch["phrase_mask"]
        box_mask = batch["box_mask"].unsqueeze(1).expand_as(scores)
        flat_scores, flat_target, flat_boxes = scores[mask], batch["target"][mask], box_mask[mask]
        hits = phrase_hits(flat_scores, flat_target > 0, flat_boxes)
        covered = (flat_target > 0).any(1)
        order = ranked_boxes(flat_scores, flat_boxes, top_k)
        all_hits.append(hits.numpy())
        all_covered.append(covered.numpy())
        p = 0
        for i, meta in enumerate(batch["meta"]):
            for j, entity in enumerate(meta["entities"]):
                all_types.append(entity["types"])
                real = int(flat_boxes[p].sum())
                top = [int(x) for x in order[p] if int(x) < real]
                rows.append(
                    {
                        "image_id": meta["image_id"],
                        "caption": meta["caption"],
                        "phrase_index": j,
                        "phrase": entity["text"],
                        "chain_id": entity["chain_id"],
                        "types": entity["types"],
                        "boxes": [
                            {
                                "index": b,
                                "box": [round(float(c), 2) for c in batch["boxes"][i][b]],
                                "score": round(float(flat_scores[p, b]), 4),
                            }
                            for b in top
                        ],
                        **{f"hit@{k}": bool(hits[p, n]) for n, k in enumerate(KS)},
                        "covered": bool(covered[p]),
                    }
                )
                p += 1
    model.train(was_training)
    hits = np.concatenate(all_hits) if all_hits else np.zeros((0, len(KS)), dtype=bool)
    covered = np.concatenate(all_covered) if all_covered else np.zeros(0, dtype=bool)
    report = {
        "task": "flickr",
        "split": split,
        "data": str(data_dir),
        "compat": compat,
        "captions": captions,
        **recall_report(hits, covered, all_types, protocol, type_order=flickr.TYPES),
        "loss": loss_sum / max(captions, 1),
    }
    return report, rows


def check_vocabulary(model: nn.Module, dataset: GroundingDataset) -> None:
    vocab = getattr(model, "vocabulary", None)
    if vocab is not None and list(vocab) != dataset.dictionary.words:
        raise ValueError(
            f"the model's vocabulary ({len(vocab)} words) is not {dataset.data_dir}'s "
            f"dictionary ({len(dataset.dictionary)} words); evaluate on the data it was trained on"
        )


def format_report(report: dict[str, Any]) -> str:
    """`split [protocol]: R@1/R@5/R@10 (upper bound)` and a per-type table."""
    head = (
        f"{report['split']} [{report['protocol'].upper()} protocol"
        f"{', compat positions' if report.get('compat') else ''}] {report['phrases']} phrases: "
        f"R@1 {report['R@1']:.2f}  R@5 {report['R@5']:.2f}  R@10 {report['R@10']:.2f}  "
        f"(upper bound {report['upper_bound']:.2f})"
    )
    lines = [head]
    for name, row in report["per_type"].items():
        lines.append(
            f"  {name:<12} {row['phrases']:>6}  R@1 {row['R@1']:6.2f}  R@5 {row['R@5']:6.2f}  "
            f"R@10 {row['R@10']:6.2f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Data and model of a run


def resolve_data(data: str | Path | None, progress: bool = False) -> Path:
    """A prepared grounding directory, or the built-in benchmark's (prepared on first use;
    `progress`: shown while that runs)."""
    if data is None:
        return Path(scenes.default_flickr_prepared(progress=progress))
    flickr.read_prepared_manifest(data)
    return Path(data)


def build_model(config: TrainConfig, data_dir: Path) -> nn.Module:
    """The grounding model of a TrainConfig, sized for the prepared data (GloVe init if any)."""
    dictionary = Dictionary.load(data_dir / "dictionary.json")
    split = next(iter(flickr.read_prepared_manifest(data_dir)["splits"]))
    store = FeatureStore(data_dir / "features" / f"{split}.h5")
    _ = store.index  # opens the file: its feature size is known from then on
    glove = np.load(data_dir / "glove.npy") if (data_dir / "glove.npy").is_file() else None
    overrides = dict(config.model_overrides)
    overrides.setdefault("release_entity_mask", config.compat)  # the release's -99 columns
    if glove is not None:
        overrides.setdefault("embedding_dim", int(glove.shape[1]))
    model_config = presets.preset(
        config.model, vocab_size=len(dictionary), visual_dim=store.dim, **overrides
    )
    if model_config.task != "grounding":
        raise ValueError(f"model preset {config.model!r} is a {model_config.task} model")
    model = presets.build(model_config)
    if glove is not None and model_config.embedding_dim == glove.shape[1]:
        model.init_embeddings(glove=glove)
    model.vocabulary = list(dictionary.words)
    model.notes = {"task": "flickr", "protocol": config.protocol, "compat": config.compat}
    return model


# ---------------------------------------------------------------------------------------------
# The task, as the engine sees it


class GroundingTask:
    """Grounding for the engine: the loss of the release, summed over (phrase, box) pairs per
    caption; the training score is R@1 over the training phrases; each epoch's R@1 on the
    evaluation split selects best.safetensors, and the final report scores that best model (the
    release's selection on val R@1)."""

    name = "flickr"
    final_model = "best"
    select_key = "eval_R@1"
    sums = ("hits_at_1", "phrases")

    def __init__(self, config: TrainConfig):
        self.config = config
        self.vocab_size = 0
        self.eval_set: GroundingDataset | None = None
        self.collate: Collate | None = None

    def resolve_data(self, progress: bool = False) -> Path:
        return resolve_data(self.config.data, progress)

    def datasets(self, data_dir: Path) -> tuple[Dataset, Dataset | None]:
        c = self.config
        parts = [
            GroundingDataset(data_dir, s, c.protocol, c.compat, c.in_memory) for s in c.train_splits
        ]
        train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        self.collate = Collate(parts[0].dictionary.padding_idx)
        self.eval_set = (
            GroundingDataset(data_dir, c.eval_split, c.protocol, c.compat, c.in_memory)
            if c.eval_split
            else None
        )
        return train_set, self.eval_set

    def build_model(self, data_dir: Path) -> nn.Module:
        model = build_model(self.config, data_dir)
        self.vocab_size = model.config.vocab_size
        return model

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["meta"])

    def step(
        self, module: nn.Module, batch: dict, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per caption of the batch, this batch's task sums [2] on the device)."""
        with autocast(device, self.config.amp):
            scores = forward(module, batch, device, self.vocab_size)
        target = batch["target"].to(device)
        mask = batch["phrase_mask"].to(device)
        loss = grounding_loss(scores.float(), target, mask)
        with torch.no_grad():  # the release's training score: R@1 on training phrases
            box_mask = batch["box_mask"].to(device).unsqueeze(1).expand_as(scores)
            # Every phrase slot at once: a padded slot has no positive box, so no hit.
            hits = phrase_hits(
                scores.flatten(0, 1), target.flatten(0, 1) > 0, box_mask.flatten(0, 1), (1,)
            )
            sums = torch.stack([hits.sum().double(), mask.sum().double()])
        return loss, sums

    @staticmethod
    def summarize(sums: list[float], examples: float) -> dict[str, float]:
        return {"train_R@1": 100.0 * sums[0] / max(sums[1], 1.0)}

    def _evaluate(self, model: nn.Module, device: torch.device):
        c = self.config
        return evaluate(
            model,
            self.eval_set.data_dir,
            c.eval_split,
            protocol=c.protocol,
            compat=c.compat,
            batch_size=c.eval_batch_size or c.batch_size,
            device=device,
            amp=c.amp,
            dataset=self.eval_set,
        )

    def evaluate_epoch(
        self, model: nn.Module, eval_set: Dataset, device: torch.device, env: DistEnv
    ) -> dict[str, float]:
        report, _ = self._evaluate(model, device)  # every process scores the whole split
        return {f"eval_{k}": report[k] for k in ("R@1", "R@5", "R@10", "upper_bound")}

    def evaluate_final(
        self, model: nn.Module, data_dir: Path, device: torch.device, env: DistEnv
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self._evaluate(model, device)

    def describe(self, record: dict[str, Any]) -> str:
        text = f"train R@1 {record['train_R@1']:.2f}"
        if "eval_R@1" in record:
            text += (
                f" | {self.config.eval_split} [{self.config.protocol.upper()}] R@1 "
                f"{record['eval_R@1']:.2f} R@5 {record['eval_R@5']:.2f} R@10 "
                f"{record['eval_R@10']:.2f} (UB {record['eval_upper_bound']:.2f})"
            )
        return text

    format_report = staticmethod(format_report)
