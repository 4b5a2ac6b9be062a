#!/usr/bin/env bash
# tools/gpu-run.sh PROFILE... (e.g. h200-tiny-bf16 h200-tiny-fp8) — on an offline Hopper host, after the vLLM
# bundle (shared/tools/vllm-gpu) is installed into /tmp/site: install m3lab's wheelhouse (`m3lab wheelhouse
# .gpu/wheels ...`, carried along), run each profile with `m3lab run`, and pack the run folders (without the
# checkpoint cache) into $OUT.
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
# The quantizer's own library versions, seen only by the quantize stage (vLLM 0.25.1 pins compressed-tensors
# 0.17; llm-compressor 0.14 needs 0.19): `pip download --no-deps compressed-tensors==0.19.0 -d .gpu/wheels-quant`.
if [ -d .gpu/wheels-quant ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/m3lab-quant .gpu/wheels-quant/*.whl
  export M3LAB_QUANTIZE_PYTHONPATH=/tmp/m3lab-quant
fi
export M3LAB_RESULTS=/tmp/m3lab-results PYTHONUNBUFFERED=1
# The copy sent here has no .git: provenance.json takes the commit from here (write it before sending:
# `echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)" > .gpu/commit`).
export M3LAB_GIT_COMMIT=${M3LAB_GIT_COMMIT:-$(cat .gpu/commit 2>/dev/null)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
# M3LAB_RUN_TIMEOUT (s): stop a run in time for a lease that ends. m3lab treats SIGTERM like Ctrl-C: servers
# stopped, status `interrupted`, summary written, so the folder below is still packed.
for profile in "$@"; do
  timeout --signal=TERM --kill-after=30 "${M3LAB_RUN_TIMEOUT:-86400}" python3 -m m3lab run "$profile" 2>&1 \
    | tee "$out/run-$profile.log" || rc=1
done
tar -czf "$out/results.tar.gz" -C /tmp --exclude='m3lab-results/.cache' m3lab-results
exit $rc
