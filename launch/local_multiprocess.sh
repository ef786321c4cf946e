#!/usr/bin/env bash
# N local processes as N "hosts" over jax.distributed (gloo on CPU): the multi-host code path
# on one machine. Usage: N=2 DEVICES=4 bash launch/local_multiprocess.sh CONFIG [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2}; DEVICES=${DEVICES:-4}; PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for i in $(seq 0 $((N - 1))); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    .venv/bin/jaxllm train "$@" train.progress=false distributed.coordinator="127.0.0.1:$PORT" \
    distributed.num_processes="$N" distributed.process_id="$i" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
