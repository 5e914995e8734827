#!/bin/bash
# Training on a multi-host Cloud TPU VM (e.g. v5p-64): the same command on every worker.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config=configs/4b_256.py --workdir=gs://bucket/runs/4b_256
#
# Each worker runs one process over its local chips; jax.distributed.initialize() auto-detects the pod (GceTpuCluster
# reads the worker list from the TPU metadata). Several slices (multislice): a "slice" is a TPU slice and
# config.parallel.dcn_* gives the across-slice split (usually dcn_data=-1). The workdir must be shared (gs://).
# The code is copied with `scp --worker=all`; install once per VM with
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "pip install -e ~/terdit-jax 'jax[tpu]'"
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
SRC=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$SRC" "$TPU":~/terdit-jax --zone "$ZONE" --worker=all
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/terdit-jax && python -m terdit_jax.main --mode=train $ARGS 2>&1 | tee -a ~/terdit_train.log"
