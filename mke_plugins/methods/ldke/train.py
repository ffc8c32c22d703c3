"""``mke-plugins train LDKE``: build an LDKE archive (Disentanglement Classifier, tau, mu).

One implementation, two drivers: the training step is always ``LDKERouterTrainable`` under a
``MultimodalTrainer`` loop: EasyEdit's own (``--trainer easyedit``; needs EasyEdit importable) or
the testing kit's stand-in (``--trainer standin``, the default when EasyEdit is absent). The
front-end builds the training and validation sets (the bundled world's ``train`` split by
default, validation split by entity), runs one epoch at a time (the head's learning rate follows a
cosine decay over the epochs, set on the loop's optimiser between epochs), keeps the head with the
best validation balanced accuracy (ties: the later epoch), calibrates tau on validation and writes
the archive::

    mke-plugins train LDKE --out ldke-world.pt                 # world model, bundled training YAML
    mke-plugins train LDKE --hparams my-train.yaml --out a.pt --trainer easyedit

The bundled world archive is rebuilt, bit for bit on the same machine, with
``mke-plugins train LDKE --out mke_plugins/methods/ldke/archives/world.pt`` (seeded everywhere;
``OMP_NUM_THREADS=1`` for identical float reductions).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from mke_hooks import HparamsError, MKEError

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
DEFAULT_TRAINING_YAML = HPARAMS_DIR / "training" / "world.yaml"

log = logging.getLogger(__name__)


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_model(hp: Any) -> tuple[Any, Any]:
    from mke_plugins import world

    path = Path(str(hp.name or hp.model_name))
    if (path / "world_model.json").exists() or str(path) == str(world.model_path()):
        return world.load(path, device=_device(hp))
    from transformers import AutoModelForImageTextToText

    from mke_plugins.adapters.processors import load_processor

    if not (path / "config.json").is_file():
        raise MKEError(f"hparams.name {str(path)!r}: no Hugging Face model directory there; LAVIS wrappers "
                       f"(blip2, minigpt4) train through EasyEdit's MultimodalTrainer directly (alg: LDKE).")
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=hp.dtype, local_files_only=True)
    return model.to(_device(hp)).eval(), load_processor(path)


def _device(hp: Any) -> str:
    return f"cuda:{hp.device}" if isinstance(hp.device, int) else str(hp.device)


def _loc_prompts(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, str]]:
    out = []
    for r in records:
        if r.get("locality_prompt") and r.get("locality_ground_truth"):
            out.append({"prompt": str(r["locality_prompt"]), "answer": str(r["locality_ground_truth"])})
        if len(out) >= n:
            break
    return out


def _easyedit_trainer(hp: Any, train_set: Any, val_set: Any) -> Any:
    from mke_plugins.easyedit import easyedit_importable, install

    if not easyedit_importable():
        raise MKEError("--trainer easyedit needs EasyEdit (easyeditor) importable; put its checkout on PYTHONPATH "
                       "or use --trainer standin.")
    install()
    from easyeditor.trainer.MultimodalTrainer import MultimodalTrainer  # type: ignore

    trainer = MultimodalTrainer(hp, train_set, val_set)
    base = trainer.model.model
    train_set.bind(base)
    val_set.bind(base)
    return trainer


def _run_epoch(trainer: Any, hp: Any, kind: str, n_train: int) -> None:
    if kind == "easyedit":
        # EasyEdit counts its iteration cap in samples and stops at `>= max_iters` before a step:
        # one run() of exactly one epoch needs max_epochs 1 and max_iters = batches + 1.
        batches = -(-n_train // hp.batch_size)
        trainer.config.max_epochs = 1
        trainer.config.max_iters = batches + 1
    trainer.run()


def train_archive(hp: Any, *, out: str | Path | None = None, trainer: str = "auto", records: Any = None,
                  model: Any = None, tok: Any = None, progress: bool = True) -> dict[str, Any]:
    """Train, select, calibrate; return the archive (and write it to ``out`` when given)."""
    from tqdm.auto import tqdm

    from mke_plugins.adapters import get_adapter
    from mke_plugins.easyedit import easyedit_importable
    from mke_plugins.testing.standin_trainer import StandInMultimodalTrainer

    from .data import LDKERoutingDataset, routing_records, split_by_entity
    from .router import save_archive
    from .trainable import LDKERouterTrainable

    kind = trainer if trainer != "auto" else ("easyedit" if easyedit_importable() else "standin")
    if kind not in ("easyedit", "standin"):
        raise MKEError(f"--trainer must be auto, easyedit or standin, got {trainer!r}")
    _seed(hp.seed)
    if model is None:
        model, tok = _load_model(hp)
    if records is None:
        from mke_plugins import world

        records = world.records("train")
    train_recs, val_recs = split_by_entity(records, hp.val_fraction, hp.seed)
    adapter = get_adapter(model, hp)
    hard = hp.hard_negatives
    train_set = LDKERoutingDataset(routing_records(train_recs, hard_negatives=hard, seed=hp.seed), adapter, model, tok,
                                   neg_per_pos=hp.neg_per_pos, hard_negative_fraction=hp.hard_negative_fraction,
                                   seed=hp.seed)
    val_set = LDKERoutingDataset(routing_records(val_recs, hard_negatives=True, seed=hp.seed + 1), adapter, model,
                                 tok, neg_per_pos=hp.neg_per_pos, hard_negative_fraction=hp.hard_negative_fraction,
                                 seed=hp.seed + 1)
    epochs = int(hp.max_epochs)
    run_hp = copy.deepcopy(hp)
    run_hp.max_epochs = 1
    t0 = time.perf_counter()
    if kind == "easyedit":
        driver = _easyedit_trainer(run_hp, train_set, val_set)
    else:
        driver = StandInMultimodalTrainer(run_hp, train_set, val_set, model=model, alg_class=LDKERouterTrainable,
                                          seed=hp.seed)
    trainable = driver.model
    trainable.tok = tok
    best: tuple[float, int, dict[str, Any]] | None = None
    history = []
    bar = tqdm(range(epochs), desc="LDKE router", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        for group in driver.opt.param_groups:  # cosine decay over the epochs (the loops have no scheduler)
            group["lr"] = hp.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        _run_epoch(driver, run_hp, kind, len(train_set))
        result = trainable.routing_validation(val_set.records)
        history.append({"epoch": epoch + 1, **result})
        bar.set_postfix(bacc=f"{result['balanced_accuracy']:.3f}", mu=trainable.mu_count)
        if best is None or result["balanced_accuracy"] >= best[0]:  # ties: the later, more converged head
            best = (result["balanced_accuracy"], epoch + 1,
                    {k: v.detach().clone() for k, v in trainable.head.state_dict().items()})
    assert best is not None
    trainable.head.load_state_dict(best[2])
    cal = trainable.calibrate(val_set)
    trainable.loc_prompts = _loc_prompts(train_recs, hp.loc_prompts)
    trainable.meta = {
        "trainer": kind, "epochs": epochs, "best_epoch": best[1], "train_records": len(train_recs),
        "val_records": len(val_recs), "seed": hp.seed, "hard_negatives": hard, "seconds": time.perf_counter() - t0,
        "history": history, "hparams": {k: (str(v) if k == "dtype" else v) for k, v in hp.to_dict().items()
                                        if isinstance(v, (str, int, float, bool, type(None), list))},
    }
    archive = trainable.state_dict()
    if out is not None:
        save_archive(archive, out)
    log.info("LDKE archive: best epoch %d, tau %.2f, validation %s", best[1], cal["tau"], cal)
    return archive


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mke-plugins train LDKE", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None,
                       help="bundled training YAML key, hparams/training/<model>.yaml (default: world)")
    which.add_argument("--hparams", default=None, help="an LDKETrainingHyperParams YAML")
    p.add_argument("--out", default=None, help="where to write the archive (.pt; default ./ldke-<model>.pt)")
    p.add_argument("--trainer", default="auto", choices=("auto", "easyedit", "standin"),
                   help="EasyEdit's MultimodalTrainer or the stand-in loop (auto: EasyEdit when importable)")
    p.add_argument("--seed", type=int, default=None, help="override the YAML's seed")
    p.add_argument("--max-epochs", type=int, default=None, help="override the YAML's max_epochs")
    p.add_argument("--device", default=None, help="override the YAML's device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _yaml_and_out(args: argparse.Namespace) -> tuple[Path, str]:
    """The training YAML (``--hparams``, else the bundled one of ``--model``) and the archive path."""
    if args.hparams is not None:
        path = Path(args.hparams)
        stem = path.stem
    else:
        stem = args.model or "world"
        path = DEFAULT_TRAINING_YAML.parent / f"{stem}.yaml"
        if not path.is_file():
            known = sorted(q.stem for q in DEFAULT_TRAINING_YAML.parent.glob("*.yaml"))
            raise HparamsError(f"no bundled LDKE training YAML for model {stem!r}.", key="--model",
                               fix=f"use one of {known}, or pass --hparams FILE.")
    return path, args.out or f"ldke-{stem}.pt"


def run(argv: Sequence[str]) -> int:
    """Entry point of ``mke-plugins train LDKE`` (``MethodSpec.offline``)."""
    args = build_parser().parse_args(list(argv))
    from mke_plugins.hparams import read_yaml

    from .ldke_hparams import LDKETrainingHyperParams

    yaml_path, out = _yaml_and_out(args)
    config = read_yaml(yaml_path)
    for key, value in (("seed", args.seed), ("max_epochs", args.max_epochs), ("device", args.device)):
        if value is not None:
            config[key] = value
    hp = LDKETrainingHyperParams.from_config(config, path=str(yaml_path))
    archive = train_archive(hp, out=out, trainer=args.trainer, progress=not args.quiet)
    rates = archive["val_rates"]
    print(f"wrote {out}: tau {archive['tau']:.2f}, mu over {archive['mu_count']} edits, "
          f"validation balanced accuracy {rates.get('balanced_accuracy')}, routed positive "
          f"{rates.get('rate/positive')}, hard negative {rates.get('rate/hard_negative')}, easy negative "
          f"{rates.get('rate/easy_negative')} (trainer: {archive['meta']['trainer']})", file=sys.stdout)
    return 0
