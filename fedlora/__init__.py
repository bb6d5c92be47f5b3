"""fedlora: federated LoRA/QLoRA fine-tuning of Hugging Face models on Flower."""

import logging

from fedlora.quiet import install_filters, is_quiet

__version__ = "0.1.0"

# bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face Hub at import and
# warns when it cannot (always, offline); its built-in CPU path works, so keep that quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# A process started by the `fedlora` command (without --verbose) hides its dependencies' noise
if is_quiet():
    install_filters()
