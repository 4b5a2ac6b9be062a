#!/usr/bin/env bash
# F2: everything after the four bundle parts, in one device call (about 7 min on a fresh H200):
#   background: compute-sanitizer memcheck on the kernel repro (tiny mixed batch, as shipped and fixed;
#               tiny 641-token prefill, as shipped)
#   background: kernel repro, every case in its own process
#   foreground: one patched engine (warms the JIT caches)
#   then, in parallel on the one GPU (fixed KV size, no memory profiling): the engine variants
set -uo pipefail
export OUT=${OUT:-/tmp/f2/out}
D="bash tools/f2/device.sh"
( STIMEOUT=100 SCASES=tiny_mixed_8dec_prefill $D sanitizer
  STIMEOUT=100 SCASES=tiny_prefill_641 SMODES=v0.25.1 $D sanitizer ) > /tmp/f2/sanitizer.out 2>&1 &
san=$!
KTIMEOUT=60 $D kernel > /tmp/f2/kernel.out 2>&1 &
ker=$!
E="--gpu-mem 0.08 --kv-cache-gib 2"
ETIMEOUT=160 $D engine fix 1 /tmp/f2/tiny-text $E
declare -A V=(
  [base]="0 /tmp/f2/tiny-text"
  [pc0]="0 /tmp/f2/tiny-text --prefix-caching 0"
  [mns1]="0 /tmp/f2/tiny-text --max-num-seqs 1"
  [nochunk]="0 /tmp/f2/tiny-text --chunked-prefill 0"
  [topk16]="0 /tmp/f2/tiny-text.topk16"
  [kv1]="0 /tmp/f2/tiny-text.kv1"
  [kv1fix]="1 /tmp/f2/tiny-text.kv1"
)
pids=()
for k in "${!V[@]}"; do
  # shellcheck disable=SC2086
  ETIMEOUT=200 $D engine "$k" ${V[$k]} $E > "/tmp/f2/engine-$k.out" 2>&1 &
  pids+=($!)
  sleep 2
done
CUDA_LAUNCH_BLOCKING=1 ETIMEOUT=200 $D engine clb 0 /tmp/f2/tiny-text $E --phases shorts,mixed \
  > /tmp/f2/engine-clb.out 2>&1 &
pids+=($!)
wait "${pids[@]}"
for k in base pc0 mns1 nochunk topk16 kv1 kv1fix clb; do cat "/tmp/f2/engine-$k.out"; done
wait $ker
cat /tmp/f2/kernel.out
wait $san
cat /tmp/f2/sanitizer.out
$D pack logs
