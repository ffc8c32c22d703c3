"""``TrainArgs``: what ``mke-plugins train METHOD`` hands a method's offline stage.

Every offline stage (LDKE's classifier, UniKE's bank and encoders, ASAM's rho tuning, a
third-party method's own) takes the same inputs: a training YAML, a model, training data, an
output path, a device and a seed. The host parses those flags once, so every stage spells them
the same way and ``mke-plugins train METHOD --help`` shows them all, and it provides what a stage
needs but must not import itself: the model loader, the training records (the bundled world's
train split by default) and a ``MultimodalTrainer``-style loop (EasyEdit's own, or the testing
kit's stand-in when EasyEdit is absent). Plain data and callables: importing this module imports
nothing heavy, so a plugin can type its stage without importing the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import MKEError


def _not_provided(name: str) -> Callable[..., Any]:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise MKEError(f"TrainArgs.{name} was not provided: run the stage through `mke-plugins train METHOD`, "
                       f"or pass {name}= when you build TrainArgs yourself.")
    return missing


@dataclass
class TrainArgs:
    """The parsed ``mke-plugins train METHOD`` flags plus the host's services for the stage.

    Flags (``None`` where not given):
        method: the method's registered name.
        hparams: path of the YAML to train with (``--hparams KEY|PATH`` resolved: the method's
            ``hparams/training/KEY.yaml``, or its editing ``hparams/KEY.yaml`` when it ships no
            training folder).
        model: ``--model DIR``, the model folder (``None``: the YAML's ``model_name``).
        data: ``--data DIR|FILE``, MMEdit-format training records (``None``: the stage's default,
            usually the bundled world's train split).
        format: ``--format``, the record format of ``data`` (``auto``: detected; see ``mke-plugins
            bench --help``).
        image_root: ``--image-root DIR``, the image folder of ``data`` (default: its folder).
        rephrase_image_root: ``--rephrase-image-root DIR``, the folder of ``image_rephrase`` paths
            (default: ``image_root``).
        out: ``--out PATH``, where the stage writes its artefact (``None``: the stage's default).
        device: ``--device``, overrides the YAML's ``device``.
        seed: ``--seed``, overrides the YAML's ``seed``.
        quiet: ``--quiet``, no progress bars.
        options: the stage's own flags (declared by ``MethodSpec.offline_flags``), by ``dest``.

    Services (set by the host):
        load_hparams: ``load_hparams(cls, **overrides) -> hparams``: ``cls`` built from ``hparams``
            with ``--model`` (``model_name``, ``name``), ``--device``, ``--seed`` and ``overrides``
            applied (an error names the flag); seeds Python, NumPy and torch with the result's seed.
        load_model: ``load_model(hparams) -> (model, processor)``: the Hugging Face VLM saved in
            ``hparams.model_name``, on ``hparams.device`` in ``hparams.dtype``, eval mode (with
            ``--device-map auto`` spread over the node's GPUs instead; tensors a stage creates
            should then follow the parameter they belong to, not ``hparams.device``).
        load_records: ``load_records(data, *, adapter, image_root=None) -> (records, label)``:
            EasyEdit-style request dicts with family-native images; ``data`` ``None`` or
            ``"@world-train"`` is the bundled world's train split, else a benchmark JSON (or a
            folder with ``train.json``) read in ``--format`` with ``--rephrase-image-root``.
            ``label`` names the data set (for archive metadata).
        make_trainer: ``make_trainer(kind, config, train_set, val_set, *, model, alg_class, seed)
            -> (loop, kind)``: EasyEdit's ``MultimodalTrainer`` (``kind="easyedit"``) or the testing
            kit's stand-in (``"standin"``); ``"auto"`` picks EasyEdit when it is importable. The
            returned kind is the one built.
    """

    method: str
    hparams: str
    model: str | None = None
    data: str | None = None
    format: str = "auto"
    image_root: str | None = None
    rephrase_image_root: str | None = None
    out: str | None = None
    device: str | None = None
    seed: int | None = None
    quiet: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    load_hparams: Callable[..., Any] = field(default_factory=lambda: _not_provided("load_hparams"), repr=False)
    load_model: Callable[..., tuple[Any, Any]] = field(default_factory=lambda: _not_provided("load_model"),
                                                       repr=False)
    load_records: Callable[..., tuple[list[dict[str, Any]], str]] = field(
        default_factory=lambda: _not_provided("load_records"), repr=False)
    make_trainer: Callable[..., tuple[Any, str]] = field(default_factory=lambda: _not_provided("make_trainer"),
                                                         repr=False)

    @property
    def progress(self) -> bool:
        """Whether to show progress bars (not ``--quiet``)."""
        return not self.quiet
