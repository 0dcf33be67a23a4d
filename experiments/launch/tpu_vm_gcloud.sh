#!/bin/bash
# Cloud TPU VM without SkyPilot: create a v5p-64 slice (8 hosts), install t5x_lite on every host, and start the
# same train command on all of them at once (--worker=all). jax.distributed finds the hosts by itself.
# Multi-slice: create the slices as one queued resource (`gcloud compute tpus queued-resources create ...
# --node-count 2`); the runtime sets MEGASCALE_* on every host, and make_mesh lays the slices along `data`.
set -euo pipefail
TPU_NAME=${TPU_NAME:-t5x-lite}
ZONE=${ZONE:-us-east5-a}
TYPE=${TYPE:-v5p-64}
VERSION=${VERSION:-v2-alpha-tpuv5}
BUCKET=${BUCKET:-gs://my-bucket}
REPO=${REPO:-https://github.com/OWNER/t5x_lite}   # your fork or mirror

gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  git clone $REPO t5x_lite && cd t5x_lite && pip install -e '.[tpu,gcs]'"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd t5x_lite && TFDS_DATA_DIR=$BUCKET/tensorflow_datasets \
  python -m t5x_lite.train --config configs/c4_span_corruption.py:size=base --workdir $BUCKET/runs/c4_base"
