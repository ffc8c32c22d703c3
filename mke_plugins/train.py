"""``mke-plugins train METHOD``: the host side of every method's offline stage.

A method with an offline stage registers ``MethodSpec.offline`` (``run(args: TrainArgs) -> int``)
and, if it truly needs flags of its own, ``MethodSpec.offline_flags``. This command parses the flags
every stage shares once (``--hparams``, ``--model``, ``--data``, ``--format``, ``--image-root``,
``--rephrase-image-root``, ``--out``, ``--device``, ``--seed``, ``--quiet``, and ``--device-map`` /
``--max-memory``, which the host's model loader takes and the stage never sees), adds the stage's own,
and hands the stage a :class:`~mke_hooks.TrainArgs` with the host's services: the hparams loader
(overrides applied, every generator seeded), the model loader
(:func:`~mke_plugins.adapters.loading.load_vlm`), the training records (the bundled world's train
split by default) and the ``MultimodalTrainer`` loop (EasyEdit's, or the testing kit's stand-in). So
the methods never import the world, the testing kit or the EasyEdit bridge, and every stage spells
its flags the same way.

Old spellings kept: ``--model world`` is the bundled world model; ``--model KEY`` for a bundled
training YAML key fails with the new spelling (``--hparams KEY``) in the message.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any

from mke_hooks import HparamsError, MKEError, PluginError, TrainArgs

#: ``dest`` of every flag the host parses for each stage (the rest are the stage's own)
COMMON_FLAGS: tuple[str, ...] = ("hparams", "model", "data", "format", "image_root", "rephrase_image_root", "out",
                                 "device", "seed", "quiet")
#: ``dest`` of the placement flags: the host's model loader takes them; they are not ``TrainArgs`` fields
PLACEMENT_FLAGS: tuple[str, ...] = ("device_map", "max_memory")
#: ``--model`` / ``--data`` values that name the bundled world (model / train split)
WORLD_MODEL_NAMES = ("world", "@world")
WORLD_DATA_NAMES = ("@world-train", "@world")
#: ``--data`` value that names the lifelong world's train split
LIFELONG_TRAIN = "@lifelong-train"
TRAINER_KINDS = ("auto", "easyedit", "standin")


def _registry() -> Any:
    from .registry import get_registry

    return get_registry()


# -- the command -------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``mke-plugins train METHOD ...``; the stage's own parser reads the flags after METHOD."""
    p = subparsers.add_parser("train", help="run a method's offline stage (mke-plugins train METHOD --help)",
                              add_help=False)
    p.add_argument("method", nargs="?")
    p.set_defaults(func=cmd_train, passthrough=True)
    return p


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    """Parse the stage's flags, build its ``TrainArgs`` and run it."""
    if args.method is None or args.method.startswith("-"):
        if {"-h", "--help"} & set(rest + [args.method or ""]):
            print(overview())
            return 0
        raise MKEError(f"name the method: `mke-plugins train METHOD` (`mke-plugins train --help`). {_stages_line()}")
    entry = _registry().get(args.method)
    if entry.spec.offline is None:
        raise MKEError(f"method {args.method!r} has no offline stage to train. {_stages_line()}")
    ns = stage_parser(entry).parse_args(rest)
    return int(entry.spec.resolved("offline")(train_args(entry, ns)) or 0)


def _stages_line() -> str:
    names = [e.name for e in _registry() if e.spec.offline is not None]
    return f"Methods with an offline stage: {', '.join(names) or 'none'}."


def overview() -> str:
    """What ``mke-plugins train --help`` prints: the usage and the methods with a stage."""
    lines = ["usage: mke-plugins train METHOD [--hparams KEY|PATH] [--model DIR] [--data DIR|FILE] [--out PATH] "
             "[--device DEV] [--seed N] [--quiet] [method options]", "",
             "Run a method's offline stage; `mke-plugins train METHOD --help` lists every option.", "",
             "methods with an offline stage:"]
    for e in _registry():
        if e.spec.offline is not None:
            lines.append(f"  {e.name:<8} {e.spec.summary}")
    return "\n".join(lines)


