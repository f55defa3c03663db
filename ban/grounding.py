"""Phrase grounding on Flickr30k Entities: dataset, Recall@K, training and evaluation.

Protocols (shared/SPEC.md section 5): 'any' (the release's: a proposal is positive when its IoU
with ANY ONE ground-truth box of the phrase is >= 0.5) and 'merged' (one union box per phrase),
the same definition for targets and evaluation. Recall@K counts every evaluated phrase; phrases
that no proposal covers are misses. The upper bound is the fraction with a positive proposal.
Every report names its protocol.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ban.data import flickr
from ban.data.features import FeatureStore
from ban.files import atomic_write
from ban.model import bad_token_rows
from ban.text import Dictionary

KS = (1, 5, 10)


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


def collate(samples: list[dict], padding_idx: int) -> dict[str, Any]:
    """Pad boxes to the batch's most (zero features, masked), phrases to the most per caption
    (masked), tokens with `padding_idx` at the end (the GRU is unidirectional, so end padding
    does not change the states at real tokens)."""
    b = len(samples)
    n = max(s["features"].shape[0] for s in samples)
    e = max(s["positions"].shape[0] for s in samples)
    t = max(s["length"] for s in samples)
    d = samples[0]["features"].shape[1]
    v = torch.zeros(b, n, d)
    box_mask = torch.zeros(b, n, dtype=torch.bool)
    q = torch.full((b, t), padding_idx, dtype=torch.long)
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


def loader(dataset: GroundingDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda s: collate(s, dataset.dictionary.padding_idx),
    )


# ---------------------------------------------------------------------------------------------
# Loss and metrics


def grounding_loss(
    scores: torch.Tensor, target: torch.Tensor, phrase_mask: torch.Tensor
) -> torch.Tensor:
    """BCE with logits summed over every (real phrase, box) pair, divided by the number of
    captions. `scores`, `target [B, E, N]`; padded boxes carry the model's finite -99 score and
    target 0, so they add about 0, as in the release."""
    loss = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    return (loss * phrase_mask.unsqueeze(2)).sum() / scores.shape[0]


def ranked_boxes(scores: torch.Tensor, box_mask: torch.Tensor, k: int) -> torch.Tensor:
    """`[..., min(k, N)]` indices of the k best boxes; padded boxes last; ties go to the lower
    index (a stable sort)."""
    masked = scores.float().masked_fill(~box_mask, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def phrase_hits(
    scores: torch.Tensor, positives: torch.Tensor, box_mask: torch.Tensor, ks=KS
) -> torch.Tensor:
    """`[P, len(ks)]` bool: whether a positive box is among phrase p's top-k real boxes.

    `scores`, `positives [P, N]`, `box_mask [P, N]` (True = a real box). A padded box never counts
    (it is ranked last and is never positive); with fewer than k real boxes all of them count.
    """
    positives = positives.bool() & box_mask
    order = ranked_boxes(scores, box_mask, max(ks))
    hit_at = positives.gather(1, order)  # [P, k] positives in rank order
    found = torch.cumsum(hit_at.int(), dim=1) > 0  # [P, k]: a positive within the first j+1
    return torch.stack([found[:, min(k, found.shape[1]) - 1] for k in ks], dim=1)


def recall_report(
    hits: np.ndarray, covered: np.ndarray, types: list[list[str]], protocol: str, ks=KS
) -> dict[str, Any]:
    """Recall@K (percent) over all phrases, the upper bound, and per-type recall (a phrase counts
    once in each of its types; 'all' once). `hits [P, len(ks)]`, `covered [P]` bool."""
    hits = np.asarray(hits, dtype=bool).reshape(-1, len(ks))
    covered = np.asarray(covered, dtype=bool)

    def summary(rows: np.ndarray) -> dict[str, Any]:
        n = int(rows.sum())
        out: dict[str, Any] = {"phrases": n}
        for j, k in enumerate(ks):
            out[f"R@{k}"] = 100.0 * float(hits[rows, j].mean()) if n else float("nan")
        out["upper_bound"] = 100.0 * float(covered[rows].mean()) if n else float("nan")
        return out

    everything = np.ones(len(covered), dtype=bool)
    report = {"protocol": protocol, **summary(everything), "per_type": {}}
    names = list(flickr.TYPES) + sorted({t for ts in types for t in ts} - set(flickr.TYPES))
    for name in names:
        rows = np.array([name in ts for ts in types], dtype=bool)
        if rows.any():
            report["per_type"][name] = summary(rows)
    return report


# ---------------------------------------------------------------------------------------------
# Evaluation


def _forward(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    q, vocab_size = batch["q"], model.config.vocab_size
    bad_rows = bad_token_rows(q, vocab_size)  # on the host: the step never waits for the device
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
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report, per-phrase predictions) of `model` on a prepared grounding split.

    The report: protocol, phrases, R@1/5/10, upper_bound, per_type, loss. A prediction row:
    image_id, caption, phrase, chain_id, types, top boxes (index, x1 y1 x2 y2, score), hit@K.
    """
    device = torch.device(device)
    dataset = dataset or GroundingDataset(data_dir, split, protocol, compat)
    _check_vocabulary(model, dataset)
    was_training = model.training
    from ban.engine import autocast

    model.eval()
    all_hits, all_covered, all_types, rows = [], [], [], []
    loss_sum, captions = 0.0, 0
    for batch in loader(dataset, batch_size, shuffle=False):
        with autocast(device, amp):
            scores = _forward(model, batch, device).float().cpu()  # [B, E, N]
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
        **recall_report(hits, covered, all_types, protocol),
        "loss": loss_sum / max(captions, 1),
    }
    return report, rows


