"""A run directory and everything in it: the lock, the header files, the metrics log, the
training state that `--resume` reads, and the signals that stop a run cleanly.

```
RUN/
  config.yaml         the resolved TrainConfig (what `--resume` and `--config` read)
  command.txt         one JSON line per start or resume: command, host, versions
  metrics.jsonl       one JSON object per line: {"kind": "step" | "epoch" | "eval" | "stop", ...}
  state.pt            training state for `--resume`: weights, optimizer, schedule, RNG, data order
  last.safetensors    the model at the end of the last epoch (or at the interruption)
  best.safetensors    the model with the best evaluation score so far
  report.json         the final evaluation report; it names the checkpoint and epoch it scores
  predictions.jsonl   the final predictions on the evaluation split (per question / per phrase)
  lock                held (flock) by the process that trains in RUN; it holds that process's PID
```

Every file but the two logs is written to a temporary name and renamed into place, so a kill or
a full disk leaves the previous version, never a truncated one. The logs are appended to; on
resume, records written after the checkpoint was taken are dropped, so the log reads as that of
an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ban import configs
from ban.configs import TrainConfig
from ban.distributed import DistEnv, gather, rng_state
from ban.files import atomic_write, atomic_write_text

try:  # POSIX; elsewhere a run directory is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

STATE_FILE = "state.pt"
STATE_VERSION = 2
LOCK_FILE = "lock"
# The engine's running sums of an epoch; a task's own sums follow them in Progress.sums.
ENGINE_SUMS = ("loss_x_examples", "examples", "grad_norm", "steps", "skipped_steps")


# --------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """An exclusive lock on a run directory, held while a process trains in it.

    A second process on the same run is refused, naming the holder's PID. The lock is an `flock`
    on RUN/lock: the operating system drops it when its process dies, so a lock left by a killed
    run is simply taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"{self.path.parent} is in use by another training process (PID {holder}); "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# Header files and logs


def write_run_header(run_dir: Path, config: TrainConfig, argv: list[str] | None) -> None:
    """config.yaml (replaced) and one more line of command.txt (the file is rewritten whole)."""
    configs.save_yaml(config, run_dir / "config.yaml")
    info = {
        "command": " ".join(argv) if argv is not None else " ".join(sys.argv),
        "cwd": os.getcwd(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    path = run_dir / "command.txt"
    before = path.read_text() if path.is_file() else ""
    atomic_write_text(path, before + json.dumps(info) + "\n")


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed) on the main process."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def truncate_after(self, step: int) -> int:
        """Drop what a resumed run will write again: records after `step` (the checkpoint's),
        'stop' records and a last line cut short by a kill. Returns how many lines went."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("step", 0) > step or record.get("kind") == "stop":
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            atomic_write_text(self.path, "".join(kept))
        return dropped

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------
# Training state


@dataclass
class Progress:
    """Where training stands; saved in state.pt."""

    epoch: int = 0  # the epoch in progress (or the next one)
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    examples: int = 0  # training examples seen, all processes
    best_score: float | None = None
    best_epoch: int | None = None
    # running sums of the epoch in progress (this process): ENGINE_SUMS, then the task's sums
    sums: list[float] = field(default_factory=list)


def save_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    config: TrainConfig,
    env: DistEnv,
) -> None:
    """Everything `--resume` needs. Collective under DDP (every rank's RNG state and running
    epoch sums are kept)."""
    ranks = gather({"rng": rng_state(), "sums": list(progress.sums)}, env)
    if not env.is_main:
        return
    state = {
        "version": STATE_VERSION,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": progress.__dict__,
        "ranks": ranks,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """state.pt of this version, or of version 1 for VQA runs (converted); version 1 grounding
    runs are refused: their data order cannot be rebuilt by this loop."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: nothing to resume (a run directory holds state.pt once a "
            "step has been checkpointed)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is not a readable training state ({reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a training state of this project")
    if state.get("version") == 1 and "at" in state:
        raise ValueError(
            f"{path} was written by the separate grounding loop of ban 0.1 (before one engine "
            "trained every task); it cannot be resumed exactly. Start the run again, or take "
            "its last.safetensors / best.safetensors as they are"
        )
    if state.get("version") == 1:  # VQA: sums were loss*n, score, upper bound, n, grad, steps
        state["version"] = STATE_VERSION
        for holder in [state["progress"], *state["ranks"]]:
            loss, score, upper, n, grad, steps = holder["sums"]
            holder["sums"] = [loss, n, grad, steps, 0.0, score, upper]
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')} is not supported")
    return state


def check_resume_config(state: dict, config: TrainConfig, path: Path) -> None:
    saved = state["config"]
    current = config.to_dict()
    changed = sorted(
        k for k in current if k not in configs.RUNTIME_FIELDS and saved.get(k) != current[k]
    )
    if changed:
        raise ValueError(
            f"{path} was written with another configuration ({', '.join(changed)} differ); "
            "resume with the run's own config.yaml"
        )


# --------------------------------------------------------------------------------------------
# Finding runs


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """`runs/<model preset>-<YYYYmmdd-HHMMSS>`."""
    return Path(root) / f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_config(run_dir: str | Path, runtime: dict[str, Any] | None = None) -> TrainConfig:
    """The config of the run in `run_dir`, with runtime settings (device, workers, compile, ...)
    changed; anything that would change what is computed is refused."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    runtime = {k: v for k, v in (runtime or {}).items() if v is not None}
    refused = sorted(set(runtime) - configs.RUNTIME_FIELDS)
    if refused:
        raise ValueError(
            f"--resume continues {run_dir} with its own config.yaml; only "
            f"{', '.join(sorted(configs.RUNTIME_FIELDS))} may change, not {', '.join(refused)}"
        )
    return configs.override(configs.from_yaml(path), runtime, source="--resume")


def resolve_checkpoint(path: str | Path) -> tuple[Path, TrainConfig | None]:
    """A checkpoint file, or a run directory (its best.safetensors, else last.safetensors), with
    the run's config when the checkpoint sits in a run directory, so that its data is known."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                config = (
                    configs.from_yaml(path / "config.yaml")
                    if (path / "config.yaml").is_file()
                    else None
                )
                return path / name, config
        raise FileNotFoundError(f"{path} holds no best.safetensors or last.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    beside = path.parent / "config.yaml"  # a checkpoint inside its run directory
    return path, configs.from_yaml(beside) if beside.is_file() else None


# --------------------------------------------------------------------------------------------
# Signals


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next optimizer step, after a checkpoint; a
    second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\nban: {signal.Signals(signum).name} received, stopping after this step "
            "(send it again to stop at once)",
            file=sys.stderr,
        )
