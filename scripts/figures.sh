#!/usr/bin/env bash
# Set up .venv if needed, then regenerate every figure (and CPU data) by running the notebooks
# with their default parameters. Extra arguments go to `python -m workbench figures`.
set -euo pipefail
WORKBENCH_EXTRAS=${WORKBENCH_EXTRAS:-notebooks} source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m workbench figures "$@"
