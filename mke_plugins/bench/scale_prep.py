"""How ``mke-plugins scale`` runs each method on a random-init model: step caps and offline stand-ins.

A random-init model has no offline output, and a full edit at 7B on a CPU takes hours, so
``scale`` needs two things per method that the bench does not:

* **A step cap.** :data:`STEP_FIELDS` names the hparams field that caps each method's
  optimisation steps per edit (per stage for DECODE; another plugin's ``max_steps`` if its hparams
  have one); ``--max-steps N`` sets it unless the
  method's own override (``DECODE[max_steps=3]``) does. The uncapped value from the method's YAML
  gives the full step count the estimate scales to.
* **What the offline stage would have made**, built at the model's shapes through the method's
  own code, for timing only (answers on random weights mean nothing anyway):

  - ASAM's offline helper only tunes ``lar_eps`` and builds the memory bank, which an edit builds
    itself from ``memory_data``. Where the YAML's ``memory_data`` does not exist (the 7B YAMLs
    name MMEdit's training split) the bundled world's training split is used, capped at
    :data:`ASAM_BANK_PROMPTS` prompts (the bank enters only the memory loss, an (N x positions)
    x d product per step). The bank is built before the timed edit, as it is once per model.
  - LDKE: an archive whose Disentanglement Classifier head is freshly initialised (seeded),
    never trained, with tau 0.5 and a uniform layer baseline
    (:func:`mke_plugins.methods.ldke.ldke_train.untrained_archive`).
  - UniKE: an archive whose encoders are freshly initialised (seeded), never trained, with a
    knowledge bank extracted from :data:`UNIKE_BANK_QUERIES` training-split queries of the world
    (:func:`mke_plugins.methods.unike.unike_train.untrained_archive`). Retrieval then returns at
    most that many entries, not ``top_k - 1``; mixing K entries costs K x d per position, small
    beside the FFN.

A method with an offline stage not listed in :data:`PREPARERS` (a third-party plugin's) is
refused: nothing here knows what its offline stage makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from mke_hooks import MKEError

#: method -> the hparams field capping its optimisation steps per edit (DECODE: per stage)
STEP_FIELDS = {"DECODE": "max_steps", "ASAM": "max_steps", "LDKE": "edit_steps", "UniKE": "max_edit_steps",
               "FT": "max_steps", "LoRA": "max_steps"}
#: prompts in ASAM's memory bank when its YAML's ``memory_data`` is replaced by the world's
ASAM_BANK_PROMPTS = 16
#: training-split queries whose triplets form the untrained UniKE archive's knowledge bank
UNIKE_BANK_QUERIES = 8


@dataclass
class Prepared:
    """What was built before the timed edit: a sentence for the report and its seconds."""

    note: str
    seconds: float = 0.0


@dataclass
class PrepContext:
    """What a preparer gets: the model, its processor and adapter, a scratch folder, the seed."""

    model: Any
    proc: Any
    adapter: Any
    workdir: Path
    hparams_key: str
    seed: int


def step_field(name: str) -> str | None:
    """``name``'s step-cap field: :data:`STEP_FIELDS`, else ``max_steps`` if its hparams have one."""
    from mke_plugins.registry import get_registry

    if name in STEP_FIELDS:
        return STEP_FIELDS[name]
    cls = get_registry().get(name).spec.resolved("hparams_cls")
    return "max_steps" if any(f.name == "max_steps" for f in fields(cls)) else None


def step_cap(name: str, overrides: dict[str, Any], max_steps: int | None) -> dict[str, Any]:
    """The override capping ``name``'s steps at ``max_steps`` (none if unset, unknown or overridden)."""
    fld = step_field(name)
    if max_steps is None or fld is None or fld in overrides:
        return {}
    return {fld: int(max_steps)}


def _asam(hparams: Any, user: dict[str, Any], ctx: PrepContext) -> Prepared:
    from mke_plugins.adapters import resolve_layers
    from mke_plugins.hparams import resolve_special
    from mke_plugins.methods.asam.memory import get_bank

    if float(hparams.lambda_mem) <= 0:
        return Prepared("lambda_mem 0: no memory bank")
    where = "its memory_data"
    if "memory_data" not in user and not Path(str(hparams.memory_data)).expanduser().exists():
        where = f"the world's training split (the YAML's {Path(str(hparams.memory_data)).name} is absent)"
        hparams.memory_data = resolve_special("@world-data")
        if "memory_size" not in user:
            hparams.memory_size = min(int(hparams.memory_size), ASAM_BANK_PROMPTS)
    layers = resolve_layers(hparams.edit_layers, len(ctx.adapter.layers(ctx.model)), key="edit_layers")
    t0 = time.perf_counter()
    bank, _, source = get_bank(ctx.model, ctx.proc, ctx.adapter, hparams, layers)
    seconds = time.perf_counter() - t0
    states = int(next(iter(bank.values())).shape[0])
    return Prepared(f"memory bank {source} before the timed edit (once per model): {states} states per edited "
                    f"layer from up to {hparams.memory_size} prompts of {where}", seconds)


