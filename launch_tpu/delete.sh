#!/usr/bin/env bash
# Deletes the TPU VM (all workers; billing stops).
#
#   launch_tpu/delete.sh --name=vlmsel --zone=us-central2-b [--project=P] [--dry_run]
usage() { sed -n '2,4p' "$0"; }
source "$(dirname "$0")/common.sh"
parse_flags "" "$@"
gcloud_location
run gcloud compute tpus tpu-vm delete "${FLAG_name}" "${LOCATION[@]}" --quiet
