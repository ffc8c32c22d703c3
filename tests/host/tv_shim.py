"""Let the CUDA-linked PyPI torchvision import on a CPU-only torch (host check only).

EasyEdit main imports torchvision through ``qwen_vl_utils`` and its BLIP processors, so
``import easyeditor`` fails when torchvision's compiled ops cannot load: torchvision 0.28
then dies at import on ``register_fake("torchvision::nms")`` because the ``nms`` schema was
never defined. EasyEdit only uses torchvision's pure-Python transforms, so defining the two
schemas (no kernels) before torchvision is imported is enough.

``setup_host_env.sh`` copies this file into the host venv's site-packages as
``_mke_tv_shim.py`` and adds a ``.pth`` line that imports it at interpreter start. It is not
needed where a torchvision matching the installed CPU torch can be installed.
"""

from __future__ import annotations

try:
    import torch
except Exception:  # pragma: no cover - the shim must never break interpreter start
    torch = None  # type: ignore[assignment]

_SCHEMAS: tuple[str, ...] = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# Kept at module level: a torch.library.Library deregisters its definitions when collected.
LIBRARY = None
DEFINED: list[str] = []

if torch is not None:
    try:
        LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    except Exception:
        LIBRARY = None
    if LIBRARY is not None:
        for _schema in _SCHEMAS:
            try:
                LIBRARY.define(_schema)
                DEFINED.append(_schema.split("(", 1)[0])
            except Exception:
                # Already defined (a working torchvision, or the shim loaded twice): keep theirs.
                pass
