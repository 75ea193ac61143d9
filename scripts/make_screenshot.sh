#!/usr/bin/env bash
# Render the demo trajectory report (real agent-loop episodes, see tests/test_inspect.py) and
# screenshot it with headless chromium into docs/inspect_screenshot.png, the README's picture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_chromium.sh
"${STEPPO_VENV:-.venv}/bin/python" - <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "tests")  # the demo reuses the tests' scripted server and search tool
from test_inspect import make_screenshot

print(f"wrote {make_screenshot(Path('docs/inspect_screenshot.png'))}")
PY
