#!/usr/bin/env bash
# tools/gpu-run.sh PROFILE... — on an offline Hopper host, after the vLLM bundle (shared/tools/vllm-gpu) is
# installed into /tmp/site: install m3lab's wheelhouse (`m3lab wheelhouse .gpu/wheels ...`, carried along),
# run each profile with `m3lab run`, and pack the run folders (without the checkpoint cache) into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/m3lab-out}
mkdir -p "$out"
# shellcheck disable=SC1091
source /tmp/site/vllm-env.sh
# The embedded download talks to m3lab's own LocalHub on 127.0.0.1; the vLLM server keeps HF_HUB_OFFLINE via
# the profile's serve.env.
unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
bash .gpu/wheels/install.sh /tmp/m3lab-site
export PYTHONPATH=$PYTHONPATH:/tmp/m3lab-site:$PWD
export M3LAB_RESULTS=/tmp/m3lab-results PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
for profile in "$@"; do
  python3 -m m3lab run "$profile" 2>&1 | tee "$out/run-$profile.log" || rc=1
done
tar -czf "$out/results.tar.gz" -C /tmp --exclude='m3lab-results/.cache' m3lab-results
exit $rc
