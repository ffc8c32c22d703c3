"""Shared helpers for the EasyEdit host check (``tests/host``) and ``tests/fixtures/make_fixtures.py``.

The host check runs EasyEdit main's own ``MultimodalEditor`` on tiny local models, so it needs
an EasyEdit checkout (``EASYEDIT_SRC``) and an interpreter in which ``import easyeditor`` works
(``tests/host/setup_host_env.sh`` builds one). This module says whether that is the case, and
makes the data EasyEdit reads: 56x56 PIL-drawn JPEGs and MMEdit VQA records
(``hooks/EASYEDIT-NOTES.md``, "MMEdit datasets" and "Host check").
It imports no torch, transformers or easyeditor at import time, so CI without EasyEdit can
collect the host tests cheaply and skip them.
"""

from __future__ import annotations

import importlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the HF families the host check covers, as ``build_tiny`` names them
FAMILIES: tuple[str, ...] = ("qwen2-vl", "llava-onevision", "qwen3-vl")

#: the example third-party plugin's method (examples/mke-hello)
HELLO_METHOD = "HelloFT"

#: HelloFT settings for the random tiny models: its world defaults (lr 5e-3, 40 steps) need all 40
#: steps there; these reach every target token in a few steps and keep the host check fast
HELLO_TINY_OVERRIDES: dict[str, object] = {"lr": 2e-2, "max_steps": 25}

#: one line, so each skipped host test prints one line (README.md, 'Contributing' > 'Host tests', says how)
SETUP_HINT = "host check not set up: see README.md, 'Contributing', 'Host tests'."

#: the three metric keys every request yields, plus the two locality keys when their inputs are given
METRIC_KEYS: tuple[str, ...] = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc",
                                "multimodal_locality_acc")

#: fixed requests recorded by ``tests/fixtures/make_fixtures.py`` and compared in CI:
#: (image seed or None for a text-only query, prompt, target)
FIXED_REQUESTS: tuple[tuple[int | None, str, str], ...] = (
    (0, "What is in the picture?", "a red circle"),
    (3, "Which city is shown?", "Paris"),
    (None, "The capital of Italy is", "Rome"),
)


@lru_cache(maxsize=1)
def easyedit_unavailable_reason() -> str | None:
    """None when the host check can run here, else why not (with the setup hint)."""
    src = os.environ.get("EASYEDIT_SRC", "").strip()
    if not src:
        return "EASYEDIT_SRC is not set; " + SETUP_HINT
    root = Path(src)
    if not (root / "easyeditor" / "__init__.py").is_file():
        return f"EASYEDIT_SRC={src} is not an EasyEdit checkout (no easyeditor/__init__.py); " + SETUP_HINT
    try:
        mod = importlib.import_module("easyeditor")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not set up"
        return (f"`import easyeditor` fails in this interpreter: {type(exc).__name__}: {exc}\n"
                "(put EASYEDIT_SRC on PYTHONPATH and use the host venv); " + SETUP_HINT)
    origin = Path(getattr(mod, "__file__", "") or "").resolve()
    if root.resolve() not in origin.parents:
        return (f"`easyeditor` is imported from {origin}, not from EASYEDIT_SRC={src}; "
                f"set PYTHONPATH={src}; " + SETUP_HINT)
    return None


def write_images(folder: Path, count: int = 6) -> list[str]:
    """``count`` distinct 56x56 PIL-drawn JPEGs in ``folder``; returns their file names."""
    from mke_plugins.testing.images import make_image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img{i}.jpg"
        make_image(seed=i, size=56).save(folder / name, format="JPEG", quality=95)
        names.append(name)
    return names


def mmedit_records(count: int = 3) -> list[dict[str, str]]:
    """MMEdit E-VQA records over the images of :func:`write_images`.

    Fields as in ``hooks/EASYEDIT-NOTES.md``, "MMEdit datasets".
    """
    subjects = [("a red circle", "a blue moon"), ("a green square", "a yellow star"),
                ("a cat", "a small dog"), ("a tree", "a tall tower")]
    records = []
    for i in range(count):
        pred, alt = subjects[i % len(subjects)]
        records.append({
            "src": "What is in the picture?" if i % 2 == 0 else "What does this image show?",
            "rephrase": "Describe the object in the image." if i % 2 == 0 else "Name the thing in this photo.",
            "pred": pred,
            "alt": alt,
            "image": f"img{i}.jpg",
            "image_rephrase": f"img{i + 1}.jpg",
            "loc": "The capital of France is",
            "loc_ans": "Paris",
            "m_loc": f"img{(i + 2) % 6}.jpg",
            "m_loc_q": "What color is the background?",
            "m_loc_a": "green",
        })
    return records


