#!/usr/bin/env bash
# The project's whole test run: install with the dev extras, lint, type-check, test.
# Tests that need root, network namespaces or eBPF skip with a reason when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
python3 -m ruff check src tests benchmarks
python3 -m ruff format --check src tests benchmarks
python3 -m mypy
# Everything but the lab, type-checked as Windows sees it: Linux-only code says so with sys.platform checks.
python3 -m mypy --platform win32 --exclude 'awg_split_tunnel/lab/'
python3 -m pytest "$@"
