"""What an edit costs: wall time, peak memory, and one forward+backward pass as the unit of work.

Seconds depend on the machine; the ratio of edit time to one forward+backward pass of the same
model on the same request does much less, so the bench reports both. The unit is the median of
:data:`UNIT_REPEATS` timed passes after :data:`UNIT_WARMUP` untimed ones, so it holds still. Peak memory is measured
around the edit only: on CUDA with ``torch.cuda.max_memory_allocated`` after resetting the peak;
on CPU as the process's peak resident set size (``VmHWM``), reset before the edit by writing
``5`` to ``/proc/self/clear_refs``. Where that reset is not allowed the lifetime peak of
``resource.getrusage`` is used and :attr:`PeakMemory.source` says so. A model spread over several
GPUs (``--device-map auto``) is measured on each of them: the peak is the sum of the GPUs' peaks
(:attr:`PeakMemory.per_device_mb` keeps each), and :func:`sync` waits for every one of them.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence, Union

import torch

#: one device, or every device a model spans (:func:`mke_plugins.adapters.placement.model_devices`)
Devices = Union[torch.device, Sequence[torch.device]]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def as_devices(device: Devices) -> list[torch.device]:
    """``device`` as a list of distinct devices (one device, or every device of a spread model)."""
    return [device] if isinstance(device, torch.device) else list(dict.fromkeys(device))


def sync(device: Devices) -> None:
    """Wait for queued kernels on ``device`` (or each of several) so wall-clock time covers them (no-op on CPU)."""
    for d in as_devices(device):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


class PeakMemory:
    """Context manager: peak memory (MB) while the block runs, and its rise over the start.

    ``device`` is one device or every device of a spread model; with several GPUs the peak and the
    start are summed over them (each GPU's own peak is in :attr:`per_device_mb`).
    """

    def __init__(self, device: Devices) -> None:
        devices = as_devices(device)
        self.device = devices[0] if devices else torch.device("cpu")
        self.gpus = [d for d in devices if d.type == "cuda"]
        self.peak_mb: float | None = None
        self.delta_mb: float | None = None
        self.per_device_mb: dict[str, float] = {}
        self.source = ""

    def __enter__(self) -> "PeakMemory":
        if self.gpus:
            sync(self.gpus)
            for d in self.gpus:
                torch.cuda.reset_peak_memory_stats(d)
            self._start = sum(torch.cuda.memory_allocated(d) for d in self.gpus) / 2**20
            self.source = "cuda.max_memory_allocated"
        else:
            rss = _status_kb("VmRSS")
            if rss is not None and _reset_hwm():
                self._start = rss / 1024
                self.source = "VmHWM"
            else:
                self._start = self._rusage_mb()
                self.source = "ru_maxrss"
        return self

    @staticmethod
    def _rusage_mb() -> float:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux

    def __exit__(self, *exc: Any) -> None:
        if self.source.startswith("cuda"):
            sync(self.gpus)
            self.per_device_mb = {str(d): torch.cuda.max_memory_allocated(d) / 2**20 for d in self.gpus}
            self.peak_mb = sum(self.per_device_mb.values())
        elif self.source == "VmHWM":
            hwm = _status_kb("VmHWM")
            self.peak_mb = hwm / 1024 if hwm is not None else self._rusage_mb()
        else:
            self.peak_mb = self._rusage_mb()
        self.delta_mb = max(0.0, self.peak_mb - self._start)


#: untimed forward+backward passes before the unit is timed (allocator, autograd graph, caches)
UNIT_WARMUP = 1
#: timed passes; the unit is their median
UNIT_REPEATS = 5


def fwd_bwd_seconds(adapter: Any, model: Any, batch: Any, *, warmup: int = UNIT_WARMUP,
                    repeats: int = UNIT_REPEATS, drop_grads: bool = False) -> float:
    """Seconds of one forward and backward pass of ``model`` on ``batch`` (all weights trainable).

    ``warmup`` passes run untimed first, then the median of ``repeats`` timed passes is returned
    (one cold pass alone varied 13-48 ms within a run on a 2-core CPU). ``requires_grad`` flags and
    ``.grad`` of every parameter are put back afterwards; gradients of the passes are discarded.
    With ``drop_grads`` each weight gradient is freed as soon as it is accumulated, so the pass
    computes every gradient but never holds a second copy of the weights (at 7B: 16 GB in bf16).
    """
    from mke_plugins.adapters.base import unwrap_model
    from mke_plugins.adapters.placement import model_devices

    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    params = [p for p in unwrap_model(model).parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    device = model_devices(model)

    def one_pass() -> float:
        for p in params:
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = adapter.loss(model, batch)
            loss.backward()
        sync(device)
        return time.perf_counter() - t0

    handles = []
    try:
        for p in params:
            p.requires_grad_(True)
            if drop_grads:
                handles.append(p.register_post_accumulate_grad_hook(_free_grad))
        for _ in range(warmup):
            one_pass()
        return statistics.median(one_pass() for _ in range(repeats))
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.grad = grad
            p.requires_grad_(flag)


def _free_grad(p: torch.Tensor) -> None:
    p.grad = None