def write_vqa_file(folder: Path, count: int = 3) -> Path:
    """Images plus a VQA JSON file of ``count`` records in ``folder``; returns the JSON path."""
    write_images(folder)
    path = folder / "vqa.json"
    path.write_text(json.dumps(mmedit_records(count), indent=1))
    return path


def editor_inputs(records: list[dict[str, str]], image_dir: Path) -> dict[str, Any]:
    """Keyword arguments for ``MultimodalEditor.edit`` built from MMEdit records (image paths)."""
    img = [str(image_dir / r["image"]) for r in records]
    return {
        "prompts": [r["src"] for r in records],
        "targets": [r["alt"] for r in records],
        "image": img,
        "rephrase_prompts": [r["rephrase"] for r in records],
        "rephrase_image": [str(image_dir / r["image_rephrase"]) for r in records],
        "locality_inputs": {
            "text": {"prompt": [r["loc"] for r in records], "ground_truth": [r["loc_ans"] for r in records]},
            "vision": {"image": [str(image_dir / r["m_loc"]) for r in records],
                       "prompt": [r["m_loc_q"] for r in records],
                       "ground_truth": [r["m_loc_a"] for r in records]},
        },
    }


def pick_hparams_model(models: list[str], family: str) -> str:
    """The bundled hparams file of a method to start from for ``family``'s tiny model.

    Prefers ``tiny-<family>``, then ``<family>``, then any name containing the family key (with
    or without punctuation), then ``tiny``, then ``world``, then the first one: the host check
    overrides ``model_name``, ``name``, ``device``, ``dtype`` and the image roots anyway.
    """
    if not models:
        raise LookupError("the method bundles no hparams YAML; add hparams/tiny-<family>.yaml to it")
    squash = family.replace("-", "").replace("_", "").replace(".", "")
    for want in (f"tiny-{family}", family):
        if want in models:
            return want
    for m in models:
        if squash in m.replace("-", "").replace("_", "").replace(".", "").lower():
            return m
    for want in ("tiny", "world"):
        if want in models:
            return want
    return models[0]


