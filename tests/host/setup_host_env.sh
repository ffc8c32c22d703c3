#!/usr/bin/env bash
# Build the host-check venv: EasyEdit main (from a checkout, via PYTHONPATH) + mke-plugins, CPU, offline.
#
# Usage:  bash tests/host/setup_host_env.sh EASYEDIT_SRC [VENV]
#   EASYEDIT_SRC  an EasyEdit main checkout (a directory holding easyeditor/ and requirements.txt).
#                 Never vendor or commit it; e.g. extract one outside the repo with
#                 git -C <EasyEdit clone> archive HEAD | tar -x -C /some/dir
#   VENV          venv to create or update (default: .venv-host in the repository root; ignored by git).
#
# Steps (hooks/EASYEDIT-NOTES.md, "Host check"):
#   1. torch first (a CPU wheel; pip's configured find-links/indexes are used, never a CUDA index);
#   2. EasyEdit's requirements.txt minus its torch pin, with a constraint pinning torch to the installed
#      version, so pip cannot swap in a CUDA torch. Requirements that cannot be installed here are
#      skipped one by one and listed at the end (only what `import easyeditor` and the multimodal
#      editor / trainer / datasets need matters);
#   3. mke-plugins editable, with its test extra, and the example plugin examples/mke-hello (HelloFT);
#   4. the torchvision shim (tests/host/tv_shim.py) copied into site-packages and loaded by a .pth line,
#      so the CUDA-linked PyPI torchvision imports on CPU torch;
#   5. a smoke check: `import easyeditor; from easyeditor import MultimodalEditor`, offline.
#
# Then run the host tests with:
#   EASYEDIT_SRC=$EASYEDIT_SRC PYTHONPATH=$EASYEDIT_SRC $VENV/bin/python -m pytest tests/host
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,22p' "$0"
    exit 2
fi
EASYEDIT_SRC="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${2:-$REPO/.venv-host}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [[ ! -f "$EASYEDIT_SRC/easyeditor/__init__.py" || ! -f "$EASYEDIT_SRC/requirements.txt" ]]; then
    echo "error: $EASYEDIT_SRC is not an EasyEdit checkout (need easyeditor/__init__.py and requirements.txt)" >&2
    exit 2
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

echo "== 1. torch $TORCH_VERSION (CPU)"
"${PIP[@]}" "torch==$TORCH_VERSION"
TV="$("$PY" -c 'import torch; print(torch.__version__)')"
echo "installed torch $TV"

echo "== 2. EasyEdit requirements (torch pinned to $TV)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "torch==$TV" > "$tmp/constraints.txt"
grep -v -E '^\s*(#|$)' "$EASYEDIT_SRC/requirements.txt" | grep -v -E '^torch([=<>!~ ]|$)' > "$tmp/requirements.txt"
skipped=()
if ! "${PIP[@]}" -r "$tmp/requirements.txt" -c "$tmp/constraints.txt"; then
    echo "-- installing all at once failed; retrying requirement by requirement"
    while read -r req; do
        if ! "${PIP[@]}" "$req" -c "$tmp/constraints.txt"; then
            skipped+=("$req")
        fi
    done < "$tmp/requirements.txt"
fi

echo "== 3. mke-plugins (editable) from $REPO, and the example plugin the host tests select"
"${PIP[@]}" -e "$REPO[test]" -c "$tmp/constraints.txt"
if [[ -f "$REPO/examples/mke-hello/pyproject.toml" ]]; then
    "${PIP[@]}" --no-deps -e "$REPO/examples/mke-hello"
fi

echo "== 4. torchvision shim"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$REPO/tests/host/tv_shim.py" "$SITE/_mke_tv_shim.py"
echo "import _mke_tv_shim" > "$SITE/_mke_tv_shim.pth"

echo "== 5. smoke check (offline)"
(cd "$tmp" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$EASYEDIT_SRC" "$PY" -c \
    'import easyeditor, torch, transformers; from easyeditor import MultimodalEditor; print("easyeditor OK: torch", torch.__version__, "transformers", transformers.__version__)')

echo "== done in $(( $(date +%s) - start )) s: $VENV"
if [[ ${#skipped[@]} -gt 0 ]]; then
    echo "skipped requirements (could not be installed here): ${skipped[*]}"
fi
