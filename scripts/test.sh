#!/usr/bin/env bash
# Set up .venv if needed, then lint and run the whole test suite: unit/property tests and every
# notebook under nbval. Extra arguments go to pytest (e.g. -m "not slow", -k dilated).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export MPLBACKEND=Agg
ruff check workbench tests
python -m pytest "$@"
