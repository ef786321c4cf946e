#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize() finds its peers
# from the TPU metadata. Not run in this repository's CI (no TPU).
# Usage: TPU=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh CONFIG [key=value ...]
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
CMD="cd ~/jaxllm && bash launch/setup.sh && .venv/bin/pip install -q 'jax[tpu]' && .venv/bin/jaxllm train $*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$CMD"
