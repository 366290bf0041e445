#!/usr/bin/env bash
# Starts N local training processes (see launch/local.py for flags):
#   launch/local.sh 2 --pin -- --config=experiments/shakespeare_gpt.py:cpu --workdir=workdirs/mp \
#       --config.backend=mpmd --config.pipeline.ranks=2
set -euo pipefail
cd "$(dirname "$0")/.."
exec python launch/local.py "$@"
