"""The training engine: one loop for every task (`ban.tasks`), and the run directory around it.

    loop.py   the training loop: `train(config, run_dir)`
    runs.py   the run directory: lock, header files, metrics log, state, signals

Processes, devices, seeding and the data order are `ban.distributed` (the tasks use them too).
"""

from ban.distributed import resolve_device
from ban.engine.loop import NonFiniteError, TrainResult, train
from ban.engine.runs import STATE_FILE, default_run_dir, resolve_checkpoint, resume_config

__all__ = [
    "STATE_FILE",
    "NonFiniteError",
    "TrainResult",
    "default_run_dir",
    "resolve_checkpoint",
    "resolve_device",
    "resume_config",
    "train",
]
