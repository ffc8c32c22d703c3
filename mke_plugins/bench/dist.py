"""The bench across processes: torch.distributed ranks under ``torchrun`` or ``accelerate launch``.

Why it exists: a large run takes days in one process, and the machines it runs on have several
GPUs. Following lm-evaluation-harness, the bench does not schedule anything itself: the launcher
starts ``WORLD_SIZE`` processes and sets ``RANK`` / ``LOCAL_RANK``; each rank takes every
``WORLD_SIZE``-th unit of work (strided, :meth:`Ranks.mine`), runs on its own device
(``cuda:LOCAL_RANK``, or the CPU with the gloo backend), and rank 0 gathers the finished units
(:meth:`Ranks.gather`), aggregates them and writes the one JSON, table and plot.

The progress bar lives on rank 0 and counts every rank's edits through the process group's own
key-value store (an atomic counter each rank adds to; :class:`SharedCount`). With no launcher
(``WORLD_SIZE`` unset or 1) nothing here starts a process group and every call is local.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

from mke_hooks import MKEError

T = TypeVar("T")

#: the counter keys in the process group's store (one bench per process group)
_TICKS, _FINISHED = "mke_bench/ticks", "mke_bench/finished"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise MKEError(f"environment variable {name}={text!r} is not an integer; it is set by torchrun / "
                       "accelerate launch: unset it to run in one process") from None


@dataclass
class Ranks:
    """This process's place among the bench's processes (``size`` 1: no launcher, nothing shared)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    started: bool = False  # this object initialised the process group (and destroys it in close)

    @property
    def spread(self) -> bool:
        """More than one process."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports."""
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: items ``rank, rank + size, ...`` (strided, as lm-evaluation-harness)."""
        return list(items[self.rank::self.size])

    def barrier(self) -> None:
        if self.spread:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); ``None`` on the other ranks."""
        if not self.spread:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        """Leave the process group this object started."""
        if self.started:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.started = False


def start(device: str, device_map: str | None = None) -> Ranks:
    """The ranks from the launcher's environment; with ``WORLD_SIZE`` > 1, the process group started.

    ``device`` is the run's ``--device``: ``cuda`` (or ``cuda:K``) becomes ``cuda:LOCAL_RANK`` on
    each rank (nccl), anything else stays as given (gloo). A spread model (``--device-map``) takes
    a node's GPUs for one process, so it is refused beside several ranks.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return Ranks(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device_map is not None:
        raise MKEError(f"--device-map spreads one model over this node's GPUs, but {size} processes were started "
                       "(WORLD_SIZE): run it in one process (plain `mke-plugins bench`), or drop --device-map and "
                       "let each rank take one GPU")
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise MKEError(f"--device {device}: no CUDA device is visible to rank {rank}; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise MKEError(f"rank {rank} has LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are "
                           "visible: start at most that many processes per node (--nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise MKEError(f"the process group has {dist.get_world_size()} ranks (this is {dist.get_rank()}) but the "
                       f"environment says WORLD_SIZE={size}, RANK={rank}")
    return Ranks(rank=rank, size=size, local_rank=local_rank, device=device, started=started)


class SharedCount:
    """A counter every rank adds to and rank 0 reads: the edits made so far, for rank 0's progress bar.

    It is the process group's own store (the one the launcher's rendezvous made), so it needs no
    port, file or thread of its own; in one process it is a plain integer.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.local = 0
        self.store: Any = None
        if ranks.spread:
            from torch.distributed import distributed_c10d

            self.store = distributed_c10d._get_default_store()
            ranks.barrier()  # a previous bench in this process group must not leave its counts behind
            if ranks.main:
                self.store.set(_TICKS, "0")
                self.store.set(_FINISHED, "0")
            ranks.barrier()

    def add(self, n: int = 1) -> int:
        """Add ``n`` edits; the total over every rank so far."""
        self.local += n
        return int(self.store.add(_TICKS, n)) if self.store is not None else self.local

    def total(self) -> int:
        return int(self.store.add(_TICKS, 0)) if self.store is not None else self.local

    def finish(self) -> None:
        """This rank has made all its edits."""
        if self.store is not None:
            self.store.add(_FINISHED, 1)

    def wait_all(self, on_count: Any, poll: float = 0.5) -> None:
        """Rank 0, after its own edits: follow the others' counts until every rank has finished."""
        if self.store is None:
            return
        while int(self.store.add(_FINISHED, 0)) < self.ranks.size:
            on_count(self.total())
            time.sleep(poll)
        on_count(self.total())
