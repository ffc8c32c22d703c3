"""Checks a bench run does before it starts, so a bad option fails in a second, not after the run.

:func:`check_config` checks the numbers and the device of a :class:`~mke_plugins.bench.runner.BenchConfig`,
:func:`check_output` a ``--json`` / ``--plot`` path (a missing parent folder is fine: it is
created when the file is written); a ``--model`` folder is checked by ``load_vlm`` itself
(:func:`mke_plugins.adapters.loading.check_model_dir`). Every failure is an
:class:`~mke_hooks.MKEError` that says what to fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mke_hooks import MKEError


def check_config(cfg: Any) -> None:
    """The numeric options and the device of a bench config."""
    if cfg.probe_batch is None or cfg.probe_batch < 1:
        raise MKEError(f"--probe-batch must be at least 1 (probe rows per forward pass), got {cfg.probe_batch}")
    if cfg.threads is not None and cfg.threads < 1:
        raise MKEError(f"--threads must be at least 1 (or left out for the default), got {cfg.threads}")
    if getattr(cfg, "keep_batches_mb", 0) < 0:
        raise MKEError(f"keep_batches_mb must be 0 or more (MB of probe batches kept per sequence), got "
                       f"{cfg.keep_batches_mb}")
    check_device(cfg.device)


def check_device(device: str) -> None:
    """``device`` names a device this torch build has (cpu, cuda, cuda:N, mps, ...)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise MKEError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda":
        _check_cuda(device, dev.index)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MKEError(f"--device {device}: this machine or torch build has no MPS; use --device cpu")


def _check_cuda(device: str, index: int | None) -> None:
    import torch

    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build of torch"
               if torch.version.cuda is None else "no CUDA GPU is visible (see nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise MKEError(f"--device {device}: {why}, or use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise MKEError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path.cwd()


def check_output(path: str | os.PathLike[str], flag: str) -> None:
    """The file ``path`` can be written (its missing parent folders can be created)."""
    p = Path(path).absolute()
    if p.is_dir():
        example = Path(path) / f"bench-results{_suffix(flag)}"
        raise MKEError(f"{flag} {path}: is a folder; give a file path, e.g. {flag} {example}")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise MKEError(f"{flag} {path}: the file exists and is not writable; choose another path")
        return
    base = _existing_ancestor(p)
    if not base.is_dir():
        raise MKEError(f"{flag} {path}: {base} is a file, so no folder can be made in it; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MKEError(f"{flag} {path}: cannot write in {base} (read-only or no permission); choose another path")


def _suffix(flag: str) -> str:
    return ".png" if flag == "--plot" else ".json"


def check_plot_format(path: str | os.PathLike[str]) -> None:
    """matplotlib can write ``path``'s file type (its suffix)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    if suffix not in known:
        raise MKEError(f"--plot {path}: matplotlib cannot write .{suffix} files; use one of "
                       f"{', '.join('.' + k for k in sorted(known))} (e.g. .png)")
