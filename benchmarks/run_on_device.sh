#!/usr/bin/env bash
# One run of benchmarks/accelerator.py on a lent device machine (an NVIDIA H200 here).
#
# The device image has JAX (CUDA), flax, optax, orbax, OpenCV and Pillow, but not grain,
# array-record, ml-collections, clu, simplejpeg, portpicker or ftfy, and nothing can be
# fetched there; TensorFlow is not needed (accelerator.py runs without it). So:
#
# 1. Here, once, in the repository root (wheels for the device's Python 3.12):
#      echo /.whl/ >> .git/info/exclude && bash benchmarks/run_on_device.sh download
# 2. The device `run` tool, with carry [".whl"] and timeout_s 600:
#      bash benchmarks/run_on_device.sh [accelerator.py flags, e.g. --models=clip,albef,vlc]
#    It installs the wheels into /tmp/site, runs the benchmark under an 8-minute bound
#    and leaves accelerator.json and accelerator.log under $OUT (copied back).
set -euo pipefail

WHEEL_DIR=${WHEEL_DIR:-.whl}
# The versions requirements.txt pins, and portpicker (grain's) and wcwidth (ftfy's): all
# that the device image lacks (5 MB of wheels).
WHEELS=(
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 clu==0.0.12
  simplejpeg==1.9.0 portpicker==1.6.0 ftfy==6.3.1 wcwidth==0.7.0
)

if [[ "${1:-}" == "download" ]]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$WHEEL_DIR" "${WHEELS[@]}"
  du -sh "$WHEEL_DIR"
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHEEL_DIR"/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/accelerator_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
date -u
# 8 minutes for the benchmark: the rest of the 10-minute call is install and copy-back.
timeout 480 python3 benchmarks/accelerator.py --out="$OUT/accelerator.json" "$@" 2>&1 |
  tee "$OUT/accelerator.log"
