#!/usr/bin/env bash
# Every GPU check of the project in one call, for a short lease on a machine with torch + CUDA but no diffusers,
# TensorRT, onnxruntime-gpu or network (e.g. the H100/H200 machines this project is sometimes lent):
#   1. the GPU-marked tests (CUDA-graph step parity, TensorRT tests skip without TensorRT)
#   2. `invdiff bench` on the shipped colored-digits mini model: eager vs the torch-cuda backend (fp16 + CUDA graphs),
#      with and without the adapter
#   3. bench/gpu_check.sh: SD-1.5-architecture UNet + adapter, eager fp32/fp16 vs fused fp16 + CUDA graphs,
#      batch 1/4/8 at two resolutions (latents 64x64 = 512x512 px and 64x96 = 512x768 px; real scale, issue 13)
# Each part has its own time cap and the shortest run first, so that a failure or an overrun cuts the longest part
# (gpu_check, which saves its results after every batch) and the caps add up to 90 + 120 + 330 = 540 s, under the
# device tool's 600 s per command. Wheels: see bench/gpu_check.sh (the lent machines' image has torch, typer, rich,
# transformers and pytest; diffusers and importlib_metadata travel as wheels in .whl/). Results and logs go to $OUT
# (or bench/results/device/). The exit status is 1 when any part failed or ran out of time.
#
# Usage: bash bench/device_run.sh            (under 10 minutes; not run yet: no GPU was lent so far)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results/device}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COLUMNS=160
FAILED=()

if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: could not install .whl/*.whl (see bench/gpu_check.sh for the list)" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package itself, uninstalled

echo "== 1/3 GPU tests (the two files with gpu/trt marks; TensorRT tests skip without TensorRT) =="
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or trt" -o addopts="" \
    tests/test_torch_backend.py tests/test_tensorrt.py 2>&1 | tee "$RESULTS/pytest_gpu.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("GPU tests")

echo "== 2/3 invdiff bench, colored-digits mini model, torch-cuda fp16 =="
timeout 120 python3 -m invdiff_rt.cli bench --model colored-digits --backends torch --batch-sizes 1,8,32 \
    --steps 20 --warmup 3 --repeats 5 --rounds 3 --precision fp16 --json "$RESULTS/bench_gpu.json" 2>&1 \
    | tee "$RESULTS/bench_gpu.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("invdiff bench")

echo "== 3/3 gpu_check (SD-1.5 UNet, 512x512 and 512x768) =="
GPU_CHECK_LIMIT_S="${GPU_CHECK_LIMIT_S:-330}" bash bench/gpu_check.sh --out "$RESULTS/gpu_check.json" \
    --batches 1,4,8 --latent-sizes "${LATENT_SIZES:-64x64,64x96}" \
    --compile-cap-s "${COMPILE_CAP_S:-100}" 2>&1 | tee "$RESULTS/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED+=("gpu_check")

echo "done: results in $RESULTS"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "failed or cut by its cap: ${FAILED[*]}" >&2
    exit 1
fi
