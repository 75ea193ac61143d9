#!/usr/bin/env bash
# Install Debian's headless-capable chromium for the trajectory-report browser test
# (tests/test_inspect.py) and scripts/make_screenshot.sh. Idempotent: does nothing when a chromium
# binary is already on PATH. Needs root (or sudo) and access to the Debian package mirrors.
set -euo pipefail
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "chromium present: $(command -v "$name")"
    exit 0
  fi
done
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium installed: $(command -v chromium)"
