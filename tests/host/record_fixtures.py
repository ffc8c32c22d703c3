"""Record EasyEdit main's own model inputs for fixed requests on the tiny models, for CI.

CI has no EasyEdit, yet the adapters must build inputs exactly as EasyEdit's evaluator does
(``prepare_multimodal_hf_edit``): input ids, labels, attention mask, image tensors. This script,
run inside the host venv, writes what EasyEdit builds for ``easyedit_host.FIXED_REQUESTS`` on
``build_tiny(family)`` to ``tests/fixtures/easyedit_inputs_<family>.json``;
``tests/host/test_recorded_easyedit_inputs.py`` compares the adapters with those files anywhere.

Usage (from the repository root):
    EASYEDIT_SRC=/path/to/easyedit PYTHONPATH=/path/to/easyedit \\
        .venv-host/bin/python tests/host/record_fixtures.py [--commit 14cea82] [FAMILY ...]
Re-record after changing FIXED_REQUESTS, the tiny builder or the pinned EasyEdit commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from easyedit_host import FAMILIES, easyedit_unavailable_reason, fixture_path, record_easyedit_inputs  # noqa: E402


def easyedit_commit(src: str) -> str:
    """The checkout's commit when it is a git work tree, else 'unknown' (archives carry none)."""
    try:
        out = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key per line but flat lists (ids, masks, tokens) on a single line: readable diffs."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {dumps(v, indent + 1)}' for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        if all(isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v) for v in value):
            return "[" + ", ".join(json.dumps(v) for v in value) + "]"
        return "[\n" + ",\n".join(f"{pad} {dumps(v, indent + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help=f"default: {' '.join(FAMILIES)}")
    parser.add_argument("--commit", default=None,
                        help="EasyEdit commit to note in the files (default: git rev-parse in EASYEDIT_SRC)")
    args = parser.parse_args(argv)
    reason = easyedit_unavailable_reason()
    if reason:
        print(f"cannot record: {reason}", file=sys.stderr)
        return 2
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    commit = args.commit or easyedit_commit(os.environ["EASYEDIT_SRC"])

    from mke_plugins.testing.tiny import build_tiny

    with tempfile.TemporaryDirectory(prefix="mke-record-") as tmp:
        root = Path(tmp)
        old_cwd = os.getcwd()
        os.chdir(root)  # EasyEdit may write logs/ to the working directory
        try:
            for family in args.families:
                model_dir = Path(build_tiny(family, root / "models"))
                data = record_easyedit_inputs(family, model_dir, root / "images", commit=commit)
                out = fixture_path(family)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(dumps(data) + "\n")
                print(f"{family}: {len(data['requests'])} requests -> {out}")
        finally:
            os.chdir(old_cwd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
