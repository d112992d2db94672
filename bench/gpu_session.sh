#!/usr/bin/env bash
# Everything a lent GPU should show, in one call: install, CUDA build, GPU tests, benchmarks.
# Logs and results go under $OUT (default ./bench/out); a short table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
slug=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")

pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
python -m fastcore build > "$OUT/build.log" 2>&1; echo "build: exit $?" | tee -a "$OUT/summary.txt"
python -m fastcore info > "$OUT/info.txt" 2>&1
python -m pytest -q -m gpu tests > "$OUT/pytest_gpu.log" 2>&1; echo "pytest -m gpu: exit $?" | tee -a "$OUT/summary.txt"
tail -n 3 "$OUT/pytest_gpu.log"
python bench/bench_norm.py --device cuda --json "$OUT/$slug/norm.json" > "$OUT/bench_norm.log" 2>&1
echo "bench_norm: exit $?" | tee -a "$OUT/summary.txt"
grep -E "fwd\+bwd" "$OUT/bench_norm.log" | head -60
