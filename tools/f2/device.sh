#!/usr/bin/env bash
# F2 driver on the lent GPU host (run from the repo root). Steps:
#   bash tools/f2/device.sh install N        apply .gpu/bundle/partN (vLLM 0.25.1 bundle, shared/tools/vllm-gpu)
#   bash tools/f2/device.sh stash            copy .gpu/tiny-text to /tmp/f2/ and make its variants there
#   bash tools/f2/device.sh kernel           kernel-level repro (tools/f2/kernel_repro.py), all cases
#   bash tools/f2/device.sh sanitizer        compute-sanitizer memcheck on the kernel repro (buggy, then fixed)
#   bash tools/f2/device.sh engine LABEL FIX CKPT [nan_repro args]   one offline LLM run (FIX: 0 as shipped, 1 plugin)
#   bash tools/f2/device.sh pack NAME        tar the full logs into $OUT/NAME.tar.gz
# Full logs go to /tmp/f2/logs/; the summary lines to stdout (and so to the caller's tee).
set -uo pipefail
ROOT=$(pwd)
OUT=${OUT:-/tmp/f2/out}
mkdir -p "$OUT" /tmp/f2/logs
step=${1:?step}; shift

vllm_env() {
    # shellcheck disable=SC1091
    source /tmp/site/vllm-env.sh
    export PYTHONPATH="$ROOT/tools/f2/vllm_plugin:$PYTHONPATH"
}

case "$step" in
install)
    bash ".gpu/bundle/part$1/step.sh"
    ;;
stash)
    rm -rf /tmp/f2/tiny-text /tmp/f2/tiny-text.*
    cp -r .gpu/tiny-text /tmp/f2/tiny-text && python3 tools/f2/make_variants.py /tmp/f2/tiny-text
    ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || which compute-sanitizer || echo "no compute-sanitizer"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ;;
kernel)
    # one process per case (an illegal memory access kills the CUDA context), fixed mode first
    vllm_env
    for c in $(echo "${KCASES:-tiny_mixed_1dec_prefill,realM3_tp8_1dec_prefill,realM3_tp8_prefill_only,realM3_tp1_8dec_prefill,tiny_decode_only_8,tiny_topk16_mixed,tiny_mixed_8dec_prefill,realM3_tp8_8dec_prefill,tiny_prefill_641,tiny_chunk_ctx512_q129}" | tr , ' '); do
        timeout "${KTIMEOUT:-90}" python3 tools/f2/kernel_repro.py --cases "$c" --modes fixed,v0.25.1 \
            --json "$OUT/kernel-$c.json" "$@" > "/tmp/f2/logs/kernel-$c.log" 2>&1
        rc=$?
        grep -E '^\[kernel\]|Error|error:' "/tmp/f2/logs/kernel-$c.log" | grep -v done | cut -c1-900
        echo "[kernel] $c rc=$rc"
    done
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
res = {}
for f in sorted(glob.glob(os.path.join(out, "kernel-*.json"))):
    res.update(json.load(open(f)))
    os.remove(f)
json.dump(res, open(os.path.join(out, "kernel.json"), "w"), indent=1)
PY
    ;;
sanitizer)
    vllm_env
    CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    CS=${CS:-compute-sanitizer}
    for c in $(echo "${SCASES:-tiny_prefill_641}" | tr , ' '); do
      for mode in ${SMODES:-v0.25.1 fixed}; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${STIMEOUT:-150}" "$CS" --tool memcheck --print-limit 6 \
            python3 tools/f2/kernel_repro.py --cases "$c" --modes "$mode" --no-ref \
            --no-guard > "/tmp/f2/logs/sanitizer-$c-$mode.log" 2>&1
        rc=$?
        echo "[sanitizer] case=$c mode=$mode rc=$rc"
        grep -E 'Invalid|ERROR SUMMARY|^=========     at|Address|kernel\]|illegal' \
            "/tmp/f2/logs/sanitizer-$c-$mode.log" | grep -v "done in" | head -24 | cut -c1-300
      done
    done
    ;;
engine)
    label=$1 fix=$2 ckpt=$3; shift 3
    vllm_env
    export M3LAB_F2FIX=$fix
    t0=$(date +%s)
    timeout "${ETIMEOUT:-300}" python3 tools/f2/nan_repro.py --model "$ckpt" --label "$label" \
        --json "/tmp/f2/logs/engine-$label.jsonl" "$@" > "/tmp/f2/logs/engine-$label.log" 2>&1
    rc=$?
    grep -E "^\[$label\]|m3lab_f2fix|illegal|Error|Traceback|_kernel" "/tmp/f2/logs/engine-$label.log" \
        | grep -v "Available plugins" | head -60 | cut -c1-700
    echo "[$label] rc=$rc wall=$(( $(date +%s) - t0 ))s"
    ;;
pack)
    tar -C /tmp/f2 -czf "$OUT/$1.tar.gz" logs
    ls -la "$OUT"
    ;;
*)
    echo "unknown step $step" >&2; exit 2
    ;;
esac
