"""The process group: which rank this process is, on which device, and the collectives the trainer needs.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):

    torchrun --standalone --nproc_per_node=8 -m fatrain.cli.train trainer.strategy=ddp ...

or on SLURM through Hydra's submitit launcher (``hydra/launcher=slurm``, one task per GPU),
whose environment is translated into the same variables.

``trainer.strategy`` picks the engine: ``single`` (one process, no process group), ``ddp``
(DistributedDataParallel) or ``fsdp`` (FSDP2, ``torch.distributed.fsdp.fully_shard``).
NCCL drives GPUs (rank r on ``cuda:LOCAL_RANK``), gloo the CPU, so CI tests the same code
with two CPU processes. ``ddp``/``fsdp`` run as one rank without torchrun too (a private
in-memory store), which is how a single process resumes a sharded checkpoint.

A failing rank must bring the job down, never leave the others waiting: the process group
has a timeout (``trainer.dist_timeout_s``), exceptions propagate (the entry point exits
non-zero, and torchrun then stops the other ranks), and the group is destroyed at the end.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

STRATEGIES = ("single", "ddp", "fsdp")
DIST_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. ``single`` is rank 0 of 1 with no process group."""

    strategy: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # nccl | gloo; None without a process group
    owns_group: bool = False  # this DistEnv created the group and destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def export_submitit_env() -> None:
    """Under Hydra's submitit launcher on SLURM each task is one rank: export torchrun's variables.

    submitit runs the job function in every task of the allocation; its helper derives
    MASTER_ADDR (the first host), MASTER_PORT (from the job id), RANK, WORLD_SIZE and
    LOCAL_RANK from SLURM's. A launch that already set RANK (torchrun) is left alone.
    """
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's (or submitit's) environment; (0, 1, 0) outside it."""
    export_submitit_env()
    def read(name, default):
        value = os.environ.get(name)
        try:
            return default if value is None else int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None

    world_size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} do not fit (need 0 <= RANK < WORLD_SIZE)")
    return rank, world_size, local_rank


def _select_rank_device(name: str, local_rank: int, strategy: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"trainer.device={name} is not supported (allowed: auto, cpu, cuda)")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} with trainer.strategy={strategy} needs CUDA GPUs, and none is "
                         "available (use trainer.device=cpu: gloo runs the ranks on the CPU)")
    if device.index is not None:
        raise ValueError(f"trainer.device={name}: with trainer.strategy={strategy} each rank uses cuda:LOCAL_RANK "
                         "(pass trainer.device=cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but this node has only {torch.cuda.device_count()} GPU(s): "
                         "start at most one rank per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(trainer_cfg) -> DistEnv:
    """Check the strategy against the launch and the devices, and join (or create) the process group.

    Raises ValueError with one line naming the setting when they do not fit: ``single``
    under a multi-process launch, NCCL without GPUs, gloo asked to drive GPUs.
    """
    strategy = trainer_cfg.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy={strategy!r} is not allowed (choose from: {', '.join(STRATEGIES)})")
    rank, world_size, local_rank = launcher_env()
    if strategy == "single":
        if world_size > 1:
            raise ValueError(f"trainer.strategy=single but this job has WORLD_SIZE={world_size} processes: pass "
                             "trainer.strategy=ddp or trainer.strategy=fsdp (or launch one process)")
        return DistEnv()

    backend = trainer_cfg.get("dist_backend", "auto") or "auto"
    if backend not in DIST_BACKENDS:
        raise ValueError(f"trainer.dist_backend={backend!r} is not allowed (choose from: {', '.join(DIST_BACKENDS)})")
    device_name = trainer_cfg.device
    if backend == "nccl" and device_name == "auto" and not torch.cuda.is_available():
        raise ValueError("trainer.dist_backend=nccl needs CUDA GPUs, and none is available "
                         "(use trainer.dist_backend=gloo or auto on the CPU)")
    device = _select_rank_device(device_name, local_rank, strategy)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("trainer.dist_backend=nccl runs only on CUDA GPUs, not with trainer.device=cpu "
                         "(use trainer.dist_backend=gloo or auto)")
    if backend == "gloo" and device.type == "cuda":
        raise ValueError("trainer.dist_backend=gloo on GPUs is not supported here: use trainer.dist_backend=nccl "
                         "(or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if dist.is_initialized():  # an outer caller (the entry point) already joined the group
        if dist.get_world_size() != world_size or dist.get_backend() != backend:
            raise ValueError(f"a process group ({dist.get_backend()}, {dist.get_world_size()} ranks) already exists "
                             f"and does not match trainer.strategy={strategy} with {backend} on {world_size} ranks")
        return DistEnv(strategy, rank, world_size, local_rank, device, backend, owns_group=False)

    timeout = timedelta(seconds=trainer_cfg.get("dist_timeout_s", 600) or 600)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    elif world_size == 1:
        # One rank without torchrun: an in-memory store, no port to pick.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    else:
        raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch the ranks with torchrun")
    return DistEnv(strategy, rank, world_size, local_rank, device, backend, owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(env: DistEnv):
    """Destroy the group ``env`` created when the block ends; after an error only if this is the one rank.

    NOTE: after an error on one of several ranks the group is left as it is: the peers may be
    inside a collective that a graceful destroy would wait for. The process exits with the
    error, and torchrun stops the other ranks (the group's timeout covers other launchers).
    """
    try:
        yield env
    except BaseException:
        if env.world_size == 1:
            shutdown(env)
        raise
    shutdown(env)


# ----- collectives (no-ops for a single process) ---------------------------------------------------------


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over ranks in place (sum, max or mean) and return it.

    NOTE: gloo has no ReduceOp.AVG, so the mean is a sum divided by the world size.
    """
    if not env.distributed:
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        tensor /= env.world_size
    return tensor


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
