"""How fast does a model learn one question family of the built-in benchmark?

A short, plain loop (Adamax at a constant rate, batch 64, clipping 0.25, no warm-up) on the
questions of the chosen families only, printing the validation score every `--every` steps. It
was used to find out why the benchmark's models stayed at chance (docs/benchmark.md, "Why"):

    python benchmarks/family_probe.py --family attribute --steps 1000
    python benchmarks/family_probe.py --set dropout=0.2 --set attention_dropout=0.5
    python benchmarks/family_probe.py --family all --train-images 8000 --batch-size 256 --lr 4e-3

`--family all` trains on every family of the benchmark and prints the val score per family;
`--train-images N` keeps the questions of the first N training images only (the same data as a
benchmark generated with N training images would hold, for the same seed), to compare data sizes
on one large benchmark.

The score is the training-score approximation (soft score of the argmax answer) on val2014.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Subset

from ban import configs
from ban.data.prepare import read_manifest
from ban.tasks import vqa


def family_subset(
    data_dir: Path,
    split: str,
    families: set[str] | None,
    images: int | None = None,
    in_memory: bool = False,
) -> tuple[Subset, list[str]]:
    """The questions of `families` (None: all) on the first `images` images of `split` (None:
    all), and the family of each."""
    raw_dir = Path(read_manifest(data_dir)["raw_dir"])
    of = json.loads((raw_dir / "scenes.json").read_text())["splits"][split]["families"]
    dataset = vqa.open_split(data_dir, split, in_memory)
    first = min((e["image_id"] for e in dataset.entries), default=0)
    keep = [
        i
        for i, e in enumerate(dataset.entries)
        if (families is None or of[str(e["question_id"])] in families)
        and (images is None or e["image_id"] < first + images)
    ]
    return Subset(dataset, keep), [of[str(dataset.entries[i]["question_id"])] for i in keep]


@torch.no_grad()
def score(model: torch.nn.Module, dataset: Subset, families: list[str]) -> dict[str, float]:
    """The val score overall and per family."""
    model.eval()
    scores: list[float] = []
    for batch in DataLoader(dataset, batch_size=512, collate_fn=vqa.collate):
        logits = model(batch["features"], batch["spatials"], batch["question"]).logits
        scores += batch["target"].gather(1, logits.argmax(1, keepdim=True))[:, 0].tolist()
    model.train()
    out = {"overall": 100 * sum(scores) / len(scores)}
    for family in sorted(set(families)):
        mine = [s for s, f in zip(scores, families, strict=True) if f == family]
        out[family] = 100 * sum(mine) / len(mine)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=["attribute"], help="or 'all'")
    parser.add_argument("--train-images", type=int, help="the first N training images only")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="ban-small", help="model preset (ban-small)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a BANConfig field, e.g. --set counter=false")  # fmt: skip
    parser.add_argument("--data", type=Path, help="prepared benchmark (default: the built-in)")
    parser.add_argument("--in-memory", action="store_true", help="features read into RAM first")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = vqa.resolve_data(str(args.data) if args.data else None)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[f"model.{key.strip()}"] = yaml.safe_load(value)
    config = configs.override(configs.recipe("vqa-small"), {"model": args.model, **overrides})
    families = None if args.family == ["all"] else set(args.family)
    train, _ = family_subset(data_dir, "train2014", families, args.train_images, args.in_memory)
    val, val_families = family_subset(data_dir, "val2014", families, None, args.in_memory)
    torch.manual_seed(args.seed)
    model = vqa.build_model(config, data_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adamax(params, lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    print(f"{len(train)} training and {len(val)} val questions of {args.family}; {overrides}")
    step, start = 0, time.perf_counter()
    while step < args.steps:
        loader = DataLoader(train, args.batch_size, shuffle=True, generator=order,
                            collate_fn=vqa.collate)  # fmt: skip
        for batch in loader:
            logits = model(batch["features"], batch["spatials"], batch["question"]).logits
            loss = F.binary_cross_entropy_with_logits(logits, batch["target"]) * logits.shape[1]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.25)
            optimizer.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                elapsed = time.perf_counter() - start
                scores = score(model, val, val_families)
                per_family = " ".join(f"{k} {v:.1f}" for k, v in scores.items() if k != "overall")
                print(
                    f"step {step} ({step * args.batch_size / len(train):.2f} epochs): loss "
                    f"{loss.item():.3f}, val score {scores['overall']:.2f} [{per_family}] "
                    f"({elapsed:.0f} s)",
                    flush=True,
                )
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