def _check_vocabulary(model: nn.Module, dataset: GroundingDataset) -> None:
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
# Training


def resolve_data(data: str | Path | None) -> Path:
    """A prepared grounding directory, or the built-in benchmark's (prepared on first use)."""
    if data is None:
        return Path(flickr.default_flickr_prepared())
    flickr.read_prepared_manifest(data)
    return Path(data)


def build_model(config, data_dir: Path) -> nn.Module:
    """The grounding model of a TrainConfig, sized for the prepared data (GloVe init if any)."""
    from ban import model as model_lib
    from ban.data.features import FeatureStore as Store

    dictionary = Dictionary.load(data_dir / "dictionary.json")
    split = next(iter(flickr.read_prepared_manifest(data_dir)["splits"]))
    store = Store(data_dir / "features" / f"{split}.h5")
    _ = store.index
    glove = np.load(data_dir / "glove.npy") if (data_dir / "glove.npy").is_file() else None
    overrides = dict(config.model_overrides)
    if glove is not None:
        overrides.setdefault("embedding_dim", int(glove.shape[1]))
    model_config = model_lib.preset(
        config.model, vocab_size=len(dictionary), visual_dim=store.dim, **overrides
    )
    if model_config.task != "grounding":
        raise ValueError(f"model preset {config.model!r} is a {model_config.task} model")
    model = model_lib.build(model_config)
    if glove is not None and model_config.embedding_dim == glove.shape[1]:
        model.init_embeddings(glove=glove)
    model.vocabulary = list(dictionary.words)
    model.notes = {"task": "flickr", "protocol": config.protocol, "compat": config.compat}
    return model


@dataclass
class GroundingTrainResult:
    run_dir: Path
    status: str  # 'finished' | 'stopped' (max_steps) | 'interrupted' (signal)
    best_epoch: int | None
    report: dict[str, Any] | None
    epoch: int = 0  # where a resumed run continues (0-indexed) ...
    step_in_epoch: int = 0  # ... and after how many of that epoch's steps
    signal: int | None = None


