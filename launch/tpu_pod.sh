#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU VM pod. jax.distributed
# auto-detects the pod (coordinator, process count and id) on each worker.
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [train flags...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b --config=experiments/shakespeare_gpt.py \
#       --workdir=gs://my-bucket/gpt --config.backend=spmd --config.pipeline.ranks=4
# The repo must already be on every worker at ~/hkpipe (e.g. git clone via the same ssh command)
# and installed there (pip install -e ~/hkpipe).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [train flags...]" >&2
  exit 2
fi
name=$1; zone=$2; shift 2
printf -v flags '%q ' "$@"
exec gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
  --command="cd ~/hkpipe && python launch/train.py $flags"
