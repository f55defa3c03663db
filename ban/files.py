"""Writing files atomically: readers see the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` with a temporary path beside `path`, then rename it onto `path` once it is
    complete and synced. On failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: str | os.PathLike):
    """A JSON file's content; a missing, non-UTF-8 or corrupt file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupt JSON ({error})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, atomically, written line by line (no copy of the whole text:
    214,354 predictions of val2014 are ~30 MB). A NaN or infinity is refused (it is not JSON),
    naming the row."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                try:
                    f.write(json.dumps(row, allow_nan=False) + "\n")
                except ValueError:
                    raise ValueError(
                        f"{path}: row {i} holds a non-finite number and would not be valid JSON: "
                        f"{row}"
                    ) from None

    atomic_write(path, write)
