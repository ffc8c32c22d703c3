"""Where a model's weights live: device maps, memory limits, and the placements an edit cannot work on.

A model bigger than one GPU is loaded across the GPUs of one node with transformers' / accelerate's
``device_map`` (``--device-map auto``, optionally ``--max-memory 0=20GiB,1=20GiB``). Every method,
restore and scorer then follows each parameter's own device and dtype: the helpers here tell them
where a model takes its inputs (:func:`input_device`) and which devices it spans
(:func:`model_devices`).

One placement is refused: weights *offloaded* by accelerate. When a device map sends part of a model
to ``cpu`` next to GPUs, or to ``disk``, accelerate leaves a ``meta`` placeholder in the module and
keeps the values in a side store that a hook copies onto the GPU for each forward pass and throws
away after it. An in-place edit would write into that throw-away copy (the edit silently vanishes),
a snapshot of a ``meta`` tensor holds no values (no bit-exact restore), and a delta or side weight
cannot be built beside a weight that has no device. :func:`refuse_offloaded` therefore names the
first such parameter and says how to make the model fit. Weights that really sit on the CPU
(a CPU-only machine, or a hand-made map without offload hooks) are ordinary weights and are fine.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import nn

from mke_hooks import MKEError

#: the ``device_map`` strategies transformers accepts by name
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: devices a ``--max-memory`` entry may name besides a GPU index
MEMORY_DEVICES = ("cpu", "disk", "mps")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def check_device_map(value: str | None, flag: str = "--device-map") -> str | None:
    """``value`` when it is a strategy transformers knows (``auto``...), ``None`` for none; else a clear error."""
    if value is None or value == "":
        return None
    if value not in DEVICE_MAPS:
        raise MKEError(f"{flag} {value!r}: use one of {', '.join(DEVICE_MAPS)} (auto spreads the model over "
                       f"every visible GPU, filling them in order)")
    return value


def _memory_key(key: str, flag: str) -> int | str:
    k = key.strip().lower()
    if k.startswith("cuda:"):
        k = k[5:]
    if k.isdigit():
        return int(k)
    if k in MEMORY_DEVICES:
        return k
    raise MKEError(f"{flag}: {key!r} is not a device; name a GPU by its index (0, 1, ... or cuda:0) or one of "
                   f"{', '.join(MEMORY_DEVICES)}, e.g. {flag} 0=20GiB,cpu=60GiB")


def _memory_value(key: str, value: Any, flag: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip()
    m = _SIZE.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise MKEError(f"{flag}: {key}={value!r} is not a memory size; write bytes or a number with a unit "
                       f"(20GiB, 500MB, 1.5GB)")
    return int(text) if m.group(2) is None else text.replace(" ", "")


def parse_max_memory(text: str | dict[str, Any] | None, flag: str = "--max-memory") -> dict[int | str, Any] | None:
    """``--max-memory`` as the dict ``from_pretrained(max_memory=...)`` takes, or ``None`` when not given.

    Accepts ``0=20GiB,1=20GiB,cpu=60GiB`` (GPU index or ``cuda:N``, ``cpu``, ``disk``, ``mps``) or the
    same as a JSON object (``{"0": "20GiB", "cpu": "60GiB"}``); sizes are bytes or a number with a
    unit.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, dict):
        pairs = list(text.items())
    elif text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MKEError(f"{flag}: not valid JSON ({exc}); write {flag} '{{\"0\": \"20GiB\", \"cpu\": "
                           f"\"60GiB\"}}' or {flag} 0=20GiB,cpu=60GiB") from None
        if not isinstance(data, dict):
            raise MKEError(f"{flag}: the JSON must be an object of device -> size, e.g. {{\"0\": \"20GiB\"}}")
        pairs = list(data.items())
    else:
        pairs = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise MKEError(f"{flag}: {part!r} is not DEVICE=SIZE; write e.g. {flag} 0=20GiB,cpu=60GiB")
            pairs.append((key, value))
    out: dict[int | str, Any] = {}
    for key, value in pairs:
        k = _memory_key(str(key), flag)
        if k in out:
            raise MKEError(f"{flag}: device {key!r} is given twice")
        out[k] = _memory_value(str(key), value, flag)
    if not out:
        raise MKEError(f"{flag}: no DEVICE=SIZE entries; write e.g. {flag} 0=20GiB,cpu=60GiB")
    return out


