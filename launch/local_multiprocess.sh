#!/usr/bin/env bash
# N local processes as N "hosts" over jax.distributed (gloo on CPU): the multi-host code path
# on one machine (bash >= 5.1). Usage: N=2 DEVICES=4 bash launch/local_multiprocess.sh CONFIG [key=value ...]
# When one process fails, the launcher says which and how, stops the others and exits
# non-zero (the others also stop by themselves once JAX's coordination service misses the
# dead one's heartbeats: distributed.heartbeat_timeout_s). Relaunch to resume.
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
left=$N
declare -A reaped=()
while [ "$left" -gt 0 ]; do
  alive=()
  for p in "${pids[@]}"; do
    if [ -z "${reaped[$p]:-}" ]; then alive+=("$p"); fi
  done
  rc=0; wait -n -p done_pid "${alive[@]}" || rc=$?
  reaped[$done_pid]=1
  left=$((left - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    who="?"
    for i in "${!pids[@]}"; do
      if [ "${pids[$i]}" = "$done_pid" ]; then who=$i; fi
    done
    why="exit status $rc"
    if [ "$rc" -eq 134 ]; then
      why="SIGABRT: JAX's coordination service stopped it, a peer died"
    elif [ "$rc" -gt 128 ]; then
      why="killed by signal $((rc - 128))"
    fi
    echo "local_multiprocess: process $who failed ($why); stopping the others; relaunch to resume from the last checkpoint" >&2
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  fi
done
exit $status
