"""torch.distributed set-up shared by every training stage: one code path from a laptop CPU
(world size 1, nothing initialised) to torchrun on many GPUs (DDP or FSDP2)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from plm.errors import ConfigError

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, dev)


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistEnv]:
    """`with distributed(cfg.device) as env:` the process group of one training command, torn
    down however it ends (every stage's entry point)."""
    env = init_distributed(device)
    try:
        yield env
    finally:
        cleanup(env)


def wrap_model(model: nn.Module, env: DistEnv, strategy: str) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder layer, then the root).

    Under FSDP2 each layer all-gathers its weights for its forward and frees them after (again
    for its backward); the root (embedding, final norm) keeps its weights gathered from its
    forward to its backward, which is what lets the chunked loss (plm.model.loss) read the tied
    embedding after the forward. Weights and AdamW state stay fp32 and sharded; bf16 is the
    trainer's autocast. The trainer compiles after wrapping: per block, FSDP2's hooks run
    eagerly around each compiled layer."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.distributed must be one of {STRATEGIES}, got {strategy!r}")
    if not env.enabled or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= env.world_size
    return x


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
