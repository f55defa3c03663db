"""The ablation table of the built-in scene benchmark: baselines, glimpses, fusion, counter.

Trains each row with the same recipe (the `vqa-small` training recipe unless told otherwise) on
the same data, evaluates the last model on val2014 with the official VQA metric, and prints a
table by answer type and by question family (read from the benchmark's scenes.json):

    python benchmarks/scene_ablation.py             # every row, seed 1204: ~40 min on 2 cores
    python benchmarks/scene_ablation.py --rows ban-1 ban-4 --seeds 1 2 3 --epochs 7

Runs go to `--out` (default runs/scene-ablation/<row>/seed-<seed>); a finished run is read back
instead of retrained and an interrupted one is resumed, so the script can be stopped and started
again. The table is written to `<out>/table.md` and every figure to `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ban import configs, engine, metrics
from ban.data import scenes
from ban.data.prepare import read_manifest
from ban.files import atomic_write_text
from ban.model import count_parameters
from ban.tasks import vqa

# name: (what it is, BANConfig overrides on the ban-small model preset)
# The release's dropout rates (ban-small has none; docs/benchmark.md says why).
RELEASE_DROPOUT = {"dropout": 0.2, "attention_dropout": 0.5, "classifier_dropout": 0.5}
# Answers without training (reference_rows), then the trained rows.
REFERENCE = {
    "chance": "chance: a random answer of the question's type",
    "most-frequent": "the most frequent answer of the question's type",
}
ROWS: dict[str, tuple[str, dict]] = {
    "question-only": ("question only (no image)", {"attention": "none", "counter": False}),
    "unitary": ("unitary attention (BUTD)", {"attention": "unitary", "counter": False}),
    "ban-1": ("BAN-1", {"glimpses": 1, "counter": False}),
    "ban-2": ("BAN-2", {"glimpses": 2, "counter": False}),
    "ban-4": ("BAN-4", {"glimpses": 4, "counter": False}),
    "ban-8": ("BAN-8", {"glimpses": 8, "counter": False}),
    "ban-4-sum": ("BAN-4, sum fusion", {"glimpses": 4, "counter": False, "fusion": "sum"}),
    "ban-4-concat": ("BAN-4, concat fusion", {"glimpses": 4, "counter": False, "fusion": "concat"}),
    "unitary-counter": ("unitary attention + counter", {"attention": "unitary", "counter": True}),
    "ban-4-counter": ("BAN-4 + counter", {"glimpses": 4, "counter": True}),
    "ban-8-counter": ("BAN-8 + counter", {"glimpses": 8, "counter": True}),
    "ban-4-counter-dropout": (
        "BAN-4 + counter, the release's dropout",
        {"glimpses": 4, "counter": True, **RELEASE_DROPOUT},
    ),
}  # fmt: skip

ANSWER_TYPES = ("yes/no", "number", "other")


def run_row(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or resume, or read back) one row with one seed; its figures."""
    run_dir = args.out / name / f"seed-{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    overrides = {**args.settings, "seed": seed, "model_overrides": ROWS[name][1]}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.data is not None:
        overrides["data"] = str(args.data)
    config = configs.override(configs.recipe(args.recipe), overrides, source="scene_ablation")
    start = time.perf_counter()
    config = train_to_end(config, run_dir, f"{name} seed {seed}")
    data_dir = vqa.resolve_data(config.data)
    model = vqa.build_model(config, data_dir)
    result = {
        "row": name,
        "seed": seed,
        "epochs": config.epochs,
        "parameters": count_parameters(model),
        "minutes": (time.perf_counter() - start) / 60,
        "train": last_train_score(run_dir),
        **scores(run_dir, data_dir),
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


def train_to_end(config: configs.TrainConfig, run_dir: Path, label: str) -> configs.TrainConfig:
    """Train `config` into `run_dir`, or resume the run there (with its own config); the config
    the run has. Exits when the run stops before its end."""
    resume = (run_dir / engine.STATE_FILE).is_file()
    if resume:
        config = configs.from_yaml(run_dir / "config.yaml")
    print(f"== {label}: {'resuming' if resume else 'training'} in {run_dir}", flush=True)
    trained = engine.train(config, run_dir, resume=resume, progress=False)
    if trained.status != "finished":
        raise SystemExit(f"{label} stopped ({trained.status}); run again to resume")
    return config


def last_train_score(run_dir: Path) -> float:
    """The training-score approximation of the last epoch (dropout on), from metrics.jsonl: set
    beside the val accuracy, it tells underfitting from overfitting."""
    with open(run_dir / "metrics.jsonl") as f:
        epochs = [record for record in map(json.loads, f) if record["kind"] == "epoch"]
    return epochs[-1]["score"]


def scores(run_dir: Path, data_dir: Path) -> dict:
    """Official VQA accuracy overall, by answer type and by question family, in percent."""
    report = json.loads((run_dir / "report.json").read_text())["official"]
    raw_dir = Path(read_manifest(data_dir)["raw_dir"])
    with open(run_dir / "predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    per_family = metrics.family_scores(raw_dir, rows)
    return {
        "overall": report["overall"],
        **{kind: report["by_answer_type"].get(kind, 0.0) for kind in ANSWER_TYPES},
        **{family: accuracy for family, (_, accuracy) in per_family.items()},
    }


def reference_rows(data_dir: Path) -> list[dict]:
    """Two answers that need no training, scored with the official metric on val2014: a uniformly
    random answer among those of the question's type in train2014 (the expectation, exactly),
    and the most frequent train2014 answer of the question's type (metrics.reference_scores)."""
    raw_dir = Path(read_manifest(data_dir)["raw_dir"])
    rows = []
    for name, values in metrics.reference_scores(raw_dir).items():
        row = {"row": name, "seed": None, "epochs": 0, "parameters": 0, "minutes": 0.0}
        rows.append({**row, **values})
    return rows


def mean_text(values: list[float]) -> str:
    """One value, or the mean ± the standard deviation over seeds."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: list[dict]) -> str:
    # The families of the benchmark (the default one has no spatial questions).
    families = [f for f in scenes.FAMILIES if any(f in r for r in results)]
    columns = ("overall", *ANSWER_TYPES, *families)
    lines = [
        "| model | params | seeds | train | " + " | ".join(columns) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    labels = {**REFERENCE, **{name: label for name, (label, _) in ROWS.items()}}
    for name, label in labels.items():
        rows = [r for r in results if r["row"] == name]
        if not rows:
            continue
        train = mean_text([r["train"] for r in rows]) if "train" in rows[0] else "-"
        cells = [train, *(mean_text([r.get(c, 0.0) for r in rows]) for c in columns)]
        params = f"{rows[0]['parameters']:,}" if rows[0]["parameters"] else "-"
        seeds = str(len(rows)) if rows[0]["seed"] is not None else "-"
        lines.append(f"| {label} | {params} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1204])
    parser.add_argument("--epochs", type=int, help="default: the training recipe's")
    parser.add_argument("--recipe", default="vqa-small", help="training recipe (vqa-small)")
    parser.add_argument("--data", type=Path, help="prepared benchmark (default: the built-in)")
    parser.add_argument("--out", type=Path, default=Path("runs/scene-ablation"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--report-only", action="store_true", help="tabulate the finished runs; train nothing"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="another training setting for every row, e.g. --set lr_decay_epochs=[8,10]",
    )  # fmt: skip
    args = parser.parse_args()
    args.settings = configs.parse_settings(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        paths = [args.out / n / f"seed-{s}" / "result.json" for n in args.rows for s in args.seeds]
        results = [json.loads(path.read_text()) for path in paths if path.is_file()]
    else:
        results = [run_row(name, seed, args) for name in args.rows for seed in args.seeds]
    seeds = sorted({r["seed"] for r in results})
    epochs = sorted({r["epochs"] for r in results})
    results += reference_rows(vqa.resolve_data(str(args.data) if args.data else None))
    text = table(results)
    header = (
        "Official VQA accuracy (%) on val2014 of the built-in benchmark, last epoch ('train': "
        "the training-score approximation of the last epoch, dropout on); "
        f"training recipe {args.recipe}, epochs {epochs}, seeds {seeds}"
        + "".join(f", {item}" for item in args.set)
        + ".\n\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.md", header + text + "\n")
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print(header + text)


if __name__ == "__main__":
    main()
