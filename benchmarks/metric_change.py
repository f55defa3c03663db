"""How much the VQA accuracy of a run changes between the metric of earlier versions and the
official evaluator's (issue 16; docs/release_differences.md, "What earlier versions reported").

    python benchmarks/metric_change.py RUN_DIR [--data DATA] [--split val2014]

Rescores RUN_DIR/predictions.jsonl against the human answers of the run's evaluation split (the
built-in benchmark when the run used it) with both functions and prints overall and per answer
type figures, how many questions score differently in each direction, and how many human answers
are not in normal form (where there are none, the two functions agree on every prediction).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ban import metrics
from ban.data.vqa import process_digit_article, process_punctuation


def earlier_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The function earlier versions called the official accuracy (ban.data.vqa.vqa_accuracy
    before issue 16): the human answers were neither stripped nor given the digit/article
    processing, and the prediction was processed only when the answers disagreed."""
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    answers = list(answers)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
        prediction = process_digit_article(process_punctuation(prediction))
    total = 0.0
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        total += min(1.0, matches / 3)
    return total / len(answers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with predictions.jsonl")
    parser.add_argument("--data", help="prepared data directory (default: the run's)")
    parser.add_argument("--split", help="evaluation split (default: the run's)")
    args = parser.parse_args(argv)

    from ban.configs import from_yaml
    from ban.data import scenes
    from ban.data.prepare import load_prepared

    config = from_yaml(args.run / "config.yaml")
    data_dir = Path(args.data or config.data or scenes.default_prepared())
    split = args.split or config.eval_split
    annotations = load_prepared(data_dir, split).annotations()
    rows = [json.loads(line) for line in (args.run / "predictions.jsonl").open(encoding="utf-8")]
    predictions = {row["question_id"]: row["answer"] for row in rows}

    official = metrics.vqa_report(predictions, annotations)
    earlier: dict[int, float] = {}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, annotation in annotations.items():
        earlier[qid] = earlier_vqa_accuracy(predictions[qid], annotation["answers"])
        by_type[annotation["answer_type"]].append(earlier[qid])
    # Where every human answer is already in normal form (no outer spaces, unchanged by the
    # punctuation and digit/article processing), the two functions agree for any prediction.
    human = [a for annotation in annotations.values() for a in annotation["answers"]]
    not_normal = sum(
        a != a.strip() or process_digit_article(process_punctuation(a)) != a for a in human
    )
    lower = sum(earlier[q] < official["per_question"][q] for q in annotations)
    higher = sum(earlier[q] > official["per_question"][q] for q in annotations)

    def mean(values):
        return 100 * float(sum(values)) / len(values)

    print(f"{args.run}: {len(annotations)} questions of {split} in {data_dir}")
    print(f"{'':<12} {'earlier':>8} {'official':>9} {'change':>7}")
    old, new = mean(list(earlier.values())), official["overall"]
    print(f"{'overall':<12} {old:8.2f} {new:9.2f} {new - old:+7.2f}")
    for answer_type, values in sorted(by_type.items()):
        old, new = mean(values), official["by_answer_type"][answer_type]
        print(f"{answer_type:<12} {old:8.2f} {new:9.2f} {new - old:+7.2f}")
    print(f"questions scored lower by the earlier metric: {lower}; higher: {higher}")
    print(f"human answers not in normal form: {not_normal} of {len(human)}")
    print()
    print(metrics.format_official(official))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
