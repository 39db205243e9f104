#!/bin/bash
# Multi-host Cloud TPU VM slice: the same command on every worker; train.py joins the run from the TPU VM's
# metadata (jax.distributed cluster auto-detection: worker 0 coordinates, one process per host).
#
#   TPU=my-v5p-128 ZONE=us-east5-a bash launch/tpu_vm.sh                         # create once, see below
#   TPU=my-v5p-128 ZONE=us-east5-a WORKDIR=/mnt/shared/omni7b bash launch/tpu_vm.sh --config.train.steps=1000
#
# Create the slice (once) and install the repository on every worker:
#   gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type v5p-128 --version v2-alpha-tpuv5
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
#     "git clone <this repository> omni_jax && cd omni_jax && python3 -m venv .venv && \
#      .venv/bin/pip install -e '.[tpu]'"
# WORKDIR must be shared by the workers (a Filestore/NFS mount, or a bucket mounted with gcsfuse).
# Check first that the step fits: python -m omni_jax.aot --config "$CONFIG" --topology v5p:4x4x4
set -euo pipefail
: "${TPU:?set TPU to the slice name}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-configs/qwen2_5_omni_7b.py}
WORKDIR=${WORKDIR:-/mnt/shared/omni_jax/$TPU}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd omni_jax && .venv/bin/python train.py --config $CONFIG --workdir $WORKDIR$ARGS"