def _epoch_batches(size: int, batch_size: int, seed: int) -> list[list[int]]:
    """The epoch's batches of caption indices: a permutation drawn from `seed` alone, so that a
    resumed run can skip the batches already taken."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i : i + batch_size] for i in range(0, size, batch_size)]


def train(
    config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
) -> GroundingTrainResult:
    """Train a grounding model on a prepared grounding directory with the release's recipe shape.

    Loss: BCE summed over (phrase, box) / captions. Each epoch evaluates on `config.eval_split`
    and saves best.safetensors whenever its R@1 improves (the release's selection), and
    last.safetensors. At the end the best checkpoint is evaluated and written to report.json.
    The training state (`state.pt`) is written at the end of each epoch and when the run stops
    early (`max_steps`, SIGINT or SIGTERM after the current step); `resume=True` continues it
    exactly (same batches, same dropout). Mixed precision with `config.amp`. One process.
    """
    from ban import configs, engine

    if config.compile:
        raise ValueError("compile is not available for --task flickr (phrase counts vary)")
    run_dir = Path(run_dir)
    state_path = run_dir / engine.STATE_FILE
    if not resume and ((run_dir / "last.safetensors").exists() or state_path.exists()):
        raise ValueError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose "
            "another --out"
        )
    state = _load_state(state_path) if resume else None
    if state is not None:
        engine._check_resume_config(state, config, state_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    engine.write_run_header(run_dir, config, argv)
    device = engine.resolve_device(config.device)
    engine.seed_everything(config.seed)
    data_dir = resolve_data(config.data)
    if config.optimizer != "adamax":
        raise ValueError(f"optimizer {config.optimizer!r} is not supported; expected 'adamax'")
    train_sets = [
        GroundingDataset(data_dir, s, config.protocol, config.compat) for s in config.train_splits
    ]
    train_set = (
        train_sets[0] if len(train_sets) == 1 else torch.utils.data.ConcatDataset(train_sets)
    )
    eval_set = (
        GroundingDataset(data_dir, config.eval_split, config.protocol, config.compat)
        if config.eval_split
        else None
    )
    model = build_model(config, data_dir).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adamax(params, lr=configs.lr_at(config, 0))
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    # Where the run stands: epoch, steps taken, best R@1, and the running sums of the epoch
    # in progress (loss * captions, captions, hits at 1, phrases).
    at = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": None, "best_epoch": None}
    sums = [0.0, 0, 0, 0]
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        at, sums = dict(state["at"]), list(state["sums"])
        engine._set_rng_state(state["rng"])
    log = engine.MetricsLog(run_dir, True)
    eval_batch = config.eval_batch_size or config.batch_size
    padding = train_sets[0].dictionary.padding_idx

    def evaluate_on_eval_set(model):
        return evaluate(
            model,
            data_dir,
            config.eval_split,
            protocol=config.protocol,
            compat=config.compat,
            batch_size=eval_batch,
            device=device,
            amp=config.amp,
            dataset=eval_set,
        )

    def save_state():
        state = {
            "version": engine.STATE_VERSION,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "at": at,
            "sums": sums,
            "rng": engine._rng_state(),
        }
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    status, signum = "finished", None
    with engine.StopFlag() as stop:
        while at["epoch"] < config.epochs and status == "finished":
            epoch = at["epoch"]
            for group in optimizer.param_groups:
                group["lr"] = configs.lr_at(config, epoch)
            model.train()
            batches = _epoch_batches(len(train_set), config.batch_size, config.seed + epoch)
            data = DataLoader(
                train_set,
                batch_sampler=batches[at["step_in_epoch"] :],
                collate_fn=lambda s: collate(s, padding),
                generator=torch.Generator(),  # not the global RNG, which dropout draws from
            )
            start = time.perf_counter()
            # The epoch's sums stay on the device while it runs (reading them every step would
            # make the host wait for the device); `sums` is brought up to date before a save.
            running = torch.tensor(sums, dtype=torch.float64, device=engine._stats_device(device))
            for batch in data:
                with engine.autocast(device, config.amp):
                    scores = _forward(model, batch, device)
                target, mask = batch["target"].to(device), batch["phrase_mask"].to(device)
                loss = grounding_loss(scores.float(), target, mask)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    grad_norm = engine._clip(params, config.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    grad_norm = engine._clip(params, config.grad_clip)
                    optimizer.step()
                at["step"] += 1
                at["step_in_epoch"] += 1
                with torch.no_grad():  # the release's training score: R@1 on training phrases
                    box_mask = batch["box_mask"].to(device).unsqueeze(1).expand_as(scores)
                    # Every phrase slot at once: a padded slot has no positive box, so no hit.
                    hits = phrase_hits(
                        scores.flatten(0, 1), target.flatten(0, 1) > 0, box_mask.flatten(0, 1), (1,)
                    )
                    running[0] += loss.detach().double().to(running.device) * scores.shape[0]
                    running[1] += scores.shape[0]
                    running[2] += hits.sum().double().to(running.device)
                    running[3] += mask.sum().double().to(running.device)
                if at["step"] % max(config.log_every, 1) == 0:
                    log.write("step", at["step"], loss=loss.item(), grad_norm=grad_norm.item())
                if at["step_in_epoch"] < len(batches):  # mid-epoch: stop here when asked
                    if max_steps is not None and at["step"] >= max_steps:
                        status = "stopped"
                    elif stop.signal is not None:
                        status, signum = "interrupted", stop.signal
                    if status != "finished":
                        sums = running.tolist()
                        save_state()
                        break
            if status != "finished":
                break
            sums = running.tolist()
            record: dict[str, Any] = {
                "epoch": epoch,
                "loss": sums[0] / max(sums[1], 1),
                "train_R@1": 100.0 * sums[2] / max(sums[3], 1),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - start, 2),
            }
            if eval_set is not None:
                report, _ = evaluate_on_eval_set(model)
                record.update(
                    {f"eval_{k}": report[k] for k in ("R@1", "R@5", "R@10", "upper_bound")}
                )
                if at["best"] is None or report["R@1"] > at["best"]:
                    at["best"], at["best_epoch"] = report["R@1"], epoch
                    model.notes["epoch"] = epoch
                    engine.save_model(model, run_dir / "best.safetensors")
            log.write("epoch", at["step"], **record)
            if progress:
                print(_format_epoch(record, config), file=sys.stderr)
            at["epoch"], at["step_in_epoch"], sums = epoch + 1, 0, [0.0, 0, 0, 0]
            model.notes["epoch"] = epoch
            engine.save_model(model, run_dir / "last.safetensors")
            save_state()
            if max_steps is not None and at["step"] >= max_steps and at["epoch"] < config.epochs:
                status = "stopped"
            elif stop.signal is not None and at["epoch"] < config.epochs:
                status, signum = "interrupted", stop.signal
    report = None
    if status == "finished" and eval_set is not None and at["best_epoch"] is not None:
        from ban import checkpoint

        best_model = checkpoint.load(run_dir / "best.safetensors", device)
        report, rows = evaluate_on_eval_set(best_model)
        report["best_epoch"] = at["best_epoch"]
        engine.atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
        write_predictions(rows, run_dir / f"predictions-{config.eval_split}.jsonl")
    log.close()
    return GroundingTrainResult(
        run_dir, status, at["best_epoch"], report, at["epoch"], at["step_in_epoch"], signum
    )


def _format_epoch(record: dict[str, Any], config) -> str:
    text = (
        f"epoch {record['epoch'] + 1}/{config.epochs}: loss {record['loss']:.4f} "
        f"train R@1 {record['train_R@1']:.2f} lr {record['lr']:.2e}"
    )
    if "eval_R@1" in record:
        text += (
            f" | {config.eval_split} [{config.protocol.upper()}] R@1 "
            f"{record['eval_R@1']:.2f} R@5 {record['eval_R@5']:.2f} R@10 "
            f"{record['eval_R@10']:.2f} (UB {record['eval_upper_bound']:.2f})"
        )
    return text


def _load_state(path: Path) -> dict[str, Any]:
    from ban import engine

    state = engine.load_state(path)
    if "at" not in state:
        raise ValueError(f"{path} is not the training state of a grounding run")
    return state


def write_predictions(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One JSON line per phrase."""
    from ban import engine

    text = "".join(json.dumps(row) + "\n" for row in rows)
    engine.atomic_write_text(path, text)
