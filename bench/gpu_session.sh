#!/usr/bin/env bash
# What a lent GPU should show, in one call of the device tool, most important first.
#
#   bench/gpu_session.sh                      # setup, then each step in order while the budget lasts
#   bench/gpu_session.sh only STEP [STEP...]  # setup, then just these steps (a second call)
#   bench/gpu_session.sh tune [ARGS]          # setup, then the attention block-size search (bench/tune_attention.py)
#
# Steps, in order (seconds: the least each needs to start, and what it took when estimated):
#   attention-tests  pytest -m gpu tests/test_attention.py                 60
#   attention-bench  fastcore bench attention (no torch.compile provider) 120
#   dp-overhead      fastcore bench data_parallel_overhead (NCCL, 1 GPU)   60
#   gpu-tests        the rest of pytest -m gpu, once the CUDA build is done 90
#   norm-bench       fastcore bench layer_norm rms_norm                     60
#   adamw-bench      fastcore bench adamw                                   30
#   train            fastcore train --preset gpt2-124m, 40 steps           120
# The CUDA extension builds in the background from the start, since only gpu-tests and the cuda
# providers need it. A lent machine has 15 minutes in all, a command 10 (METHOD.md of the device
# tool), so the default budget is BUDGET=540 seconds: each step runs under `timeout` with what is
# left, and one that would start with less than its floor is skipped and named in the summary.
# Benchmarks stopped by the limit keep the cases they finished.
#
# Call it with the device tool's timeout_s=600: the budget ends the steps by then, with time to pack.
#
# Results: the device tool returns at most 8 files, so everything goes into two under $OUT:
# summary.txt (one line per step, then the tables) and session.tar.gz (logs, info, JSON results and
# plots under <device-slug>/). Unpack it and commit <device-slug>/ under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
BUDGET=${BUDGET:-540}
START=$SECONDS
WORK=$(mktemp -d)
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }

pack() {
  cp "$SUMMARY" "$WORK/summary.txt"
  tar czf "$OUT/session.tar.gz" -C "$WORK" . && note "packed $(du -h "$OUT/session.tar.gz" | cut -f1) into session.tar.gz"
}
trap pack EXIT

step() {  # step NAME FLOOR COMMAND...: run under what is left of the budget, logged to NAME.log
  local name=$1 floor=$2 t0=$SECONDS status
  shift 2
  if [ "$(left)" -lt "$floor" ]; then
    note "$name: skipped, $(left) s left of the budget (needs $floor)"
    return
  fi
  timeout --signal=INT --kill-after=15 "$(left)" "$@" > "$WORK/$name.log" 2>&1
  status=$?
  note "$name: exit $status in $((SECONDS - t0)) s$([ $status -eq 124 ] && echo ' (stopped by the budget)')"
  grep -E "passed|failed|error|deselected|interrupted" "$WORK/$name.log" | tail -n 1 | sed "s/^/  /" | tee -a "$SUMMARY"
}

SLUG=
setup() {  # setup [build]: install, describe the machine, and start the CUDA build when asked
  local t0=$SECONDS
  pip install --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 || { note "install failed"; tail -n 20 "$WORK/install.log"; exit 1; }
  python -m fastcore info > "$WORK/info.txt" 2>&1
  SLUG=$(python -c "from fastcore.bench.harness import device_slug; print(device_slug('cuda'))")
  mkdir -p "$WORK/$SLUG"
  if [ "${1:-}" = build ]; then
    python -m fastcore build > "$WORK/build.log" 2>&1 &
    BUILD=$!
  fi
  XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  note "setup: ${SLUG} in $((SECONDS - t0)) s; ${BUILD:+the CUDA build runs in the background; }pytest ${XDIST:-without xdist}"
}

wait_build() {  # for the background build, while the budget lasts
  local status
  if [ -z "${BUILD:-}" ]; then return; fi
  while kill -0 "$BUILD" 2>/dev/null && [ "$(left)" -gt 0 ]; do sleep 1; done
  if kill -0 "$BUILD" 2>/dev/null; then
    kill "$BUILD"; note "build: stopped by the budget at $((SECONDS - START)) s"
  else
    wait "$BUILD"; status=$?
    note "build: exit $status at $((SECONDS - START)) s"
    [ $status -eq 0 ] || tail -n 5 "$WORK/build.log" | tee -a "$SUMMARY"
  fi
  BUILD=
}

bench() {  # bench NAME FLOOR OP...
  local name=$1 floor=$2
  shift 2
  step "$name" "$floor" python -m fastcore bench "$@" --device cuda --no-compile \
    --json "$WORK/$SLUG/$(IFS=-; echo "$*").json" --plot "$WORK/$SLUG" --markdown
  [ -f "$WORK/$name.log" ] && grep -E "^\|" "$WORK/$name.log" >> "$SUMMARY"
}

run_step() {
  case "$1" in
    attention-tests) step attention-tests 60 python -m pytest -q -m gpu $XDIST -p no:cacheprovider tests/test_attention.py ;;
    attention-bench) bench attention-bench 120 attention ;;
    dp-overhead) bench dp-overhead 60 data_parallel_overhead ;;
    gpu-tests) wait_build; step gpu-tests 90 python -m pytest -q -m gpu $XDIST -p no:cacheprovider tests \
                 --ignore=tests/test_attention.py ;;
    norm-bench) wait_build; bench norm-bench 60 layer_norm rms_norm ;;
    adamw-bench) wait_build; bench adamw-bench 30 adamw ;;
    train)  # the trainer end to end (stdlib corpus, byte vocabulary: 86M parameters): MFU and data wait
      step train 120 python -m fastcore train --preset gpt2-124m --steps 40 --grad-accum 2 --eval-every 40 \
        --no-progress --out /tmp/train-gpt2
      cp /tmp/train-gpt2/metrics.jsonl "$WORK/train-gpt2.metrics.jsonl" 2>/dev/null && tail -n 2 "$WORK/train-gpt2.metrics.jsonl" | tee -a "$SUMMARY" ;;
    *) note "unknown step '$1'" ;;
  esac
}

STEPS=(attention-tests attention-bench dp-overhead gpu-tests norm-bench adamw-bench train)
mode=${1:-all}
case "$mode" in
  all) setup build; for s in "${STEPS[@]}"; do run_step "$s"; done ;;
  only) shift; [ $# -gt 0 ] || { echo "gpu_session.sh only: name steps: ${STEPS[*]}" >&2; exit 2; }
        setup build; for s in "$@"; do run_step "$s"; done ;;
  tune) shift; setup
        step tune 60 python -m fastcore.bench.tune_attention "$@" --json "$WORK/$SLUG/attention-tune.json"
        [ -f "$WORK/tune.log" ] && grep -E "^D=|wrote" "$WORK/tune.log" | tee -a "$SUMMARY" ;;
  *) echo "gpu_session.sh: unknown mode '$mode' (all, only STEP..., tune [ARGS])" >&2; exit 2 ;;
esac
if [ -n "${BUILD:-}" ]; then kill "$BUILD" 2>/dev/null && note "build: stopped, no step left needs it"; fi
