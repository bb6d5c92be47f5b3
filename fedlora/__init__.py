"""fedlora: federated LoRA/QLoRA fine-tuning of Hugging Face models on Flower."""

import logging
import os

from fedlora.runtime.quiet import install_filters, is_quiet

__version__ = "0.1.0"

# bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face Hub at import and
# warns when it cannot (always, offline); its built-in CPU path works, so keep that quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# transformers 5.x replaces layers with kernels fetched from the Hugging Face Hub at load time
# on CUDA (`kernels`, USE_HUB_KERNELS defaults to on): code downloaded and run on a node, and a
# load that fails offline. A node runs only what is installed on it; USE_HUB_KERNELS=1 set by
# the user still turns them on.
os.environ.setdefault("USE_HUB_KERNELS", "0")

# A process started by the `fedlora` command (without --verbose) hides its dependencies' noise
if is_quiet():
    install_filters()
