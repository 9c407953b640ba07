#!/bin/sh
# Browser for the web-page tests (tests/test_web.py): Debian's chromium and Playwright for Python.
# Playwright drives /usr/bin/chromium; `playwright install` is never run (it downloads browsers).
set -eu
PYTHON="${PYTHON:-python3}"
PIP="$PYTHON -m pip"
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi
"$PYTHON" -c "import playwright" 2>/dev/null || $PIP install playwright
