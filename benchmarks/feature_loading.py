"""Feature-loading throughput at the paper's size (36 boxes x 2048-d per image).

Writes a synthetic bottom-up TSV, converts it to HDF5 (timed), then reads examples through a
DataLoader (lazy `FeatureStore`, batches from `ban.data.vqa.collate`) for several worker counts
and prints examples/s. Training BAN-8 runs at a few hundred examples/s per GPU; loading should
be several times faster.

    python benchmarks/feature_loading.py --images 2000 --workers 0 1 2 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ban.data.features import FeatureStore, Region, convert_features, write_tsv
from ban.data.vqa import collate


class Examples(Dataset):
    def __init__(self, store: FeatureStore, ids: list[int], length: int) -> None:
        self.store, self.ids, self.length = store, ids, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[(i * 7919) % len(self.ids)]  # scattered reads
        features, spatials = self.store[image_id]
        return {
            "features": torch.from_numpy(features),
            "spatials": torch.from_numpy(spatials),
            "question": torch.zeros(14, dtype=torch.int64),
            "target": torch.zeros(3129),
            "question_id": i,
            "image_id": image_id,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tsv, h5 = Path(tmp) / "f.tsv", Path(tmp) / "f.h5"
        boxes = np.tile(np.array([[10, 20, 200, 220]], np.float32), (args.boxes, 1))
        feats = rng.standard_normal((args.boxes, args.dim)).astype(np.float32)
        write_tsv(tsv, (Region(i, 640, 480, boxes, feats) for i in range(args.images)))
        start = time.perf_counter()
        convert_features(tsv, h5, fp16=args.fp16, progress=False)
        seconds = time.perf_counter() - start
        mb = tsv.stat().st_size / 1e6
        print(f"convert: {args.images / seconds:.0f} images/s ({mb / seconds:.0f} MB/s of TSV)")
        store = FeatureStore(h5)
        ids = store.image_ids()
        for workers in args.workers:
            loader = DataLoader(
                Examples(store, ids, args.examples),
                batch_size=args.batch_size,
                num_workers=workers,
                collate_fn=collate,
            )
            start = time.perf_counter()
            n = sum(len(batch["image_id"]) for batch in loader)
            seconds = time.perf_counter() - start
            print(f"workers={workers}: {n / seconds:.0f} examples/s")


if __name__ == "__main__":
    main()
