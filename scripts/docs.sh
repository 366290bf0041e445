#!/usr/bin/env bash
# Builds the docs site (docs/*.md + the API reference from the docstrings) into site/, strictly:
# any warning fails the build. `--serve` serves it on http://127.0.0.1:8000 instead, rebuilding
# on edits; other arguments go to mkdocs. Needs `pip install -e ".[test]"` (mkdocs, mkdocstrings).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--serve" ]]; then
  shift
  exec python -m mkdocs serve --strict "$@"
fi
exec python -m mkdocs build --strict --site-dir site "$@"
