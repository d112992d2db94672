#!/usr/bin/env bash
# What a lent GPU should show: install, CUDA build, GPU tests, benchmarks, the trainer end to end.
#
#   bench/gpu_session.sh                 # every stage, in order
#   bench/gpu_session.sh tests           # one stage per call, to fit a per-call time limit:
#   bench/gpu_session.sh bench layer_norm rms_norm attention
#   bench/gpu_session.sh bench adamw data_parallel_overhead
#   bench/gpu_session.sh bench train patch
#   bench/gpu_session.sh train
#   bench/gpu_session.sh tune --head-dims 128 --causal yes     # attention block sizes, one slice per call
#
# Every call installs and builds first (quick when the machine is still warm), so any stage can run
# on a fresh machine. Logs and results go under $OUT (default ./bench/out); summary.txt collects the
# exit status of each step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"

setup() {
  pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
  python -m fastcore build > "$OUT/build.log" 2>&1; echo "build: exit $?" | tee -a "$OUT/summary.txt"
  python -m fastcore info > "$OUT/info.txt" 2>&1
}

tests() {
  python -m pytest -q -m gpu tests > "$OUT/pytest_gpu.log" 2>&1; echo "pytest -m gpu: exit $?" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/pytest_gpu.log"
}

bench() {  # bench [OP...]: those benchmarks, or all of them
  local slug name
  slug=$(python -c "from fastcore.bench.harness import device_slug; print(device_slug('cuda'))")
  name=${*:-all}; name=${name// /+}
  python -m fastcore bench "$@" --device cuda --json "$OUT/$slug/$name.json" --plot "$OUT/$slug" --markdown \
    > "$OUT/bench-$name.log" 2>&1; echo "bench $name: exit $?" | tee -a "$OUT/summary.txt"
  if [ -f "bench/baselines/$slug.json" ]; then
    python -m fastcore bench compare bench/baselines/ "$OUT/$slug/$name.json" > "$OUT/compare-$name.log" 2>&1
    echo "compare $name: exit $?" | tee -a "$OUT/summary.txt"
  fi
  grep -E "fwd\+bwd| step |skipped" "$OUT/bench-$name.log" | head -60
}

train() {  # the trainer end to end (stdlib corpus, byte vocabulary: 86M parameters): MFU and data wait
  for flag in "" "--compile"; do
    # The run (and its ~1 GB checkpoint) stays outside $OUT; only its metrics come back.
    python -m fastcore train --preset gpt2-124m --steps 40 --grad-accum 2 --eval-every 40 --no-progress $flag \
      --out "/tmp/train-gpt2$flag" > "$OUT/train$flag.log" 2>&1
    echo "train gpt2-124m $flag: exit $?" | tee -a "$OUT/summary.txt"
    cp "/tmp/train-gpt2$flag/metrics.jsonl" "$OUT/train-gpt2$flag.metrics.jsonl" && tail -n 2 "$OUT/train-gpt2$flag.metrics.jsonl"
  done
}

tune() {  # tune [ARGS]: the attention block-size search (see bench/tune_attention.py)
  local slug name
  slug=$(python -c "from fastcore.bench.harness import device_slug; print(device_slug('cuda'))")
  local status
  name=$(printf '%s' "${*:-all}" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//')
  mkdir -p "$OUT/$slug"
  python -m fastcore.bench.tune_attention "$@" --json "$OUT/$slug/attention-tune-$name.json" > "$OUT/tune-$name.log" 2>&1
  status=$?
  echo "tune $*: exit $status" | tee -a "$OUT/summary.txt"
  if [ "$status" -ne 0 ]; then tail -n 20 "$OUT/tune-$name.log"; else grep -E "^D=|wrote" "$OUT/tune-$name.log"; fi
}

stage=${1:-all}
case "$stage" in
  all|setup|tests|bench|train|tune) ;;
  *) echo "gpu_session.sh: unknown stage '$stage' (all, setup, tests, bench [OP...], train, tune [ARGS])" >&2; exit 2 ;;
esac
setup
case "$stage" in
  all) tests; bench; train ;;
  tests) tests ;;
  bench) shift; bench "$@" ;;
  train) train ;;
  tune) shift; tune "$@" ;;
esac
