#!/usr/bin/env bash
# The project's whole test run: install with the dev extras, lint, type-check, test.
# Tests that need root, network namespaces or eBPF skip with a reason when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
python3 -m ruff check src tests benchmarks
python3 -m ruff format --check src tests benchmarks
python3 -m mypy
# The code that runs on Windows, type-checked as Windows sees it (the lab and the TUN device are Linux-only).
python3 -m mypy --platform win32 --exclude 'awg_split_tunnel/(lab|platform/linux)/'
python3 -m pytest "$@"
