#!/usr/bin/env bash
# Set up .venv if needed, then regenerate every figure (and CPU data) by running the notebooks
# with their default parameters. Without arguments the executed notebooks are stored back in
# notebooks/ too, so that each notebook's outputs and the figures it wrote come from one run.
# Extra arguments go to `python -m workbench figures` instead (e.g. --only 02, --profile smoke).
set -euo pipefail
WORKBENCH_EXTRAS=${WORKBENCH_EXTRAS:-notebooks} source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if [ "$#" -eq 0 ]; then
    set -- --save-outputs
fi
python -m workbench figures "$@"
