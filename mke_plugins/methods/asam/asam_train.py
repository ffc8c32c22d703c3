"""``mke-plugins train ASAM``: ASAM's offline helper, ρ tuning (README, "ρ tuning") and the memory bank.

``lar_eps`` is chosen once per model as the largest value of {0.02, 0.05, 0.1, 0.2} whose mean
coherence on training-split edits is at least 0.9: coherence is the share of LAR variants on
which the unedited model's top-1 first answer token is still its answer on the clean anchor. The
variants scored here are the *first* variant set of each edit (PGD against the new answer at
step 1, where the patch has V = 0, i.e. the unedited model), the one set that exists before any
training. Training-split edits are the ``memory_data`` records read as edits (``src`` +
``image`` -> ``alt``). The command also builds the memory bank and, with ``--cache DIR`` (or a
``memory_cache`` in the YAML), stores it on disk so edits later load it. ``--hparams`` names
ASAM's editing YAML (ASAM ships no training YAMLs); ``--model DIR`` another model folder.

Nothing here writes the YAML: the chosen ρ is printed (and written to ``--out``); put it in
your hparams file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from mke_hooks import TrainArgs

from .asam_hparams import EPS_GRID, ASAMHyperParams


def training_edits(hparams: ASAMHyperParams, adapter: Any, n: int) -> list[Any]:
    """Up to ``n`` training-split edits as Queries (``src`` + ``image`` -> ``alt``), in file order."""
    from mke_plugins.adapters import Query
    from mke_plugins.adapters.images import image_for_family

    from .memory import records_file

    path = records_file(hparams.memory_data)
    records = json.loads(path.read_text())
    root = Path(hparams.coco_image) if hparams.coco_image and path.name != "train.json" else path.parent
    out = []
    for rec in records:
        if len(out) >= n:
            break
        if not (isinstance(rec, dict) and rec.get("src") and rec.get("alt") and rec.get("image")):
            continue
        img = Path(rec["image"]) if Path(rec["image"]).is_absolute() else root / rec["image"]
        out.append(Query(image_for_family(adapter, img), str(rec["src"]), str(rec["alt"])))
    if not out:
        raise ValueError(f"{path}: no records with src, alt and image to tune lar_eps on")
    return out


def coherence_table(model: Any, tok: Any, adapter: Any, hparams: ASAMHyperParams, edits: Sequence[Any],
                    grid: Sequence[float] = EPS_GRID) -> dict[float, float]:
    """Mean first-set coherence per ρ over ``edits`` (unedited model)."""
    from mke_plugins.core.modes import frozen

    from . import lar as lar_mod
    from .loop import edit_generator
    from .patch import GATE

    K = int(hparams.lar_variants)
    table: dict[float, list[float]] = {float(r): [] for r in grid}
    with frozen(model):
        for q in edits:
            batch1 = adapter.batch(model, tok, [q])
            batch_k = adapter.batch(model, tok, [q] * K)
            p = lar_mod.first_answer_position(batch1)
            anchor = lar_mod.anchor_info(model, adapter, batch1, hparams.lar_masks)
            with torch.no_grad():
                clean_top1 = int(adapter.forward(model, batch1)[0, p].argmax())
            for rho in table:
                gen = edit_generator(hparams, q)
                step = (hparams.lar_step_size if hparams.lar_step_size is not None
                        else 2.5 * rho / max(1, int(hparams.lar_steps)))
                delta = lar_mod.pgd(model, adapter, batch_k, anchor, rho=rho, steps=int(hparams.lar_steps),
                                    alpha=float(step), gen=gen, gate=GATE, objective=hparams.lar_objective,
                                    mode=hparams.lar_mode,
                                    old_labels=None if hparams.lar_objective == "untargeted" else
                                    lar_mod.pre_edit_labels(adapter.forward(model, batch1).detach(), batch1)
                                    .expand(K, -1).contiguous())
                table[rho].append(lar_mod.coherence(model, adapter, batch_k, delta, clean_top1, p))
    return {r: sum(v) / len(v) for r, v in table.items()}


def choose_eps(table: dict[float, float], floor: float = 0.9) -> float | None:
    """The largest ρ with mean coherence ≥ ``floor`` (None if none qualifies)."""
    ok = [r for r, c in table.items() if c >= floor]
    return max(ok) if ok else None


def add_arguments(group: Any) -> None:
    """ASAM's own flags of ``mke-plugins train ASAM`` (``MethodSpec.offline_flags``)."""
    group.add_argument("--n", type=int, default=32, help="training-split edits to score (default 32)")
    group.add_argument("--cache", default=None, help="store the memory bank on disk in this folder")
    group.add_argument("--json", default=None, metavar="PATH", help="old spelling of --out")


def run(args: TrainArgs) -> int:
    """``mke-plugins train ASAM`` (``MethodSpec.offline``): score the rho grid, build the memory bank.

    Defaults: --hparams world (ASAM's editing YAML); --out none (the table is printed; with --out it
    is written there as JSON with the choice and the memory bank's fingerprint).
    """
    from mke_plugins.adapters import get_adapter, resolve_layers

    cache = args.options.get("cache")
    hparams = args.load_hparams(ASAMHyperParams, **({"memory_cache": cache} if cache else {}))
    model, tok = args.load_model(hparams)
    adapter = get_adapter(model, hparams)
    edits = training_edits(hparams, adapter, int(args.options.get("n", 32)))
    table = coherence_table(model, tok, adapter, hparams, edits)
    best = choose_eps(table)
    for rho, c in table.items():
        print(f"lar_eps {rho:<5} mean coherence {c:.3f}{'  <- chosen' if rho == best else ''}")
    print(f"chosen lar_eps: {best if best is not None else 'none reaches 0.9; use the smallest, 0.02'} "
          f"(YAML has {hparams.lar_eps})")
    out: dict[str, Any] = {"table": table, "chosen": best, "n_edits": len(edits)}
    if float(hparams.lambda_mem) > 0:
        from .memory import get_bank

        layers = resolve_layers(hparams.edit_layers, len(adapter.layers(model)), key="edit_layers")
        bank, fp, source = get_bank(model, tok, adapter, hparams, layers)
        print(f"memory bank {fp}: {source}, {[int(v.shape[0]) for v in bank.values()]} states per layer"
              + (f", cached in {hparams.memory_cache}" if hparams.memory_cache else ""))
        out["memory_bank"] = {"fingerprint": fp, "states": {str(k): int(v.shape[0]) for k, v in bank.items()}}
    path = args.out or args.options.get("json")
    if path:
        Path(path).write_text(json.dumps(out, indent=1))
        print(f"wrote {path}")
    return 0
