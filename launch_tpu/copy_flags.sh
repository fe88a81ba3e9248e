#!/usr/bin/env bash
# Copies flagfiles to every worker (into ~/<remote_dir>/configs/, where --flagfile=configs/...
# finds them).
#
#   launch_tpu/copy_flags.sh --name=vlmsel --zone=us-central2-b --files=a.flags,b.flags
#       [--remote_dir=vlmsel_jax] [--project=P] [--dry_run]
usage() { sed -n '2,7p' "$0"; }
source "$(dirname "$0")/common.sh"
parse_flags "files remote_dir" "$@"
require files
gcloud_location
IFS=',' read -r -a files <<< "${FLAG_files}"
if (( ! DRY_RUN )); then
  for f in "${files[@]}"; do [[ -f "${f}" ]] || die "flagfile ${f} not found"; done
fi
run gcloud compute tpus tpu-vm scp "${files[@]}" \
    "${FLAG_name}:~/$(flag remote_dir vlmsel_jax)/configs/" "${LOCATION[@]}" --worker=all
