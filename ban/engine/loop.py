"""The one training loop, for every task (`ban.tasks`).

Read top to bottom: set up (processes, data, model, optimizer, resume), then for each epoch the
optimizer steps (micro-batches for gradient accumulation, clipping, the non-finite guard, logs,
stops on request), then the epoch's end (metrics over all processes, evaluation, checkpoints),
and at the end the final evaluation. The schedule is the release's (`configs.lr_at`).

What is exact: a run repeats bit for bit on the same machine, code and thread count, and a
stopped run resumed from its state.pt continues exactly as if it had not stopped (data order,
dropout, optimizer). Threaded kernels may sum in another order on another machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ban import checkpoint, configs
from ban.configs import TrainConfig
from ban.distributed import (
    SkipBatches,
    all_reduce_sum,
    any_process,
    epoch_batches,
    gather,
    init_distributed,
    local_batch,
    resolve_device,
    seed_everything,
    set_rng_state,
    stats_device,
)
from ban.engine.runs import (
    ENGINE_SUMS,
    STATE_FILE,
    MetricsLog,
    Progress,
    RunLock,
    StopFlag,
    check_resume_config,
    load_state,
    save_state,
    write_run_header,
)
from ban.files import atomic_write_text, write_jsonl
from ban.tasks import task_for


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN or infinite; nothing was saved after it."""


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # 'finished' | 'stopped' (max_steps) | 'interrupted' (signal)
    progress: Progress
    report: dict[str, Any] | None = None
    signal: int | None = None


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' total norm to `max_norm` (when > 0); returns the norm before clipping
    (float64, on the device: reading it would wait for the device)."""
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).double()
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm().double() if grads else torch.zeros((), dtype=torch.float64)


def set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: float) -> float:
    """Set and return the schedule's rate at `epoch` (a fraction: a point within the epoch)."""
    lr = configs.lr_at(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _grouped(iterable: Iterable, size: int) -> Iterator[list]:
    group: list = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _flat(report: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str)) or value is None:
            out[f"{prefix}{key}"] = value
    return out


def _open_run(run_dir: Path, resume: bool) -> RunLock | None:
    """Lock an existing run directory (a second process on it is refused); refuse to start a new
    run over an old one. A new directory is made later, once data and model are ready."""
    if not run_dir.is_dir():
        return None
    lock = RunLock(run_dir).acquire()
    if not resume and (run_dir / STATE_FILE).exists():
        lock.release()
        raise ValueError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose "
            "another --out"
        )
    return lock


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
) -> TrainResult:
    """Train `config` into `run_dir`; evaluate each epoch on `config.eval_split` and at the end.

    `resume=True` continues the run in `run_dir` exactly where its state.pt left it (the config
    comes from the caller; use `engine.resume_config(run_dir)`). `max_steps` stops (with a
    checkpoint) once that many optimizer steps have been taken in total. SIGINT and SIGTERM stop
    after the current step, with a checkpoint. A NaN or infinite loss or gradient stops the run
    with `NonFiniteError` before any checkpoint is written after it (with
    `config.skip_nonfinite`, such steps are skipped and counted instead). Under torchrun every
    process calls this; rank 0 writes the files.
    """
    task = task_for(config)
    env = init_distributed(config.device)
    device = resolve_device(config.device, env)
    run_dir = Path(gather(str(run_dir), env)[0])  # rank 0 names the run
    with contextlib.ExitStack() as cleanup:
        lock = _open_run(run_dir, resume) if env.is_main else None
        if lock is not None:
            cleanup.callback(lock.release)
        return _train(
            task, config, env, device, run_dir, cleanup, resume, max_steps, progress, argv
        )


