"""The bench's EasyEdit-protocol locality columns equal EasyEdit main's own ``MultimodalEditor`` numbers.

``mke-plugins bench`` reports, beside its answer-position locality, EasyEdit's protocol
(``locality_easyedit``: top-1 over every position of the T-Loc row; ``multimodal_locality_easyedit``:
top-10 rank by rank over every position of the M-Loc row). Here the same world edits run through
the bench and through EasyEdit's editor, and the per-case numbers must agree within 1e-4.

EasyEdit's editor is driven so that each case is one single edit measured against the unedited
model: ``edit(sequential_edit=True)`` with one request (it measures pre before the edit; a plain
``edit()`` measures pre on the already-edited model, and ``edit_dataset`` never restores, so its
edits accumulate), then EasyEdit's own ``restore_after_edit``. Each edit is seeded as the bench
seeds it (``seed_all(i)`` for case ``i``), on one CPU thread as the bench runs the world model.
Our FT baseline shares its name with EasyEdit's text-only FT, so ``install()`` leaves it out of
EasyEdit; this test puts it into ``ALG_MULTIMODAL_DICT`` under that name for the run only.
"""

from __future__ import annotations

from typing import Any

import pytest

from world_host import install, value, world_editor, world_inputs

pytestmark = pytest.mark.host

CASES = 3
METHODS = ("FT", "UniKE", "ASAM", "LDKE")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def installed(easyedit: Any) -> Any:
    yield from install("UniKE")


@pytest.fixture(scope="module")
def bench_rows(installed: Any) -> dict[str, list[dict[str, Any]]]:
    """Per-case results of the bench (single mode) for every method of :data:`METHODS`."""
    from mke_plugins.bench import BenchConfig, methods_from, run_bench

    result = run_bench(BenchConfig(methods=methods_from(",".join(METHODS)), cases=CASES, keep_cases=True,
                                   progress=False, generate=False))
    return {name: row["cases"] for name, row in result["methods"].items()}


@pytest.fixture
def in_easyedit(installed: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Makes ``method`` runnable by EasyEdit's ``MultimodalEditor`` (ours, even where EasyEdit has the name)."""
    from easyeditor.util import alg_dict

    import mke_plugins
    from mke_plugins.easyedit import make_apply

    def put(method: str) -> None:
        if method not in installed.injected:
            entry = mke_plugins.get_registry().get(method)
            monkeypatch.setitem(alg_dict.ALG_MULTIMODAL_DICT, method, make_apply(entry))

    return put


def easyedit_rows(method: str) -> list[dict[str, float]]:
    """EasyEdit's ``locality_acc`` / ``multimodal_locality_acc`` per case, one restored single edit each."""
    import torch
    from easyeditor.editors.utils import restore_after_edit

    from mke_plugins import world
    from mke_plugins.adapters.loading import seed_all

    editor = world_editor(method)
    records = world.record_paths("edit")[:CASES]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for i, record in enumerate(records):
            seed_all(i)
            metrics, edited, weights_copy = editor.edit(**world_inputs([record]), sequential_edit=True,
                                                        verbose=False)
            restore_after_edit(editor, edited, weights_copy)
            post = metrics[0]["post"]
            rows.append({"locality_easyedit": value(post["locality_acc"]),
                         "multimodal_locality_easyedit": value(post["multimodal_locality_acc"])})
    finally:
        torch.set_num_threads(threads)
    return rows


@pytest.mark.parametrize("method", METHODS)
def test_bench_easyedit_locality_equals_multimodal_editor(bench_rows: dict[str, list[dict[str, Any]]],
                                                          in_easyedit: Any, method: str) -> None:
    in_easyedit(method)
    ours = bench_rows[method]
    theirs = easyedit_rows(method)
    assert len(ours) == len(theirs) == CASES
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a["rewrite_acc"] > a["pre_rewrite_acc"], f"{method} case {i}: the bench's edit did not take"
        for key in ("locality_easyedit", "multimodal_locality_easyedit"):
            assert a[key] is not None and abs(a[key] - b[key]) <= TOLERANCE, (
                f"{method} case {i}: bench {key} = {a[key]}, EasyEdit's MultimodalEditor = {b[key]}")
