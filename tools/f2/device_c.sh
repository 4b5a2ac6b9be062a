#!/usr/bin/env bash
# One device call after the four bundle parts (repo root; .gpu/probe carried along):
#   1. tools/f2/fp8_probe.py on every checkpoint folder under .gpu/probe/ (vLLM text layout: bf16, the FP8
#      variants of tools/f2/fp8_variants.py, and any other recipe's tiny checkpoint), four engines at a time on
#      the one GPU, each alone with its own log; a checkpoint vLLM cannot load is recorded with its error.
#   2. optional profiles (PROFILES="h200-tiny-bf16 ..."), through tools/gpu-run.sh, into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/c-out}
mkdir -p "$OUT/probe"
# shellcheck disable=SC1091
source /tmp/site/vllm-env.sh
export PYTHONPATH="$PWD/tools/f2/vllm_plugin:$PYTHONPATH" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
cp .gpu/probe/*.json "$OUT/probe/" 2>/dev/null
pids=()
for d in .gpu/probe/*/; do
  name=$(basename "$d")
  ( timeout "${PTIMEOUT:-300}" python3 tools/f2/fp8_probe.py run .gpu/probe "$name" "$OUT/probe" \
      > "$OUT/probe/log-$name.txt" 2>&1; echo "[probe] $name rc=$?" >> "$OUT/probe/log-$name.txt" ) &
  pids+=($!)
  sleep 3
  if [ ${#pids[@]} -ge 4 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
wait
for f in "$OUT"/probe/log-*.txt; do
  echo "== $f"; grep -E '^\[|Error|error|raise|NotImplemented|not supported' "$f" | grep -v Warning | tail -8 | cut -c1-600
done
if [ -f .gpu/probe/reference-cpu.json ]; then python3 tools/f2/fp8_probe.py compare .gpu/probe "$OUT/probe" \
  > "$OUT/probe/compare.json" 2>&1; head -c 4000 "$OUT/probe/compare.json"; fi
if [ -n "${PROFILES:-}" ]; then
  # shellcheck disable=SC2086
  M3LAB_RUN_TIMEOUT=${M3LAB_RUN_TIMEOUT:-420} OUT=$OUT bash tools/gpu-run.sh $PROFILES
fi
