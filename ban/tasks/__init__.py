"""Tasks: what one kind of training run brings to the engine.

The engine (`ban.engine.loop.train`) owns the loop: schedule, mixed precision, compile, DDP,
gradient accumulation, clipping, non-finite guards, resume, signals, logs and checkpoints. A task
supplies the rest, as an object with these members (see `ban/tasks/vqa.py` and
`ban/tasks/grounding.py`; docs/DESIGN.md shows how to add one):

    name                      'vqa', 'flickr': TrainConfig.task
    final_model               'last' or 'best': the checkpoint the final report scores
    select_key                the key of evaluate_epoch's record that selects best.safetensors
    sums                      names of the task's running training sums (after the engine's)
    resolve_data(progress)    -> the prepared data directory of the run's config (progress:
                                 shown while the built-in benchmark is made on first use)
    datasets(data_dir)        -> (training set, evaluation set or None)
    build_model(data_dir)     -> the model, sized for the data
    collate(samples)          -> a batch
    batch_size(batch)         -> examples in a batch
    step(module, batch, dev)  -> (loss averaged over the batch's examples, task sums [len(sums)])
    summarize(sums, examples) -> training metrics of an epoch (or a logged step)
    evaluate_epoch(model, eval_set, device, env)       -> {"eval_...": value}
    evaluate_final(model, data_dir, device, env)       -> (report, prediction rows)
    describe(record)          -> the task's part of an epoch's printed line
    format_report(report)     -> the final report as text
"""

from __future__ import annotations

from ban.configs import TrainConfig
from ban.tasks.grounding import GroundingTask
from ban.tasks.vqa import VQATask

TASKS = {"vqa": VQATask, "flickr": GroundingTask}


def task_for(config: TrainConfig):
    """The task object of a training config."""
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} is not available; expected one of {sorted(TASKS)}")
    return TASKS[config.task](config)
