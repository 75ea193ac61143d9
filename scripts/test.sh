#!/usr/bin/env bash
# Install everything the tests need (see scripts/install.sh; chromium for the report's browser test)
# and run the CPU test suite, including real end-to-end training runs of verl on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k protocol`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install_chromium.sh  # the trajectory report's browser test (Debian's chromium; needs root or sudo)
exec "${STEPPO_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider "$@"
