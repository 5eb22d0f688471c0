"""Running under `torchrun`: the process group, which rank does what, and a few collectives.

torchrun (or `srun torchrun` on SLURM) starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous; featrecon only joins the group it describes: NCCL when
the stage runs on CUDA, gloo on CPUs. Without those variables, or with one process,
every helper here is a no-op and the stages run as a single process.

Every collective has a timeout (FEATRECON_DIST_TIMEOUT seconds, default 1800), so a rank
that dies leaves the others with an error naming the wait rather than a hung job.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass

import torch

from .errors import FeatreconError

log = logging.getLogger(__name__)
TIMEOUT_ENV = "FEATRECON_DIST_TIMEOUT"


def requested_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not under a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise FeatreconError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def timeout() -> _dt.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        raise FeatreconError(f"{TIMEOUT_ENV}={raw!r}: give the seconds a rank may wait for the others") from None
    return _dt.timedelta(seconds=seconds)


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes shared files (metrics, checkpoints, attributes)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            _wait("barrier", lambda: torch.distributed.barrier())

    def broadcast(self, obj=None):
        """Rank 0's `obj`, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        _wait("broadcast", lambda: torch.distributed.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.main else None
        _wait("gather", lambda: torch.distributed.gather_object(obj, out, dst=0))
        return out

    def all_gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        _wait("all_gather", lambda: torch.distributed.all_gather_object(out, obj))
        return out

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over the ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        _wait("all_reduce", lambda: torch.distributed.all_reduce(t))
        return t.tolist()


def _wait(what: str, fn) -> None:
    try:
        fn()
    except RuntimeError as e:  # gloo / NCCL report a dead peer or a timeout this way
        raise FeatreconError(f"rank {torch.distributed.get_rank()}: {what} with the other ranks failed "
                             f"({str(e).splitlines()[0][:200]}); a rank has died or is stuck: see its log. "
                             f"Rerun the same command to resume (wait limit: {TIMEOUT_ENV}, now "
                             f"{timeout().total_seconds():.0f} s)") from None


def join(device: torch.device) -> Group:
    """Join the job's process group if launched with several processes; the group's device is
    `device`, on CUDA the GPU of this process's LOCAL_RANK."""
    world = requested_world()
    if world == 1:
        return Group(device=device)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout(), **({"device_id": device} if device.type == "cuda" else {}))
        log.info("rank %d of %d joined (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return Group(dist.get_rank(), dist.get_world_size(), local, device)


def leave(group: Group) -> None:
    if group.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