def offloaded(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that hold no values here (``meta``: offloaded or never loaded)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    names += [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None and b.device.type == "meta"]
    return names


def _map_entry(model: nn.Module, name: str) -> tuple[str, Any] | None:
    """The ``hf_device_map`` entry (module prefix, device) that places parameter ``name``."""
    dmap = getattr(model, "hf_device_map", None)
    if not isinstance(dmap, dict):
        return None
    best = None
    for prefix, device in dmap.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, device)
    return best


def refuse_offloaded(model: nn.Module, what: str = "the model") -> None:
    """Raise an :class:`~mke_hooks.MKEError` naming the first offloaded (``meta``) weight of ``model``.

    ``what`` names the model in the message (``--model DIR``). A model with every weight on a real
    device passes; see the module docstring for why offloaded weights cannot be edited.
    """
    names = offloaded(model)
    if not names:
        return
    first = names[0]
    entry = _map_entry(model, first)
    where = (f" (the device map puts {entry[0] or 'the whole model'} on {entry[1]!r}, which accelerate offloads)"
             if entry is not None else "")
    raise MKEError(
        f"{what}: weight {first!r} is on the 'meta' device{where}, offloaded ({len(names)} weight(s) in all). "
        f"Offloaded weights cannot be edited: accelerate loads them afresh for every forward "
        f"pass, so an in-place edit would be lost and no exact snapshot can be taken. Make the model fit on the "
        f"GPUs: raise or drop --max-memory for them, use more GPUs, or a smaller --dtype (bfloat16).")


def spread(model: nn.Module, device_map: str, max_memory: dict[int | str, Any] | None = None, *,
           what: str = "the model") -> nn.Module:
    """Place a model built in memory (on the CPU) over this node's GPUs the way ``from_pretrained`` would.

    The map is computed like transformers' (balanced memory unless ``sequential``, the model's
    ``_no_split_modules`` kept whole) and applied with accelerate's ``dispatch_model``. A map that
    would offload anything (``disk``, or ``cpu`` beside GPUs) is refused before dispatching, naming
    the first weight it would offload. Without GPUs the map is all ``cpu`` and the model stays put.
    """
    from accelerate import dispatch_model
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    check_device_map(device_map)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map == "sequential":
        memory = get_max_memory(max_memory)
    else:
        memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                     low_zero=device_map == "balanced_low_0")
    dmap = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    on_gpu = any(str(d) not in ("cpu", "disk") for d in dmap.values())
    offload = ("cpu", "disk") if on_gpu else ("disk",)
    for prefix, device in dmap.items():
        if str(device) in offload:
            first = next((n for n, _ in model.named_parameters() if prefix == "" or n == prefix
                          or n.startswith(prefix + ".")), prefix)
            raise MKEError(
                f"{what}: the device map would offload {prefix or 'the whole model'} to {device!r}, starting with "
                f"weight {first!r}. Offloaded weights cannot be edited: accelerate loads them afresh for every "
                f"forward pass, so an in-place edit would be lost and no exact snapshot can be taken. Make the "
                f"model fit on the GPUs: raise or drop --max-memory for them, use more GPUs, or a smaller --dtype.")
    model = dispatch_model(model, dmap)
    refuse_offloaded(model, what)
    return model


def input_device(model: Any) -> torch.device:
    """The device where the model takes its token inputs: its input embeddings' (see ``model_device``)."""
    from .base import model_device

    return model_device(model)


def model_devices(model: Any) -> list[torch.device]:
    """The distinct devices of a model's parameters, in the order they first appear (CPU when none)."""
    from .base import unwrap_model

    seen: dict[torch.device, None] = {}
    for p in unwrap_model(model).parameters():
        seen.setdefault(p.device, None)
    return list(seen) or [torch.device("cpu")]


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype trainable deltas and their arithmetic use: float32, or wider when a weight is wider."""
    out = torch.float32
    for d in dtypes:
        if d.is_floating_point:
            out = torch.promote_types(out, d)
    return out
