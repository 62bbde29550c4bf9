#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice (v4-32, v5p-64, ...): one JAX process per TPU VM
# host, all started by one `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the coordinator,
# process count and id from the TPU metadata (distributed.auto=true).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
# Example:
#   PROJECT=my-project launch/tpu_pod.sh my-v5p-64 us-east5-a configs/demo.py /mnt/shared/runs/demo \
#     --config.data.batch_size=256
#
# Requirements on every host: this repository at REPO_DIR (default ~/jaxasr) with jaxasr installed
# (`pip install -e '.[tpu]'` or `pip install -e . 'jax[tpu]'`; set SETUP to a command run first on
# every host, e.g. SETUP='cd ~/jaxasr && git pull'), and CONFIG, WORKDIR and the data on storage
# that all hosts share (a Filestore/NFS mount or a gcsfuse-mounted bucket): every host reads its
# share of the data, process 0 writes logs and metrics, Orbax writes checkpoints from all hosts.
#
# Environment: PROJECT (gcloud --project), REPO_DIR, PYTHON (default python3), SETUP, and
# EXTRA_SSH_FLAGS (e.g. "--internal-ip" or "--tunnel-through-iap").
# Output: every host's log goes to WORKDIR/logs/host_$(hostname).log; gcloud prints all hosts'
# output here as well. Preemption (SIGTERM) makes each process save a checkpoint; rerunning the same
# command resumes from the latest one.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO_DIR=${REPO_DIR:-'~/jaxasr'}
PYTHON=${PYTHON:-python3}

train=$(printf '%q ' "$PYTHON" -m jaxasr.train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.distributed.auto=true "$@")
remote="set -e; ${SETUP:+$SETUP; }cd $REPO_DIR; mkdir -p $(printf '%q' "$WORKDIR")/logs; \
$train 2>&1 | tee $(printf '%q' "$WORKDIR")/logs/host_\$(hostname).log; exit \${PIPESTATUS[0]}"

# shellcheck disable=SC2086
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  ${EXTRA_SSH_FLAGS:-} --command "$remote"
