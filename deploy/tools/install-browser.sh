#!/usr/bin/env bash
# Debian's headless Chromium + chromedriver for the web UI's browser tests (tests/test_preference_ui.py).
# Never downloads a browser from anywhere but the system's apt sources. Where apt cannot be used
# (not root, no passwordless sudo, no apt-get) it says so and exits 0: the browser tests then skip.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-browser: no apt-get here; browser tests will skip (install chromium + chromedriver yourself)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install-browser: apt needs root; browser tests will skip (run: sudo apt-get install chromium chromium-driver)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q >/dev/null
"${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
