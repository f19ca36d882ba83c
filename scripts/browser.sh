#!/usr/bin/env bash
# Install Debian's Chromium for the playground's browser test (tests/test_gateway_browser.py)
# when it is missing. Only scripts/test.sh calls this: `niche localnet` never needs a browser.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[browser] no apt-get: install Chromium at /usr/bin/chromium for the browser test" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
echo "[browser] installing chromium from Debian's packages (for the playground test)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends chromium >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends chromium >/dev/null; }
