#!/usr/bin/env bash
# Start N jaxasr training processes on this machine, joined by jax.distributed through a local
# coordinator (process 0 hosts it). This is what the multi-process tests run.
#
# Usage:
#   launch/local.sh N CONFIG WORKDIR [--config.key=value ...]
#
# Example: 2 processes, 4 simulated CPU devices each (8 in all):
#   JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
#     launch/local.sh 2 configs/demo.py runs/demo2 --config.train.steps=100
# Example: one process per GPU of a 4-GPU machine:
#   JAXASR_GPU_PER_PROCESS=1 launch/local.sh 4 configs/demo.py runs/demo4
#
# Every process gets JAXASR_COORDINATOR=127.0.0.1:PORT, JAXASR_NUM_PROCESSES=N, JAXASR_PROCESS_ID=i
# (read by jaxasr.parallel.distributed) and trains `python -m jaxasr.train --config CONFIG
# --workdir WORKDIR [overrides]`. All processes share WORKDIR: process 0 writes metrics.jsonl,
# summary.json and TensorBoard logs; Orbax writes checkpoints from all of them.
# Output: process i appends to WORKDIR/logs/process_i.log; process 0's log is also shown here.
# WORKDIR/logs/pids lists "i pid" per process.
#
# Environment: PYTHON (default: python), JAXASR_PORT (default: a free port),
# JAXASR_GPU_PER_PROCESS=1 sets CUDA_VISIBLE_DEVICES=i for process i (one GPU each).
# Exit status: 0 if all processes succeeded, else the status of the first one that failed. If a
# process dies, the others stop on their own within distributed.heartbeat_timeout seconds
# (jax.distributed notices the missing heartbeats); Ctrl-C / SIGTERM is passed on to all of them
# (SIGTERM makes the trainer save a checkpoint and exit).
set -uo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: N must be a positive integer, got '$N'" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
PORT=${JAXASR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$WORKDIR/logs"
: > "$WORKDIR/logs/pids"

touch "$WORKDIR/logs/process_0.log"
shown=$(($(wc -c < "$WORKDIR/logs/process_0.log") + 1))  # show this run's part of process 0's log
pids=()
for ((i = 0; i < N; i++)); do
  log="$WORKDIR/logs/process_$i.log"
  gpu_env=()
  if [[ ${JAXASR_GPU_PER_PROCESS:-0} == 1 ]]; then gpu_env=(CUDA_VISIBLE_DEVICES=$i); fi
  env "${gpu_env[@]}" JAXASR_COORDINATOR="127.0.0.1:$PORT" JAXASR_NUM_PROCESSES="$N" JAXASR_PROCESS_ID="$i" \
    PYTHONUNBUFFERED=1 "$PYTHON" -m jaxasr.train --config "$CONFIG" --workdir "$WORKDIR" "$@" >> "$log" 2>&1 &
  pids+=($!)
  echo "$i $!" >> "$WORKDIR/logs/pids"
done
echo "local.sh: $N processes (coordinator 127.0.0.1:$PORT), logs in $WORKDIR/logs/" >&2

tail -c "+$shown" -f "$WORKDIR/logs/process_0.log" --pid="${pids[0]}" &
tailer=$!

forward() {
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
remaining=$N
declare -A done_pids=()
while ((remaining > 0)); do
  running=()
  for pid in "${pids[@]}"; do [[ -z ${done_pids[$pid]:-} ]] && running+=("$pid"); done
  wait -n -p finished "${running[@]}"
  rc=$?
  [[ -z ${finished:-} ]] && continue  # woken by a signal: keep waiting for the processes
  [[ -n ${done_pids[$finished]:-} ]] && continue
  done_pids[$finished]=1
  remaining=$((remaining - 1))
  for ((i = 0; i < N; i++)); do
    if [[ ${pids[$i]} == "$finished" && $rc != 0 ]]; then
      echo "local.sh: process $i (pid $finished) exited with status $rc; see $WORKDIR/logs/process_$i.log" >&2
      ((status == 0)) && status=$rc
    fi
  done
  unset finished
done
wait "$tailer" 2>/dev/null
exit "$status"
