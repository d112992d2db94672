#!/usr/bin/env bash
# Everything a lent GPU should show, in one call: install, CUDA build, GPU tests, benchmarks.
# Logs and results go under $OUT (default ./bench/out); a short table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"

pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
python -m fastcore build > "$OUT/build.log" 2>&1; echo "build: exit $?" | tee -a "$OUT/summary.txt"
python -m fastcore info > "$OUT/info.txt" 2>&1
python -m pytest -q -m gpu tests > "$OUT/pytest_gpu.log" 2>&1; echo "pytest -m gpu: exit $?" | tee -a "$OUT/summary.txt"
tail -n 3 "$OUT/pytest_gpu.log"
slug=$(python -c "from fastcore.bench.harness import device_slug; print(device_slug('cuda'))")
python -m fastcore bench --device cuda --json "$OUT/$slug/all.json" --plot "$OUT/$slug" --markdown \
  > "$OUT/bench.log" 2>&1; echo "bench: exit $?" | tee -a "$OUT/summary.txt"
if [ -f "bench/baselines/$slug.json" ]; then
  python -m fastcore bench compare bench/baselines/ "$OUT/$slug/all.json" > "$OUT/compare.log" 2>&1
  echo "compare: exit $?" | tee -a "$OUT/summary.txt"
fi
grep -E "fwd\+bwd|skipped" "$OUT/bench.log" | head -60
# The trainer end to end (stdlib corpus, byte vocabulary: 86M parameters): MFU and data wait per step.
for flag in "" "--compile"; do
  # The run (and its ~1 GB checkpoint) stays outside $OUT; only its metrics come back.
  python -m fastcore train --preset gpt2-124m --steps 40 --grad-accum 2 --eval-every 40 --no-progress $flag \
    --out "/tmp/train-gpt2$flag" > "$OUT/train$flag.log" 2>&1; echo "train gpt2-124m $flag: exit $?" | tee -a "$OUT/summary.txt"
  cp "/tmp/train-gpt2$flag/metrics.jsonl" "$OUT/train-gpt2$flag.metrics.jsonl" && tail -n 2 "$OUT/train-gpt2$flag.metrics.jsonl"
done
