#!/bin/bash
# The same run through XPK (github.com/AI-Hypercomputer/xpk) on an existing GKE TPU cluster: XPK builds the
# image from this directory and starts one pod per host; train.py joins from the pods' TPU variables.
#
#   CLUSTER=my-cluster PROJECT=my-project ZONE=us-east5-a BUCKET=my-bucket bash launch/xpk.sh
#
# Use --num-slices=N for a multislice run (the mesh's data axis then spans the slices over DCN).
set -euo pipefail
: "${CLUSTER:?}" "${PROJECT:?}" "${ZONE:?}"
CONFIG=${CONFIG:-configs/qwen2_5_omni_7b.py}
WORKDIR=${WORKDIR:-/tmp/gcs/omni7b}  # a gcsfuse mount of $BUCKET inside the pods, or a Filestore path
xpk workload create --cluster "$CLUSTER" --project "$PROJECT" --zone "$ZONE" \
  --workload "omni-jax-$(date +%H%M%S)" --tpu-type=v5p-128 --num-slices=1 \
  --base-docker-image=python:3.11 --script-dir "$(cd "$(dirname "$0")/.." && pwd)" \
  --command "pip install -e '.[tpu]' && python train.py --config $CONFIG --workdir $WORKDIR $*"
