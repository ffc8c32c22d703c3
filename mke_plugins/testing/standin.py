"""A STAND-IN for EasyEdit's registries and editor calling protocol, for CI without EasyEdit.

This is not EasyEdit. It reproduces, from EasyEdit main (commit 14cea82), only what the
bridge and the conformance kit need: the registry objects the bridge mutates
(``alg_dict.ALG_MULTIMODAL_DICT``, ``MULTIMODAL_EDIT_ALGS``, ``ALG_DICT``;
``alg_train_dict.ALG_TRAIN_DICT``, ``MULTIMODAL_TRAIN_ALGS``; the restore sets of
``editors/utils.py``), the restore path ``restore_after_edit``, and the way
``MultimodalEditor`` calls an apply function in its three modes (keywords, ``copy=False``,
``return_orig_weights=True``, a bare dict plus ``train_ds=None`` in sequential mode). The real
host is checked by ``tests/host`` when ``EASYEDIT_SRC`` is set; a host test compares this
module's layout with EasyEdit's.

Metrics here are the ``rewrite_acc`` token accuracy only, computed through the family adapter;
pre is measured before the edit (EasyEdit's single ``edit()`` measures it after).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

from mke_plugins.easyedit import HostModules

_EASYEDIT_MULTIMODAL = ("MEND", "SERAC", "SERAC_MULTI", "IKE", "LoRA", "WISE", "GRACE")
_EASYEDIT_TEXT = ("ROME", "MEMIT", "MEMIT-FE", "FT", "DINM", "KN", "MEND", "SERAC", "IKE", "FT-Api", "QLoRA",
                  "LoRA", "DPO", "GRACE", "PMET", "MELO", "WISE", "R-ROME", "EMMET", "EAMET", "AlphaEdit",
                  "SPHERE", "ULTRAEDIT", "CORE", "DeepEdit-Api", "SimIE", "DEFER")  # EasyEdit main's ALG_DICT


def _easyedit_builtin(name: str) -> Callable[..., Any]:
    def apply(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"stand-in host: EasyEdit's own {name} is not available here")
    return apply


def new_host() -> HostModules:
    """Fresh stand-in registry modules laid out like EasyEdit main's."""
    alg_dict = types.ModuleType("standin.easyeditor.util.alg_dict")
    alg_dict.ALG_MULTIMODAL_DICT = {n: _easyedit_builtin(n) for n in _EASYEDIT_MULTIMODAL}
    alg_dict.MULTIMODAL_EDIT_ALGS = set(_EASYEDIT_MULTIMODAL)
    alg_dict.ALG_DICT = {n: _easyedit_builtin(n) for n in _EASYEDIT_TEXT}
    alg_dict.MULTIMODAL_DS_DICT = {"caption": object, "vqa": object}
    alg_train_dict = types.ModuleType("standin.easyeditor.util.alg_train_dict")
    alg_train_dict.ALG_TRAIN_DICT = {"MEND": object, "SERAC": object, "SERAC_MULTI": object,
                                     "MALMEN": object}
    alg_train_dict.MULTIMODAL_TRAIN_ALGS = {"MEND", "SERAC", "SERAC_MULTI"}
    utils = types.ModuleType("standin.easyeditor.editors.utils")
    utils.CALLABLE_RESTORE_ALGS = {"KN", "GRACE", "WISE", "DEFER"}
    utils.PEFT_RESTORE_ALGS = {"LoRA", "QLoRA", "DPO"}
    utils.KEEP_EDITED_MODEL_ALGS = {"MELO"}
    return HostModules(alg_dict, alg_train_dict, utils, label="stand-in host")


def restore_after_edit(host: HostModules, editor: "StandInEditor", edited_model: Any,
                       weights_copy: Any) -> None:
    """EasyEdit main's ``restore_after_edit`` decision table (``editors/utils.py``)."""
    alg = editor.hparams.alg_name
    u = host.editor_utils
    if alg in u.CALLABLE_RESTORE_ALGS:
        weights_copy()
        return
    if alg in u.PEFT_RESTORE_ALGS:
        editor.model = edited_model.unload()
        return
    if alg in u.KEEP_EDITED_MODEL_ALGS:
        editor.model = edited_model
        return
    if weights_copy is None:
        return
    with torch.no_grad():
        for name, value in weights_copy.items():
            param = editor.model.get_parameter(name)
            param.copy_(value.to(device=param.device, dtype=param.dtype))


class StandInEditor:
    """Calls an injected apply function the way EasyEdit main's ``MultimodalEditor`` does."""

    def __init__(self, host: HostModules, hparams: Any, model: Any, tok: Any) -> None:
        self.host, self.hparams, self.model, self.tok = host, hparams, model, tok
        self.apply_algo = host.alg_dict.ALG_MULTIMODAL_DICT[hparams.alg_name]
        hparams.batch_size = 1

    def _rewrite_acc(self, model: Any, request: dict) -> float:
        from mke_plugins.adapters import Query, get_adapter

        adapter = get_adapter(self.model, self.hparams)
        batch = adapter.batch(self.model, self.tok, [Query(request["image"], request["prompt"],
                                                           request["target"])])
        with torch.no_grad():
            logits = adapter.forward(model, batch)
        return float(adapter.token_accuracy(logits, batch)[0])

    def edit(self, requests: list[dict], sequential_edit: bool = False) -> list[dict]:
        metrics = []
        if sequential_edit:
            pre = [self._rewrite_acc(self.model, r) for r in requests]
            for i, r in enumerate(requests):
                edited, _ = self.apply_algo(self.model, self.tok, r, self.hparams, copy=False,
                                            return_orig_weights=True, keep_original_weight=False,
                                            train_ds=None)
                metrics.append({"case_id": i, "pre": {"rewrite_acc": pre[i]},
                                "post": {"rewrite_acc": self._rewrite_acc(edited, r)}})
            return metrics
        for i, r in enumerate(requests):
            pre = self._rewrite_acc(self.model, r)
            edited, weights_copy = self.apply_algo(self.model, self.tok, [r], self.hparams,
                                                   copy=False, return_orig_weights=True,
                                                   keep_original_weight=False)
            post = self._rewrite_acc(edited, r)
            restore_after_edit(self.host, self, edited, weights_copy)
            metrics.append({"case_id": i, "pre": {"rewrite_acc": pre},
                            "post": {"rewrite_acc": post}, "weights_copy": weights_copy})
        return metrics
