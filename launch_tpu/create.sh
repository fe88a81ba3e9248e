#!/usr/bin/env bash
# Creates a TPU VM (a single host or a pod slice: every worker gets the same software image).
#
#   launch_tpu/create.sh --name=vlmsel --zone=us-central2-b --accelerator=v4-32 [--spot]
#       [--version=tpu-ubuntu2204-base] [--project=P] [--dry_run]
usage() { sed -n '2,6p' "$0"; }
source "$(dirname "$0")/common.sh"
parse_flags "accelerator version spot" "$@"
require accelerator
gcloud_location
cmd=(gcloud compute tpus tpu-vm create "${FLAG_name}" "${LOCATION[@]}"
     --accelerator-type="${FLAG_accelerator}" --version="$(flag version tpu-ubuntu2204-base)")
if [[ -n "${FLAG_spot:-}" ]]; then cmd+=(--spot); fi
run "${cmd[@]}"