def stage_parser(entry: Any) -> argparse.ArgumentParser:
    """The parser of ``mke-plugins train NAME``: the common flags, then the stage's own."""
    run = entry.spec.resolved("offline")
    p = argparse.ArgumentParser(prog=f"mke-plugins train {entry.name}", description=_description(run, entry),
                                epilog=_defaults_text(run))
    add_common_flags(p.add_argument_group("options of every offline stage"), entry)
    add_flags = entry.spec.resolved("offline_flags")
    if add_flags is not None:
        try:
            add_flags(p.add_argument_group(f"{entry.name} options"))
        except argparse.ArgumentError as exc:
            raise PluginError(f"method {entry.name!r}: offline_flags cannot add its flags: {exc}.",
                              plugin=entry.spec.registered_by,
                              fix=f"rename the flag; the host already defines {_common_flag_names()}.") from exc
    return p


def _common_flag_names() -> str:
    return ", ".join("--" + dest.replace("_", "-") for dest in COMMON_FLAGS + PLACEMENT_FLAGS)


def _description(run: Any, entry: Any) -> str:
    """The first line of the stage module's docstring (else the method's summary), for ``--help``."""
    module = inspect.getmodule(run)
    doc = (module.__doc__ or "").strip() if module is not None else ""
    return (doc.splitlines()[0] if doc else entry.spec.summary).replace("``", "`")


def _defaults_text(run: Any) -> str | None:
    """The stage function's docstring after its first line: where it says its defaults (``--out``, ``--data``)."""
    lines = (inspect.getdoc(run) or "").splitlines()[1:]
    text = "\n".join(lines).strip().replace("``", "`")
    return text or None


