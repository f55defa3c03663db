"""One tiny trained run with real PNG pictures, shared by the viz / serve / browser tests."""

import json
from pathlib import Path

from tests.test_engine import TINY_MODEL


def tiny_viz_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, prepared data directory); built once per test session."""
    root = tmp_path_factory.getbasetemp() / "viz-run"
    run, data = root / "run", root / "prepared"
    if (run / "last.safetensors").is_file():
        return run, data
    from ban.cli import main
    from ban.data import scenes
    from ban.data.prepare import prepare

    raw = scenes.generate(root / "raw", train_images=16, val_images=6, test_images=2,
                          feature_dim=16, images=True, train_pictures=False, captions_per_image=1,
                           workers=1)  # fmt: skip
    prepare(raw, data, min_answer_count=1, progress=False)
    settings = [f"--set={k}={v}" for k, v in TINY_MODEL.items()]
    code = main(["train", "--data", str(data), "--epochs", "1", "--max-steps", "3",
                 "--eval-split", "none", "--out", str(run), "--device", "cpu", "--quiet",
                 "--batch-size", "16", *settings])  # fmt: skip
    assert code == 0 and (run / "last.safetensors").is_file()
    return run, data


def first_question(data: Path) -> dict:
    return json.loads((data / "val2014.jsonl").read_text().splitlines()[0])
