#!/usr/bin/env bash
# The GPU checks and figures, prepared for a lent GPU machine (the `device` tool), which has torch, lightning,
# torchmetrics, pyarrow, pandas and matplotlib but neither Ray, medmnist nor umap-learn, and no internet.
#
# Here, once (builds .devbundle/: Ray, medmnist, umap-learn ~38 MB, and pytest, pure Python):
#   bash ../shared/device/bundle.sh
#   python3 -m pip install -q --no-deps --target .devbundle/pytest pytest pluggy iniconfig packaging pygments
# There, one step per call, carrying [".devbundle"]; figures land in $OUT (times are estimates, never run yet):
#   bash benchmarks/device.sh tests          # tests/test_gpu.py and tests/test_model.py on the GPU   (~1 min)
#   bash benchmarks/device.sh train-speed    # train_speed.py with the GPU rows (batch 1024, 4096, compiled)
#   bash benchmarks/device.sh encode-speed   # encode_speed.py: Ray Data against the plain loop, UMAP, plots
#   bash benchmarks/device.sh packed-sweep   # ray_cost.py --sweep packed: 16 trials x 20 epochs, 4 per GPU
# The data are synthetic files of the official shapes and split sizes for all five sets (the real ones and the
# bundle together exceed what a call can carry): speeds as on the real files; quality figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-}
case "$step" in
  tests|train-speed|encode-speed|packed-sweep) ;;
  *) echo "usage: bash benchmarks/device.sh tests|train-speed|encode-speed|packed-sweep" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/medvq-device}
mkdir -p "$out" /tmp/site
[ -d /tmp/site/ray ] || tar -xJf .devbundle/site.tar.xz -C /tmp/site
export PYTHONPATH="/tmp/site:$PWD/.devbundle/pytest:$PWD:${PYTHONPATH:-}"  # Ray's workers inherit it
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "$step" in
  tests) python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py 2>&1 | tee "$out/tests.log" ;;
  train-speed) python benchmarks/train_speed.py --synthetic --seconds 15 --batch-sizes 1024,4096 --compile \
                 --out "$out/train-speed.json" 2>&1 | tee "$out/train-speed.log" ;;
  encode-speed) python benchmarks/encode_speed.py --synthetic --seconds 15 \
                  --out "$out/encode-speed.json" 2>&1 | tee "$out/encode-speed.log" ;;
  packed-sweep) python benchmarks/ray_cost.py --synthetic --sweep packed --gpus-per-trial 0.25 \
                  --out "$out/packed-sweep.json" 2>&1 | tee "$out/packed-sweep.log" ;;
esac
