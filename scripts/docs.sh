#!/usr/bin/env bash
# Set up .venv if needed, then build the docs site into build/docs/html from the committed
# notebooks (never executed), the pages in docs/ and the docstrings. Fails on a broken link or
# cross-reference. `bash scripts/docs.sh --serve [PORT]` then serves it on http://127.0.0.1:PORT
# (default 8000).
set -euo pipefail
WORKBENCH_EXTRAS=${WORKBENCH_EXTRAS:-dev} source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m sphinx -E -q -W --keep-going -b html -c docs . build/docs/html
echo "[docs] built build/docs/html/docs/index.html"
if [ "${1:-}" = "--serve" ]; then
    port=${2:-8000}
    echo "[docs] serving on http://127.0.0.1:$port/ (Ctrl-C stops)"
    exec python -m http.server --bind 127.0.0.1 --directory build/docs/html "$port"
fi
