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
#   bash benchmarks/device.sh default-job    # ray_cost.py --sweep default: the whole job at its defaults, one GPU
# The data are synthetic files of the official shapes and split sizes for all five sets (the real ones and the
# bundle together exceed what a call can carry): speeds as on the real files; quality figures mean nothing.
#
# The long runs on the four real sets (benchmarks/long_runs.py) take two calls back to back, the second inside the
# machine's 30 s warm window: the repo (~30 MB), the bundle and the files exceed one call's 64 MiB. Here, once:
#   bash benchmarks/device.sh prepare-long-runs    # .devbundle/site-lite.tar.xz (no Ray node binaries: a local
#                                                  # run starts no Ray node), .devdata/small/ and .devdata/blood/
# There: `bash benchmarks/device.sh tests` carrying [".devbundle/site-lite.tar.xz", ".devdata/small"], then
# `MINUTES=<budget> bash benchmarks/device.sh long-runs` carrying [".devdata/blood"]. Each row's run comes back as
# ROW.tar.gz, beside long_runs.md and long_runs.csv. The GPU's batch and rate against today's defaults, in the same
# wall time (docs/behaviour.md, "On a GPU"): ROWS=batch-64-width-128,batch-256-width-128,batch-256-lr-2e-3-width-128
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:-}
case "$step" in
  tests|train-speed|encode-speed|packed-sweep|default-job|long-runs|prepare-long-runs) ;;
  *) echo "usage: bash benchmarks/device.sh tests|train-speed|encode-speed|packed-sweep|default-job|long-runs|prepare-long-runs" >&2
     exit 2 ;;
esac
if [ "$step" = prepare-long-runs ]; then  # here, not there
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -xJf .devbundle/site.tar.xz -C "$work"
  rm "$work/ray/core/src/ray/raylet/raylet" "$work/ray/core/src/ray/gcs/gcs_server"
  tar -cJf .devbundle/site-lite.tar.xz -C "$work" .
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.devdata/' "$exclude" || echo '/.devdata/' >> "$exclude"
  mkdir -p .devdata/small .devdata/blood
  data=${MEDVQ_DATA_ROOT:-../shared/medmnist}
  cp "$data"/{pneumoniamnist,retinamnist,breastmnist}.npz .devdata/small/
  cp "$data/bloodmnist.npz" .devdata/blood/
  du -sh .devbundle/site-lite.tar.xz .devdata/*
  exit 0
fi
out=${OUT:-/tmp/medvq-device}
mkdir -p "$out" /tmp/site /tmp/medmnist
if [ ! -d /tmp/site/ray ]; then
  bundle=.devbundle/site.tar.xz
  [ -f "$bundle" ] || bundle=.devbundle/site-lite.tar.xz
  [ -f "$bundle" ] || { echo "no bundle here and none unpacked: the machine was given back; start again" >&2; exit 2; }
  tar -xJf "$bundle" -C /tmp/site
fi
cp .devdata/*/*.npz /tmp/medmnist/ 2>/dev/null || true  # the real files, kept in /tmp while the machine stays warm
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
  default-job) python benchmarks/ray_cost.py --synthetic --sweep default \
                 --out "$out/default-job.json" 2>&1 | tee "$out/default-job.log" ;;
  long-runs)
    rm -rf /tmp/long-runs  # a second call on a warm machine starts afresh
    status=0
    python benchmarks/long_runs.py --data-root /tmp/medmnist \
      --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist --minutes "${MINUTES:-8}" \
      ${ROWS:+--rows="$ROWS"} ${ROW_FLAGS:+--row-flags="$ROW_FLAGS"} --out /tmp/long-runs 2>&1 \
      | tee "$out/long-runs.log" || status=$?
    # Whatever the runs left comes back, also when the script failed.
    cp /tmp/long-runs/long_runs.md /tmp/long-runs/long_runs.csv "$out/" 2>/dev/null || true
    for run in /tmp/long-runs/runs/*/; do
      [ -d "$run" ] || continue
      row=$(basename "$run")
      tar -czf "$out/$row.tar.gz" -C /tmp/long-runs "runs/$row" "runs/$row.log" "probe/$row.log"
    done
    exit "$status" ;;
esac