def _train(task, config, env, device, run_dir, cleanup, resume, max_steps, progress, argv):
    state_path = run_dir / STATE_FILE
    state = load_state(state_path) if resume else None
    if state is not None:
        check_resume_config(state, config, state_path)

    micro_batch, accum = local_batch(config.batch_size, config.grad_accum, env)
    seed_everything(config.seed)
    data_dir = task.resolve_data(progress and env.is_main)
    train_set, eval_set = task.datasets(data_dir)
    model = task.build_model(data_dir).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer != "adamax":
        raise ValueError(f"optimizer {config.optimizer!r} is not supported; expected 'adamax'")
    optimizer = torch.optim.Adamax(params, lr=configs.lr_at(config, 0))
    fractional_decay = any(e != int(e) for e in config.lr_decay_epochs)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    prog = Progress(sums=[0.0] * (len(ENGINE_SUMS) + len(task.sums)))
    if env.is_main:  # everything is ready: now the run directory may appear
        if not run_dir.is_dir():
            run_dir.mkdir(parents=True)
            cleanup.callback(RunLock(run_dir).acquire().release)
        write_run_header(run_dir, config, argv)
    log = MetricsLog(run_dir, env.is_main)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        prog = Progress(**state["progress"])
        log.truncate_after(prog.global_step)
        ranks = state["ranks"]
        if len(ranks) == env.world_size:  # the same processes: continue bit for bit
            set_rng_state(ranks[env.rank]["rng"])
            prog.sums = list(ranks[env.rank]["sums"])
        else:  # another number of processes: continue, not bit for bit
            set_rng_state(ranks[0]["rng"])
            if env.rank > 0:
                seed_everything(config.seed + 1000 * prog.global_step + env.rank)
            prog.sums = list(ranks[0]["sums"]) if env.is_main else [0.0] * len(prog.sums)
    elif env.rank > 0:
        seed_everything(config.seed + env.rank)  # different dropout per rank, same weights

    module: nn.Module = model
    if env.distributed:
        # Every trainable parameter takes part in every step (the counter's unused maps are
        # frozen), so DDP needs no search for unused parameters.
        module = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        module = torch.compile(module)

    n_engine = len(ENGINE_SUMS)
    status, signum = "finished", None
    checked_step = prog.global_step  # the last step at which the weights were known finite
    # Steps whose loss or gradient was not finite since `checked_step` (on the device: reading
    # it every step would make the host wait; it is read at each log record and checkpoint).
    nonfinite = torch.zeros((), dtype=torch.float64, device=stats_device(device))

    def check_finite(epoch: int) -> None:
        nonlocal checked_step
        if nonfinite.item() > 0:
            raise NonFiniteError(
                f"training became non-finite (NaN or infinite loss or gradient) at "
                f"{int(nonfinite.item())} step(s) between step {checked_step + 1} and step "
                f"{prog.global_step} (epoch {epoch + 1}); nothing was saved after step "
                f"{checked_step}. Check the data for non-finite features, lower the learning "
                "rate, or set skip_nonfinite to skip such steps"
            )
        checked_step = prog.global_step

    with StopFlag() as stop:
        while prog.epoch < config.epochs:
            epoch = prog.epoch
            batches = epoch_batches(train_set, micro_batch, epoch, config.seed, env)
            steps_in_epoch = math.ceil(len(batches) / accum)
            lr = set_lr(optimizer, config, epoch + prog.step_in_epoch / steps_in_epoch)
            loader = DataLoader(
                train_set,
                batch_sampler=SkipBatches(batches, prog.step_in_epoch * accum),
                collate_fn=task.collate,
                num_workers=config.num_workers,
                generator=torch.Generator().manual_seed(config.seed + epoch),
                pin_memory=device.type == "cuda",
            )
            module.train()
            bar = tqdm(
                _grouped(loader, accum),
                desc=f"epoch {epoch + 1}/{config.epochs}",
                total=steps_in_epoch,
                initial=prog.step_in_epoch,
                disable=not (progress and env.is_main),
                dynamic_ncols=True,
                leave=False,
            )
            tick, tick_examples = time.perf_counter(), 0
            # The epoch's sums stay on the device while it runs: reading a loss every step would
            # make the host wait for the device. prog.sums is brought up to date after the loop.
            running = torch.tensor(prog.sums, dtype=torch.float64, device=stats_device(device))
            for micro_batches in bar:
                if fractional_decay:  # a decay within an epoch takes effect from its step on
                    lr = set_lr(optimizer, config, epoch + prog.step_in_epoch / steps_in_epoch)
                n_local = sum(task.batch_size(mb) for mb in micro_batches)
                step = torch.zeros(1 + len(task.sums), dtype=torch.float64, device=running.device)
                for i, batch in enumerate(micro_batches):
                    sync = i == len(micro_batches) - 1
                    ctx = (
                        module.no_sync()
                        if env.distributed and not sync and hasattr(module, "no_sync")
                        else contextlib.nullcontext()
                    )
                    n = task.batch_size(batch)
                    with ctx:
                        loss, task_sums = task.step(module, batch, device)
                        scaled = loss * (n / n_local)
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step[0] += loss.detach().double().to(running.device) * n
                    step[1:] += task_sums.to(running.device)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = clip_gradients(params, config.grad_clip)
                # fp16's scaler skips steps with infinite gradients by itself: only the loss
                # is guarded there.
                guard = step[0] if scaler is not None else step[0] + grad_norm.to(step.device)
                bad = ~torch.isfinite(guard)
                skip = config.skip_nonfinite and bool(bad.item())
                if skip:
                    running[4] += 1
                elif scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not config.skip_nonfinite:
                    nonfinite += bad
                if not skip:
                    running[0] += step[0]
                    running[1] += n_local
                    running[2] += grad_norm.to(running.device)
                    running[3] += 1
                    running[n_engine:] += step[1:]
                prog.step_in_epoch += 1
                prog.global_step += 1
                prog.examples += n_local * env.world_size
                tick_examples += n_local * env.world_size
                if prog.global_step % max(1, config.log_every) == 0 or prog.step_in_epoch == 1:
                    check_finite(epoch)
                    elapsed = max(time.perf_counter() - tick, 1e-9)
                    values = step.tolist()
                    record = {
                        "epoch": epoch,
                        "lr": lr,
                        "loss": values[0] / n_local,
                        **task.summarize(values[1:], n_local),
                        "grad_norm": grad_norm.item(),
                        "examples_per_s": tick_examples / elapsed,
                    }
                    log.write("step", prog.global_step, **record)
                    speed = record["examples_per_s"]
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{speed:.0f}")
                    tick, tick_examples = time.perf_counter(), 0
                stop_now = any_process(stop.signal is not None, env, device) or (
                    max_steps is not None and prog.global_step >= max_steps
                )
                if stop_now and prog.step_in_epoch < steps_in_epoch:
                    signum = stop.signal
                    status = "interrupted" if signum is not None else "stopped"
                    break
            bar.close()
            prog.sums = running.tolist()
            check_finite(epoch)
            if status != "finished":
                save_state(state_path, model, optimizer, scaler, prog, config, env)
                if env.is_main:
                    checkpoint.save(model, run_dir / "last.safetensors")
                    log.write(
                        "stop",
                        prog.global_step,
                        epoch=epoch,
                        step_in_epoch=prog.step_in_epoch,
                        reason=status,
                    )
                break

            # End of epoch: metrics over all processes, evaluation, checkpoints.
            sums = all_reduce_sum(torch.tensor(prog.sums, dtype=torch.float64), env, device)
            sums = sums.tolist()
            record = {
                "epoch": epoch,
                "lr": lr,
                "loss": sums[0] / max(sums[1], 1.0),
                **task.summarize(sums[n_engine:], sums[1]),
                "grad_norm": sums[2] / max(sums[3], 1.0),
                "examples": prog.examples,
            }
            if config.skip_nonfinite:
                record["skipped_steps"] = int(sums[4])
            if eval_set is not None:
                record.update(task.evaluate_epoch(model, eval_set, device, env))
            log.write("epoch", prog.global_step, **record)
            if env.is_main and progress:
                print(
                    f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} lr {lr:.2e} "
                    f"grad norm {record['grad_norm']:.3f} | {task.describe(record)}",
                    file=sys.stderr,
                )
            score = record.get(task.select_key)
            improved = score is not None and (prog.best_score is None or score > prog.best_score)
            if improved:
                prog.best_score, prog.best_epoch = score, epoch
            prog.epoch += 1
            prog.step_in_epoch = 0
            prog.sums = [0.0] * len(prog.sums)
            model.notes["epoch"] = epoch
            save_state(state_path, model, optimizer, scaler, prog, config, env)
            if env.is_main:
                checkpoint.save(model, run_dir / "last.safetensors")
                if improved or eval_set is None:
                    checkpoint.save(model, run_dir / "best.safetensors")
            more = prog.epoch < config.epochs
            if max_steps is not None and prog.global_step >= max_steps and more:
                status = "stopped"
            elif any_process(stop.signal is not None, env, device) and more:
                status, signum = "interrupted", stop.signal
            if status != "finished":  # the state and checkpoint of this epoch's end are saved
                if env.is_main:
                    log.write(
                        "stop", prog.global_step, epoch=prog.epoch, step_in_epoch=0, reason=status
                    )
                break

    report = None
    if status == "finished" and eval_set is not None:
        final = model
        if task.final_model == "best" and prog.best_epoch is not None:
            if env.distributed:
                dist.barrier()  # rank 0 has written best.safetensors
            final = checkpoint.load(run_dir / "best.safetensors", device)
        report, rows = task.evaluate_final(final, data_dir, device, env)
        report.update(
            model=f"{task.final_model}.safetensors",
            epoch=prog.best_epoch if task.final_model == "best" else prog.epoch - 1,
            best_epoch=prog.best_epoch,
        )
        if env.is_main:
            atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
            write_jsonl(rows, run_dir / "predictions.jsonl")
            log.write("eval", prog.global_step, **_flat(report))
    log.close()
    return TrainResult(run_dir, status, prog, report, signum)
