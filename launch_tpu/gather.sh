#!/usr/bin/env bash
# Copies a result directory from worker 0 (the only process that writes) to this machine.
#
#   launch_tpu/gather.sh --name=vlmsel --zone=us-central2-b --remote=runs/pod --local=runs/
#       [--remote_dir=vlmsel_jax] [--project=P] [--dry_run]
#
# --remote is relative to ~/<remote_dir> on the worker; --local is created if missing.
usage() { sed -n '2,8p' "$0"; }
source "$(dirname "$0")/common.sh"
parse_flags "remote local remote_dir" "$@"
require remote local
gcloud_location
run mkdir -p "${FLAG_local}"
run gcloud compute tpus tpu-vm scp --recurse \
    "${FLAG_name}:~/$(flag remote_dir vlmsel_jax)/${FLAG_remote}" "${FLAG_local}" \
    "${LOCATION[@]}" --worker=0
