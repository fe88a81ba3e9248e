#!/usr/bin/env bash
# Runs one command on every worker at once, in ~/<remote_dir>: a binary of this package, e.g.
#
#   launch_tpu/run.sh --name=vlmsel --zone=us-central2-b \
#       --command='python3 -m vlmsel_jax.score --flagfile=configs/pod.flags'
#       [--remote_dir=vlmsel_jax] [--project=P] [--dry_run]
#
# On a TPU VM pod slice JAX finds the coordinator, process count and process id by itself
# (vlmsel_jax.runtime.parallel.initialize), so the same command runs unchanged on every worker.
usage() { sed -n '2,9p' "$0"; }
source "$(dirname "$0")/common.sh"
parse_flags "command remote_dir" "$@"
require command
gcloud_location
run gcloud compute tpus tpu-vm ssh "${FLAG_name}" "${LOCATION[@]}" --worker=all \
    --command="cd ~/$(flag remote_dir vlmsel_jax) && ${FLAG_command}"
