#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its WebDriver for the review page's browser test
# (tests/test_review_browser.py drives it through Selenium). Idempotent: does nothing when both are
# there. Needs root and apt-get; Playwright's own browser download is not used (it needs internet
# access beyond the package mirrors).
#
#   bash tools/install_browser.sh        # then: LORAFIT_BROWSER_TESTS=1 pytest tests/test_review_browser.py
set -euo pipefail

say() { echo "install_browser: $*" >&2; }

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  say "chromium and chromedriver already installed ($(chromium --version 2>/dev/null || echo '?'))"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { say "error: ${missing[*]} missing and not root; run as root or: sudo apt-get install chromium chromium-driver"; exit 1; }
command -v apt-get >/dev/null || { say "error: ${missing[*]} missing and no apt-get; install Chromium and its chromedriver yourself"; exit 1; }
say "installing ${missing[*]} (apt-get)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
say "installed $(chromium --version 2>/dev/null || echo chromium)"
