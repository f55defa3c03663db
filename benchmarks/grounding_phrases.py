"""Recall@1 of grounding runs by kind of phrase, on the built-in benchmark's captions.

    python benchmarks/grounding_phrases.py RUN_DIR [RUN_DIR ...] [--predictions eval-test-any]

Reads each run's `predictions.jsonl` (the val split of training), or with `--predictions NAME`
the one in `RUN_DIR/NAME/` that `ban evaluate` wrote (`eval-test-any` for `ban evaluate RUN
--split test`), and sorts every phrase by its words (docs/grounding.md):

- `one`: "one red" in "Two circles , one red and one blue , ..." (a member of the group before);
- `another`: "another circle" in "A red circle and another circle ..." (the other of two);
- `group`: a plural phrase that opens with a number word ("the two red circles");
- `single, k attributes`: one object, named by k attributes ("the small metal circle": 3).

Prints a markdown table: kind, phrases, R@1 of each run (and `all`).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ban.data.scene_world import VALUES
from ban.data.scenes import NUMBER_WORDS

ATTRIBUTE_WORDS = {v for values in VALUES.values() for v in values}
PLURAL_SHAPES = {f"{s}s" for s in VALUES["shape"]}


def phrase_kind(text: str) -> str:
    """The kind of a benchmark phrase, from its words (see the module docstring)."""
    words = text.lower().split()
    if words[0] in ("one", "another"):
        return words[0]
    if words[0] in NUMBER_WORDS or (words[0] == "the" and words[1:2] and words[1] in NUMBER_WORDS):
        return "group"
    n = sum(w in ATTRIBUTE_WORDS or w in PLURAL_SHAPES for w in words)
    return f"single, {n} attribute{'s' if n != 1 else ''}"


def recall_by_kind(path: Path) -> dict[str, tuple[int, int]]:
    """kind -> (hits at 1, phrases) of a predictions.jsonl; 'all' for every phrase."""
    hits, total = Counter(), Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            for kind in (phrase_kind(record["phrase"]), "all"):
                hits[kind] += bool(record["hit@1"])
                total[kind] += 1
    return {kind: (hits[kind], total[kind]) for kind in total}


def table(runs: list[Path], predictions: str | None = None) -> str:
    results = []
    for run in runs:
        path = run / predictions / "predictions.jsonl" if predictions else run / "predictions.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no predictions (run `ban evaluate` first?)")
        results.append(recall_by_kind(path))
    kinds = sorted({k for r in results for k in r} - {"all"}) + ["all"]
    lines = [
        "| kind | phrases | " + " | ".join(run.name for run in runs) + " |",
        "|---|---:|" + "---:|" * len(runs),
    ]
    for kind in kinds:
        counts = {r[kind][1] for r in results if kind in r}
        cells = [f"{100 * r[kind][0] / r[kind][1]:.2f}" if kind in r else "-" for r in results]
        phrases = "/".join(str(c) for c in sorted(counts))
        lines.append(f"| {kind} | {phrases} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--predictions", help="a subfolder written by `ban evaluate`, e.g. eval-test-any"
    )
    args = parser.parse_args(argv)
    print(table(args.runs, args.predictions))


if __name__ == "__main__":
    main()