def add_common_flags(group: Any, entry: Any) -> None:
    """The flags every offline stage takes, with the method's bundled YAML keys in the help."""
    _, keys = hparams_keys(entry)
    group.add_argument("--hparams", default="world", metavar="KEY|PATH",
                       help=f"training YAML: a bundled key ({', '.join(keys) or 'none'}) or a YAML path "
                            f"(default: world)")
    group.add_argument("--model", default=None, metavar="DIR",
                       help="model folder, a saved Hugging Face VLM ('world': the bundled world model; "
                            "default: the YAML's model_name, the bundled world model for the world YAML)")
    from .bench.formats import FORMAT_CHOICES

    group.add_argument("--data", default=None, metavar="DIR|FILE",
                       help="training records: a benchmark JSON or a folder with train.json "
                            "('@world-train': the bundled world's train split; default: the stage's)")
    group.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                       help="record format of --data (default auto: detected from the first record)")
    group.add_argument("--image-root", default=None, metavar="DIR",
                       help="image folder of --data, EasyEdit's coco_image (default: the JSON's folder)")
    group.add_argument("--rephrase-image-root", default=None, metavar="DIR",
                       help="folder of image_rephrase paths, EasyEdit's rephrase_image (default: the image folder)")
    group.add_argument("--out", default=None, metavar="PATH",
                       help="where the stage writes its output (default: the stage's, below)")
    group.add_argument("--device", default=None, metavar="DEV",
                       help="cpu, cuda, cuda:1 ... (default: the YAML's device)")
    group.add_argument("--seed", type=int, default=None, metavar="N",
                       help="seed of every generator (default: the YAML's seed)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    from .bench.cli import add_placement_flags

    add_placement_flags(group)


# -- flags -> TrainArgs ------------------------------------------------------------------------
def hparams_keys(entry: Any) -> tuple[Path | None, list[str]]:
    """``(training folder, bundled keys)``: ``hparams/training/`` when the method ships one, else the editing YAMLs."""
    folder = entry.hparams_dir()
    training = folder / "training" if folder is not None else None
    if training is not None and training.is_dir():
        return training, sorted(p.stem for p in training.glob("*.y*ml"))
    return None, entry.hparams_models()


def resolve_hparams(entry: Any, value: str) -> tuple[Path, str | None]:
    """``(YAML path, editing key)``: ``--hparams`` as a path, a training key or (no training folder) an editing key."""
    if value.endswith((".yaml", ".yml")) or Path(value).is_file():
        return Path(value), None
    training, keys = hparams_keys(entry)
    if training is None:
        from .hparams import locate_hparams

        return locate_hparams(entry.name, value), value
    for suffix in (".yaml", ".yml"):
        if (training / f"{value}{suffix}").is_file():
            return training / f"{value}{suffix}", None
    raise HparamsError(f"no bundled {entry.name} training YAML {value!r}.", key="--hparams",
                       fix=f"use one of {keys}, or pass a training YAML path.")


def resolve_model(entry: Any, value: str | None) -> str | None:
    """``--model``: a folder, or ``world``; a bundled YAML key (the old spelling) names ``--hparams``."""
    if value is None:
        return None
    if value in WORLD_MODEL_NAMES:
        from . import world

        return str(world.model_path())
    if Path(value).is_dir():
        return str(Path(value))
    if value in hparams_keys(entry)[1]:
        raise MKEError(f"--model {value}: no model folder there. --model takes a model folder now; to train with "
                       f"the bundled training YAML {value!r}, write `--hparams {value}` (it names its model).")
    raise MKEError(f"--model {value}: no such folder; pass a saved Hugging Face model folder, or 'world' for the "
                   f"bundled world model.")


def _device(value: str | None) -> Any:
    """An int for a bare CUDA index (EasyEdit's convention), else the name."""
    return int(value) if value is not None and value.isdigit() else value


def train_args(entry: Any, ns: argparse.Namespace) -> TrainArgs:
    """The stage's ``TrainArgs``: parsed flags plus the host's loaders bound to them."""
    from .adapters.placement import check_device_map, parse_max_memory

    path, editing_key = resolve_hparams(entry, ns.hparams)
    model = resolve_model(entry, ns.model)
    flags = {k: getattr(ns, k) for k in COMMON_FLAGS}
    flags.update(hparams=str(path), model=model)
    options = {k: v for k, v in vars(ns).items() if k not in COMMON_FLAGS + PLACEMENT_FLAGS}
    overrides, where = _flag_overrides(ns, model)
    device_map, max_memory = check_device_map(ns.device_map), parse_max_memory(ns.max_memory)
    if max_memory is not None and device_map is None:
        raise MKEError("--max-memory only applies with --device-map (e.g. --device-map auto --max-memory 0=20GiB)")
    return TrainArgs(
        method=entry.name, options=options, **flags,
        load_hparams=lambda cls, **extra: load_stage_hparams(entry, cls, path, editing_key, overrides, where, extra),
        load_model=lambda hparams: load_model(hparams, what=f"--model {ns.model}" if model else
                                              f"model_name in {path}", device_map=device_map,
                                              max_memory=max_memory),
        load_records=functools.partial(load_records, fmt=ns.format, rephrase_image_root=ns.rephrase_image_root),
        make_trainer=make_trainer)


def _flag_overrides(ns: argparse.Namespace, model: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """``(hparams key -> value, hparams key -> the flag that set it)`` for --model, --device, --seed, --device-map.

    ``--device-map`` sets EasyEdit's ``model_parallel`` where the training class has it: the trainer
    then takes its device from the model and never moves the spread model onto one device.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if model is not None:
        for key in ("model_name", "name"):
            values[key], where[key] = model, f"--model {ns.model}"
    if ns.device is not None:
        values["device"], where["device"] = _device(ns.device), f"--device {ns.device}"
    if ns.seed is not None:
        values["seed"], where["seed"] = ns.seed, f"--seed {ns.seed}"
    if getattr(ns, "device_map", None) is not None:
        values["model_parallel"], where["model_parallel"] = True, f"--device-map {ns.device_map}"
    return values, where


def load_stage_hparams(entry: Any, cls: type, path: Path, editing_key: str | None, overrides: dict[str, Any],
                       where: dict[str, str], extra: dict[str, Any]) -> Any:
    """``cls`` from ``path`` with the flags' and the stage's overrides; seeds every generator with its seed.

    An editing YAML (a method without a training folder) goes through ``mke_adjust_hparams`` as
    ``load_hparams`` does; a training YAML does not (its class is not the method's ``hparams_cls``).
    """
    from .adapters.loading import seed_all
    from .hparams import override_error, read_yaml

    config = read_yaml(path)
    if editing_key is not None:
        _registry().call_hook("mke_adjust_hparams", method=entry.name, model=editing_key, config=config)
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(config)
    given = {k: v for k, v in overrides.items() if k in names or k not in ("model_name", "name", "model_parallel")}
    config.update(given)
    config.update(extra)
    try:
        hparams = cls.from_config(config, path=str(path))
    except HparamsError as exc:
        if exc.key in extra:
            raise override_error(exc, extra[exc.key], f"mke-plugins train {entry.name}") from None
        if exc.key in given:
            raise override_error(exc, given[exc.key], f"mke-plugins train {entry.name} {where[exc.key]}") from None
        raise
    seed = getattr(hparams, "seed", None)
    if seed is not None:
        seed_all(int(seed))
    return hparams


# -- the services ------------------------------------------------------------------------------
def load_model(hparams: Any, *, what: str = "", device_map: str | None = None,
               max_memory: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` of ``hparams.model_name`` on ``hparams.device`` in ``hparams.dtype``.

    With ``device_map`` (``--device-map``) spread over this node's GPUs instead, capped by ``max_memory``.
    """
    from .adapters.loading import load_vlm

    return load_vlm(str(hparams.model_name), hparams.device, hparams.dtype, what=what, device_map=device_map,
                    max_memory=max_memory)


def training_json(data: str) -> Path:
    """The records file of ``--data``: the file itself, or a folder's ``train.json`` (else its only JSON)."""
    path = Path(data)
    if path.is_dir() and (path / "train.json").is_file():
        return path / "train.json"
    if path.is_dir():
        from .bench.data import find_json

        return find_json(path)
    if not path.is_file():
        raise MKEError(f"--data {data}: no such file or folder; pass an MMEdit-format JSON, a folder with "
                       f"train.json, or '@world-train'")
    return path


def load_records(data: str | None, *, adapter: Any, image_root: str | None = None, fmt: str = "auto",
                 rephrase_image_root: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """``(records, label)``: the world's train split (``data`` None / ``@world-train``) or a benchmark file.

    ``fmt`` is a :mod:`mke_plugins.bench.formats` name (``auto``: detected). In the world's format,
    records without ``src``, ``alt`` or ``image`` are skipped, as EasyEdit's VQADataset skips
    them; the benchmark formats skip what their own loaders skip and reject malformed records.
    Images become the family-native objects ``adapter`` expects.
    """
    if data is None or data in WORLD_DATA_NAMES:
        from . import world

        return world.records("train"), f"world:seed{world.DEFAULT_SEED}"
    if data == LIFELONG_TRAIN:
        from . import world

        return (world.records("train", world.data_dir(layout="lifelong")),
                f"world:lifelong-seed{world.DEFAULT_SEED}")
    from .bench.data import with_images
    from .bench.formats import load_dataset, read_json

    path = training_json(data)
    try:
        raw = read_json(path)
    except MKEError as exc:
        raise MKEError(f"--data {exc}") from None
    if fmt in ("auto", "world"):  # the world's reader: incomplete records are training noise, not errors
        complete = [r for r in raw if isinstance(r, dict) and r.get("src") and r.get("alt") and r.get("image")]
        raw = complete or raw
    try:
        ds = load_dataset(path, raw, fmt=fmt, image_root=image_root, rephrase_image_root=rephrase_image_root)
        return with_images(ds.requests, adapter, ds), str(path)
    except MKEError as exc:
        raise MKEError(f"--data {exc}") from None


def make_trainer(kind: str, config: Any, train_set: Any, val_set: Any, *, model: Any, alg_class: type,
                 seed: int | None = None) -> tuple[Any, str]:
    """``(loop, kind)``: EasyEdit's ``MultimodalTrainer`` or the testing kit's stand-in over ``alg_class``.

    ``auto`` picks EasyEdit when it is importable. EasyEdit's trainer loads its own copy of the
    model from ``config``; the stand-in drives ``model``.
    """
    from .easyedit import easyedit_importable, install

    if kind not in TRAINER_KINDS:
        raise MKEError(f"--trainer must be one of {', '.join(TRAINER_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = "easyedit" if easyedit_importable() else "standin"
    if kind == "easyedit":
        if not easyedit_importable():
            raise MKEError("--trainer easyedit needs EasyEdit (easyeditor) importable; put its checkout on "
                           "PYTHONPATH or use --trainer standin.")
        install()
        from easyeditor.trainer.MultimodalTrainer import MultimodalTrainer  # type: ignore

        return MultimodalTrainer(config, train_set, val_set), kind
    from .testing.standin_trainer import StandInMultimodalTrainer

    return StandInMultimodalTrainer(config, train_set, val_set, model=model, alg_class=alg_class, seed=seed), kind

