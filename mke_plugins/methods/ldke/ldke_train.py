"""``mke-plugins train LDKE``: build an LDKE archive (Disentanglement Classifier, tau, mu).

One implementation, two drivers: the training step is always ``LDKERouterTrainable`` under a
``MultimodalTrainer`` loop the host provides (``TrainArgs.make_trainer``): EasyEdit's own
(``--trainer easyedit``; needs EasyEdit importable) or the testing kit's stand-in (``--trainer
standin``, the default when EasyEdit is absent). The front-end builds the training and validation
sets (the host's training records: the bundled world's ``train`` split unless ``--data``;
validation split by entity), runs one epoch at a time (the head's learning rate follows a cosine
decay over the epochs, set on the loop's optimiser between epochs), keeps the head with the best
validation balanced accuracy (ties: the later epoch), calibrates tau on validation and writes the
archive::

    mke-plugins train LDKE --out ldke-world.pt                 # world model, bundled training YAML
    mke-plugins train LDKE --hparams my-train.yaml --model DIR --out a.pt --trainer easyedit

The bundled world archive is rebuilt, bit for bit on the same machine, with
``mke-plugins train LDKE --out mke_plugins/methods/ldke/archives/world.pt`` (seeded everywhere;
``OMP_NUM_THREADS=1`` for identical float reductions).

:func:`untrained_archive` writes an archive of the right shapes that was never trained, for
timing an edit on a random-init model (``mke-plugins scale``); it routes and localises nothing
meaningful.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mke_hooks import TrainArgs

log = logging.getLogger(__name__)


def _loc_prompts(records: Sequence[dict[str, Any]], hp: Any) -> list[dict[str, str]]:
    """Up to ``hp.loc_prompts`` training-split locality prompts for the archive (none without
    ``locality_negatives``: the router then never sees a record's locality probes)."""
    n = int(hp.loc_prompts) if hp.locality_negatives else 0
    out: list[dict[str, str]] = []
    if n <= 0:
        return out
    for r in records:
        if r.get("locality_prompt") and r.get("locality_ground_truth"):
            out.append({"prompt": str(r["locality_prompt"]), "answer": str(r["locality_ground_truth"])})
        if len(out) >= n:
            break
    return out


def _run_epoch(trainer: Any, hp: Any, kind: str, n_train: int) -> None:
    if kind == "easyedit":
        # EasyEdit counts its iteration cap in samples and stops at `>= max_iters` before a step:
        # one run() of exactly one epoch needs max_epochs 1 and max_iters = batches + 1.
        batches = -(-n_train // hp.batch_size)
        trainer.config.max_epochs = 1
        trainer.config.max_iters = batches + 1
    trainer.run()


def train_archive(hp: Any, *, model: Any, tok: Any, records: Sequence[dict[str, Any]], make_trainer: Callable[..., Any],
                  trainer: str = "auto", out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, select, calibrate; return the archive (and write it to ``out`` when given).

    ``make_trainer`` builds the ``MultimodalTrainer`` loop of kind ``trainer`` (``TrainArgs.make_trainer``;
    ``mke_plugins.train.make_trainer`` outside the command).
    """
    from tqdm.auto import tqdm

    from mke_plugins.adapters import get_adapter
    from mke_plugins.adapters.loading import seed_all

    from .data import LDKERoutingDataset, routing_records, split_by_entity
    from .router import save_archive
    from .trainable import LDKERouterTrainable

    seed_all(hp.seed)
    train_recs, val_recs = split_by_entity(records, hp.val_fraction, hp.seed)
    adapter = get_adapter(model, hp)
    hard = hp.hard_negatives
    loc = hp.locality_negatives
    train_set = LDKERoutingDataset(routing_records(train_recs, hard_negatives=hard, seed=hp.seed,
                                                   locality_negatives=loc), adapter, model, tok,
                                   neg_per_pos=hp.neg_per_pos, hard_negative_fraction=hp.hard_negative_fraction,
                                   seed=hp.seed)
    val_set = LDKERoutingDataset(routing_records(val_recs, hard_negatives=True, seed=hp.seed + 1,
                                                 locality_negatives=loc), adapter, model,
                                 tok, neg_per_pos=hp.neg_per_pos, hard_negative_fraction=hp.hard_negative_fraction,
                                 seed=hp.seed + 1)
    if hp.objective == "pairs":
        return _pairs_archive(hp, model, train_set, val_set, tok=tok, train_recs=train_recs, val_recs=val_recs,
                              out=out, progress=progress)
    epochs = int(hp.max_epochs)
    run_hp = copy.deepcopy(hp)
    run_hp.max_epochs = 1
    t0 = time.perf_counter()
    driver, kind = make_trainer(trainer, run_hp, train_set, val_set, model=model, alg_class=LDKERouterTrainable,
                                seed=hp.seed)
    trainable = driver.model
    train_set.bind(trainable.model)  # EasyEdit's trainer loads its own copy of the model
    val_set.bind(trainable.model)
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
    trainable.loc_prompts = _loc_prompts(train_recs, hp)
    trainable.meta = {
        "trainer": kind, "epochs": epochs, "best_epoch": best[1], "train_records": len(train_recs),
        "val_records": len(val_recs), "seed": hp.seed, "hard_negatives": hard, "seconds": time.perf_counter() - t0,
        "history": history, "hparams": _hparams_meta(hp),
    }
    archive = trainable.state_dict()
    if out is not None:
        save_archive(archive, out)
    log.info("LDKE archive: best epoch %d, tau %.2f, validation %s", best[1], cal["tau"], cal)
    return archive


def _pairs_archive(hp: Any, model: Any, train_set: Any, val_set: Any, *, tok: Any, train_recs: Sequence[dict[str, Any]],
                   val_recs: Sequence[dict[str, Any]], out: str | Path | None, progress: bool) -> dict[str, Any]:
    """``objective: pairs`` (``pairs.py``): no trainer loop; the same trainable's head, mu and archive."""
    from .pairs import train_pairs
    from .router import save_archive
    from .trainable import LDKERouterTrainable

    trainable = LDKERouterTrainable(model, hp)
    trainable.tok = tok
    meta = train_pairs(trainable, train_set.records, val_set.records, hp, progress=progress)
    trainable.loc_prompts = _loc_prompts(train_recs, hp)
    trainable.meta = {**meta, "train_records": len(train_recs), "val_records": len(val_recs), "seed": hp.seed,
                      "hard_negatives": hp.hard_negatives, "hparams": _hparams_meta(hp)}
    archive = trainable.state_dict()
    if out is not None:
        save_archive(archive, out)
    log.info("LDKE archive (pairs): tau %.2f, validation %s", trainable.tau, trainable.val_rates)
    return archive


def _hparams_meta(hp: Any) -> dict[str, Any]:
    return {k: (str(v) if k == "dtype" else v) for k, v in hp.to_dict().items()
            if isinstance(v, (str, int, float, bool, type(None), list))}


def untrained_archive(hp: Any, *, model: Any, out: str | Path) -> dict[str, Any]:
    """An archive at ``model``'s shapes that was never trained, written to ``out``, for timing only.

    The head is the one training starts from (built by ``LDKERouterTrainable``, seeded by
    ``hp.seed``), tau is 0.5 and the layer baseline mu is uniform (1/L per layer: no training edit
    was localised). Routing and layer choice on it mean nothing; what an edit costs (its passes and
    their shapes) does not depend on them. ``meta["untrained"]`` says so.
    """
    import torch

    from .router import save_archive
    from .trainable import LDKERouterTrainable

    trainable = LDKERouterTrainable(model, hp)
    n = trainable.n_layers
    trainable.mu_sum = torch.full((n,), 1.0 / n, dtype=torch.float64)
    trainable.mu_count = 1
    trainable.meta = {"untrained": True, "seed": int(hp.seed),
                      "note": "freshly initialised head, tau 0.5, uniform mu: for timing only"}
    archive = trainable.state_dict()
    save_archive(archive, out)
    return archive


def add_arguments(group: Any) -> None:
    """LDKE's own flags of ``mke-plugins train LDKE`` (``MethodSpec.offline_flags``)."""
    group.add_argument("--trainer", default="auto", choices=("auto", "easyedit", "standin"),
                       help="EasyEdit's MultimodalTrainer or the stand-in loop (auto: EasyEdit when importable)")
    group.add_argument("--max-epochs", type=int, default=None, help="override the YAML's max_epochs")


def run(args: TrainArgs) -> int:
    """``mke-plugins train LDKE`` (``MethodSpec.offline``): train the router, write the archive.

    Defaults: --out ./ldke-<hparams key or YAML name>.pt; --data the bundled world's train split
    (records of an MMEdit file without `entity` are split for validation one by one).
    """
    from mke_plugins.adapters import get_adapter

    from .ldke_hparams import LDKETrainingHyperParams

    epochs = args.options.get("max_epochs")
    hp = args.load_hparams(LDKETrainingHyperParams, **({} if epochs is None else {"max_epochs": epochs}))
    out = args.out or f"ldke-{Path(args.hparams).stem}.pt"
    model, tok = args.load_model(hp)
    records, _ = args.load_records(args.data, adapter=get_adapter(model, hp), image_root=args.image_root)
    archive = train_archive(hp, model=model, tok=tok, records=records, make_trainer=args.make_trainer,
                            trainer=args.options.get("trainer", "auto"), out=out, progress=args.progress)
    rates = archive["val_rates"]
    print(f"wrote {out}: tau {archive['tau']:.2f}, mu over {archive['mu_count']} edits, "
          f"validation balanced accuracy {rates.get('balanced_accuracy')}, routed positive "
          f"{rates.get('rate/positive')}, hard negative {rates.get('rate/hard_negative')}, easy negative "
          f"{rates.get('rate/easy_negative')} (trainer: {archive['meta']['trainer']})", file=sys.stdout)
    return 0
