"""Processes, devices and randomness: DDP under torchrun, the device to use, seeding, the random
state a resume restores, and the data order of an epoch (the same for any number of processes)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, DistributedSampler


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = DistEnv()


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); a plain `python` start is a one-process job. On CUDA, NCCL
    for CUDA tensors and gloo for CPU tensors: the per-step stop flag is exchanged between the
    hosts without waiting for the GPU. gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
    )
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return env


def resolve_device(name: str | None, env: DistEnv = ONE_PROCESS) -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:1', 'mps'), or the best available. Under torchrun each
    process takes the GPU of its LOCAL_RANK."""
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, mps)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", env.local_rank if env.distributed else 0)
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on `device`, or nothing."""
    if amp is None:
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


def rng_state() -> dict[str, Any]:
    """Every random generator's state (torch, CUDA, numpy, Python), as tensors and tuples that
    `torch.load(weights_only=True)` reads back."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather(obj: Any, env: DistEnv) -> list[Any]:
    """`obj` of every process, in rank order (a one-element list in a one-process job)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def comm_device(device: torch.device) -> torch.device:
    """Where a small collective's tensor goes: the CPU, unless the process group is NCCL alone."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, env: DistEnv, device: torch.device) -> torch.Tensor:
    """`values` summed over the processes (a CPU tensor)."""
    values = values.cpu()
    if env.distributed:
        values = values.to(comm_device(device))
        dist.all_reduce(values)
    return values.cpu()


def any_process(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every process when `flag` is true on any (a signal reaches ranks at different
    steps; they must stop at the same one)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device(device))
    dist.all_reduce(t)
    return bool(t.item() > 0)


def stats_device(device: torch.device) -> torch.device:
    """Where running float64 sums can live: the training device, except MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def local_batch(batch_size: int, grad_accum: int, env: DistEnv) -> tuple[int, int]:
    """(examples per micro-batch on this process, micro-batches per optimizer step)."""
    accum = max(1, grad_accum)
    parts = env.world_size * accum
    if batch_size % parts:
        raise ValueError(
            f"batch_size {batch_size} must divide into {env.world_size} processes x "
            f"{accum} accumulation steps"
        )
    return batch_size // parts, accum


class SkipBatches:
    """A batch sampler without its first `skip` batches (the part of an epoch already done)."""

    def __init__(self, batches: BatchSampler, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


def epoch_batches(
    dataset: Dataset, batch_size: int, epoch: int, seed: int, env: DistEnv, shuffle: bool = True
) -> BatchSampler:
    """This process's batches of `epoch`: a permutation drawn from (seed, epoch) alone, so any
    epoch's order can be rebuilt on resume; under DDP rank r takes every world_size-th sample, so
    the union of the ranks' i-th batches is the i-th batch of one process at the global size."""
    sampler = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed
    )
    sampler.set_epoch(epoch)
    return BatchSampler(sampler, batch_size, drop_last=False)