def _training_hparams(cls: type, name: str, hparams: Any, key: str, skip: tuple[str, ...] = ()) -> Any:
    """``cls`` from the method's bundled training YAML for ``key`` (if any), with every field it shares
    with the editing ``hparams`` taken from those (the archive must match the edit's settings)."""
    from mke_plugins.hparams import read_yaml
    from mke_plugins.registry import get_registry

    folder = get_registry().get(name).hparams_dir()
    path = folder / "training" / f"{key}.yaml" if folder is not None else None
    config = read_yaml(path) if path is not None and path.is_file() else {}
    edit = hparams.to_dict()
    config.update({f.name: edit[f.name] for f in fields(cls) if f.name in edit and f.name not in skip})
    return cls.from_config(config, path=str(path or f"<{name} training defaults>"))


def _ldke(hparams: Any, user: dict[str, Any], ctx: PrepContext) -> Prepared:
    from mke_plugins.methods.ldke.ldke_hparams import LDKETrainingHyperParams
    from mke_plugins.methods.ldke.ldke_train import untrained_archive

    if "classifier_archive" in user:
        return Prepared(f"classifier archive {user['classifier_archive']} as given")
    if not hparams.needs_archive():
        return Prepared("no archive needed (router false, layer_prior none)")
    out = ctx.workdir / "ldke-untrained.pt"
    t0 = time.perf_counter()
    train = _training_hparams(LDKETrainingHyperParams, "LDKE", hparams, ctx.hparams_key)
    untrained_archive(train, model=ctx.model, out=out)
    hparams.classifier_archive = str(out)
    return Prepared("untrained classifier archive (freshly initialised head, seed "
                    f"{train.seed}, tau 0.5, uniform layer baseline): timing does not depend on trained values",
                    time.perf_counter() - t0)


def _unike(hparams: Any, user: dict[str, Any], ctx: PrepContext) -> Prepared:
    from mke_plugins import world
    from mke_plugins.methods.unike.unike_hparams import UniKETrainingHparams
    from mke_plugins.methods.unike.unike_train import triplet_queries, untrained_archive

    if "archive" in user:
        return Prepared(f"archive {user['archive']} as given")
    out = ctx.workdir / "unike-untrained.pt"
    t0 = time.perf_counter()
    train = _training_hparams(UniKETrainingHparams, "UniKE", hparams, ctx.hparams_key, skip=("archive",))
    cands = triplet_queries(world.records("train"), False, int(train.seed), UNIKE_BANK_QUERIES)
    untrained_archive(train, ctx.model, ctx.proc, [q for q, _, _ in cands[:UNIKE_BANK_QUERIES]], out)
    hparams.archive = str(out)
    return Prepared(f"untrained archive (freshly initialised encoders, seed {train.seed}; bank of up to "
                    f"{UNIKE_BANK_QUERIES} world training-split triplets, so retrieval returns at most that many "
                    f"of top_k {hparams.top_k}): timing does not depend on trained values", time.perf_counter() - t0)


#: method -> builds what its offline stage would have made, on the random-init model
PREPARERS: dict[str, Callable[[Any, dict[str, Any], PrepContext], Prepared]] = {
    "ASAM": _asam, "LDKE": _ldke, "UniKE": _unike}


def check_preparable(name: str, label: str) -> None:
    """Refuse a method whose offline stage ``scale`` cannot stand in for."""
    from mke_plugins.registry import get_registry

    if get_registry().get(name).spec.offline is not None and name not in PREPARERS:
        raise MKEError(f"{label}: {name} has an offline stage, and scale knows no untrained stand-in for its "
                       f"output on a random-init model; scale times {sorted(PREPARERS)} and methods without one")


def prepare(name: str, hparams: Any, user: dict[str, Any], ctx: PrepContext) -> Prepared | None:
    """Build ``name``'s offline stand-in (setting the hparams that point at it); None if it needs none."""
    fn = PREPARERS.get(name)
    return fn(hparams, user, ctx) if fn is not None else None
