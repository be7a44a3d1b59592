#!/usr/bin/env bash
# The end-to-end test drives Debian's chromium with Playwright (no browser download): install the package when
# it is missing.
set -euo pipefail
if command -v chromium >/dev/null || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is needed by the browser test: run 'sudo apt-get install chromium'" >&2
  exit 1
fi
echo "installing chromium (Debian package) for the browser test" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
