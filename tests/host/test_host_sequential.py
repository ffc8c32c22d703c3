"""EasyEdit's own sequential editing agrees with the bench's sequential run of the same edits.

``MultimodalEditor.edit(..., sequential_edit=True)`` makes every edit in turn on one model, with
pre measured before the first, and scores each record right after its *own* edit, on the model
holding every edit made so far. ``mke-plugins bench --mode sequential`` scores every record after the
last edit, and reports EasyEdit's protocol beside it (the ``*_at_edit`` keys). Here the first 100
edits of the lifelong world's acceptance sequence run through both, with DECODE (seeded inside each
edit; EasyEdit's requests carry no ``text_only_prompt`` / ``image_only_prompt``, so the bench gets the
same records without them, and both runs make the same edits). The mean rewrite accuracy and EasyEdit-protocol locality
(every position; top-1 for text, top-10 rank by rank for the picture probe) under EasyEdit's
protocol must agree within 0.02. The lifelong world's locality probes come from a pool no edit
touches, so both sides score the same probes.

DECODE's lifelong mode (``route_threshold``) is checked the same way on the first 10 edits: its
edited model is a ``RoutedModel``, which EasyEdit's evaluators must call for the edits to count.

Slow (about 10 minutes on a 2-core CPU): it runs only with the host check.
"""

from __future__ import annotations

from typing import Any

import pytest

from world_host import install, value, world_inputs

pytestmark = pytest.mark.host

METHOD = "DECODE"
EDITS = 100
ROUTED_EDITS = 10  # the lifelong mode's edits run capped here (about 4 s each, twice)
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def installed(easyedit: Any) -> Any:
    yield from install(METHOD)


def test_sequential_edit_agrees_with_the_bench(installed: Any, scratch: Any) -> None:
    _compare(scratch, METHOD, {}, EDITS)


def test_routed_decode_sequential_edit_agrees_with_the_bench(installed: Any, scratch: Any) -> None:
    """DECODE's lifelong mode returns a ``RoutedModel``: EasyEdit's editor must score through it."""
    _compare(scratch, f"{METHOD}[route_threshold=0.8]", {"route_threshold": 0.8}, ROUTED_EDITS)


def _compare(scratch: Any, label: str, overrides: dict[str, Any], edits: int) -> None:
    import json

    import torch
    from easyeditor import MultimodalEditor

    from mke_plugins import world
    from mke_plugins.bench import BenchConfig, methods_from, run_bench
    from mke_plugins.hparams import load_hparams

    data = world.data_dir(layout="lifelong")
    raw = json.loads((data / "edit.json").read_text())[:edits]
    stripped = scratch / "edit.json"  # EasyEdit's editor never passes the unimodal prompts to a method
    stripped.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("text_only_prompt", "image_only_prompt")}
                                    for r in raw]))
    ours = run_bench(BenchConfig(methods=methods_from(label), data=str(stripped), image_root=str(data), cases=edits,
                                 mode="sequential", world="lifelong", hparams="lifelong", progress=False,
                                 generate=False))["methods"][label]

    hp = load_hparams(METHOD, "lifelong", device="cpu", **overrides)
    assert hp.model_name == str(world.model_path("lifelong"))
    editor = MultimodalEditor.from_hparams(hp)
    records = world.record_paths("edit", root=data)[:edits]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics, _, _ = editor.edit(**world_inputs(records), sequential_edit=True, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert len(metrics) == edits

    def mean(key: str) -> float:
        return sum(value(m["post"][key]) for m in metrics) / len(metrics)

    pairs = {"rewrite_acc_at_edit": ("rewrite_acc", mean("rewrite_acc")),
             "locality_easyedit_at_edit": ("locality_acc", mean("locality_acc")),
             "multimodal_locality_easyedit_at_edit": ("multimodal_locality_acc", mean("multimodal_locality_acc"))}
    assert mean("rewrite_acc") > 0.0, "no edit took"
    print({k: (round(ours[k], 4), round(v, 4)) for k, (_, v) in pairs.items()})  # shown with -s
    for ours_key, (theirs_key, theirs) in pairs.items():
        assert abs(ours[ours_key] - theirs) <= TOLERANCE + 1e-9, (
            f"after {edits} sequential {label} edits: bench {ours_key} = {ours[ours_key]:.4f}, "
            f"EasyEdit's MultimodalEditor {theirs_key} = {theirs:.4f}")
