#!/usr/bin/env bash
# Set up .venv if needed, then open the notebooks in JupyterLab (extra arguments go to it,
# e.g. --port 8890). Set `interactive = True` in a notebook's parameters cell for its explorers.
set -euo pipefail
WORKBENCH_EXTRAS=${WORKBENCH_EXTRAS:-notebooks} source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec jupyter lab notebooks/ "$@"