def state_snapshot(model: Any) -> dict[str, Any]:
    """Everything restore must give back: tensors (cloned), dtype, device, grad flags, modes, hooks."""
    params = {n: (p.detach().clone(), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (b.detach().clone(), b.dtype, b.device) for n, b in model.named_buffers()}
    modules = {n: (type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                   len(m._backward_hooks)) for n, m in model.named_modules()}
    return {"params": params, "buffers": buffers, "modules": modules}


def snapshot_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`state_snapshot` results (empty when identical)."""
    import torch

    diffs = []
    for kind in ("params", "buffers", "modules"):
        b, a = before[kind], after[kind]
        if set(b) != set(a):
            diffs.append(f"{kind} names differ: added {sorted(set(a) - set(b))[:5]}, "
                         f"removed {sorted(set(b) - set(a))[:5]}")
            continue
        for name in b:
            if kind == "modules":
                if b[name] != a[name]:
                    diffs.append(f"module {name!r}: (type, training, hooks) {b[name]} -> {a[name]}")
                continue
            tb, ta = b[name][0], a[name][0]
            if b[name][1:] != a[name][1:]:
                diffs.append(f"{kind[:-1]} {name!r}: (dtype, device, requires_grad) {b[name][1:]} -> {a[name][1:]}")
            elif not torch.equal(tb, ta):
                diffs.append(f"{kind[:-1]} {name!r}: values changed (max |diff| "
                             f"{(tb.float() - ta.float()).abs().max().item():.3g})")
    return diffs


def tensor_record(value: Any) -> dict[str, Any]:
    """JSON form of one processor output: integer tensors in full, float tensors by shape and sums."""
    import torch

    if not torch.is_tensor(value):
        return {"value": value}
    if value.dtype.is_floating_point:
        v = value.detach().double()
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                "sum": float(v.sum()), "sum_sq": float((v * v).sum())}
    return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
            "values": value.tolist()}


# -- recorded EasyEdit inputs (tests/fixtures/make_fixtures.py writes them, CI compares the adapters with them) --

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"


def fixture_path(family: str) -> Path:
    return FIXTURES_DIR / f"easyedit_inputs_{family}.json"


def vocab_sha256(tokenizer: Any) -> str:
    """A fingerprint of the tokenizer's vocabulary: equal fingerprints mean comparable token ids."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def native_image_for_ci(family: str, seed: int) -> Any:
    """The image object EasyEdit's editor hands a method for the recorded request image ``seed``.

    The recorder saves ``make_image(seed)`` losslessly (PNG) and runs EasyEdit's own ``vis_tok`` on
    the file; it checks that the result has exactly these pixels, so CI can rebuild it without
    EasyEdit: a list of one PIL image for Qwen families, a bare PIL image for LLaVA-OneVision.
    """
    from mke_plugins.testing.images import make_image

    image = make_image(seed=seed, size=56)
    return image if family == "llava-onevision" else [image]


def record_easyedit_inputs(family: str, model_dir: Path, work: Path, commit: str = "unknown") -> dict[str, Any]:
    """EasyEdit's own inputs for :data:`FIXED_REQUESTS` on a tiny model (needs easyeditor)."""
    import types

    import numpy as np
    import tokenizers
    import torch
    import transformers
    from easyeditor.dataset.processor.llavaov_processors import LLaVAOneVisionProcessor
    from easyeditor.dataset.processor.qwen2vl_processors import Qwen2VLProcessor
    from easyeditor.evaluate.multimodal_evaluate import prepare_multimodal_hf_edit
    from transformers import AutoProcessor

    from mke_plugins.testing.images import make_image

    work.mkdir(parents=True, exist_ok=True)
    proc = AutoProcessor.from_pretrained(str(model_dir))
    vis_tok = LLaVAOneVisionProcessor() if family == "llava-onevision" else Qwen2VLProcessor()
    hparams = types.SimpleNamespace(model_name=str(model_dir), device="cpu", dtype=torch.float32,
                                    exact_match=False)
    rows = []
    for seed, prompt, target in FIXED_REQUESTS:
        if seed is None:
            image, file_type = None, "text"
        else:
            path = work / f"request{seed}.png"
            make_image(seed=seed, size=56).save(path, format="PNG")
            image, file_type = vis_tok(str(path), file_type="image"), "image"
            rebuilt = native_image_for_ci(family, seed)
            got = image if isinstance(image, list) else [image]
            want = rebuilt if isinstance(rebuilt, list) else [rebuilt]
            if isinstance(image, list) != isinstance(rebuilt, list):
                raise AssertionError(f"{family}: EasyEdit's vis_tok gave {type(image).__name__}, "
                                     f"native_image_for_ci gives {type(rebuilt).__name__}")
            if len(got) != len(want) or any(not np.array_equal(np.asarray(g.convert('RGB')), np.asarray(w))
                                            for g, w in zip(got, want, strict=True)):
                raise AssertionError(f"{family}: EasyEdit's vis_tok changed the pixels of request image {seed}; "
                                     "native_image_for_ci cannot rebuild it")
        out = prepare_multimodal_hf_edit(hparams, proc, target, prompt, image, file_type)
        inputs = out["multimodal_inputs"]
        rows.append({
            "image_seed": seed, "prompt": prompt, "target": target, "file_type": file_type,
            "inputs": {k: tensor_record(v) for k, v in inputs.items()},
            "labels": out["labels"].tolist(),
            "tokens": proc.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist()),
        })
    return {
        "family": family,
        "what": "EasyEdit main's prepare_multimodal_hf_edit output for FIXED_REQUESTS on build_tiny(family); "
                "written by tests/fixtures/make_fixtures.py, compared with the adapters by "
                "tests/test_adapters_easyedit.py",
        "easyedit_commit": commit,
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "torch": torch.__version__},
        "tokenizer_vocab_sha256": vocab_sha256(proc.tokenizer),
        "requests": rows,
    }
