#!/usr/bin/env bash
# Install everything the tests need (see scripts/install.sh) and run the CPU test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k protocol`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec "${STEPPO_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider "$@"
