"""Quiet output: a user reads fedlora's own progress, not its dependencies' warnings.

torch, transformers, peft, bitsandbytes, Ray and Flower print deprecation notices, advisory
warnings and chatter on every run (`torch.jit.script_method is deprecated`, Ray's accelerator
FutureWarning, "Since flwr 1.32, default simulated SuperNodes changed ..."). The `fedlora`
command hides them unless `--verbose` is given:

- `quiet()` sets `FEDLORA_QUIET=1` and the filters below in the environment, so every process a
  run starts (SuperLink, ServerApp, Ray workers, SuperNodes, ClientApps) inherits them, and
  installs them in this process. `import fedlora` installs them in a child process that has
  `FEDLORA_QUIET=1` (the ServerApp and ClientApp import fedlora before torch).
- Hidden: DeprecationWarning, PendingDeprecationWarning and FutureWarning anywhere (notes for a
  library's developers, never a user's mistake); UserWarning only from the dependencies' own modules
  (LIBRARIES), their logging below ERROR (LOGGERS); Flower's start-up lines in `FLOWER_CHATTER`.
- Never hidden: exceptions and tracebacks, fedlora's own warnings and log lines, any log
  record at ERROR or above, and anything else a dependency prints.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

QUIET_ENV = "FEDLORA_QUIET"  # "1": hide the dependencies' noise (set by the fedlora command)
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "ray", "flwr",
             "datasets", "huggingface_hub", "safetensors", "tokenizers", "gguf", "opacus")
# Inherited by every Python process of a run: categories that are never a user's concern
PYTHONWARNINGS = ("ignore::DeprecationWarning,ignore::PendingDeprecationWarning,"
                  "ignore::FutureWarning")
ENVIRONMENT = {
    "PYTHONWARNINGS": PYTHONWARNINGS,
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Loggers set to ERROR (not flwr: fedlora's server logs through it; not ray: its warnings say
# why a simulation waits for resources)
LOGGERS = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub",
           "torch")
_LIBRARY_MODULE = r"(" + "|".join(LIBRARIES) + r")(\..*)?$"

# Flower's start-up lines of `flwr run --stream` and of a simulation, which say nothing a
# fedlora user acts on (fedlora prints its own summary of the run). "Successfully started run
# <id>" stays: the run id is what `flwr` commands on the control port take.
FLOWER_CHATTER = re.compile(
    r"Using SuperLink:|Starting logstream for run_id|"
    r"Starting Flower Simulation|Since flwr 1\.\d+, default simulated SuperNodes|"
    r"Federation `[^`]*` \(\d+ simulated SuperNodes\)|To change federation size|"
    r"flwr federation simulation-config|Successfully installed [\w.-]+ to |"
    r"Manually terminating ClientAppActor")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_quiet() -> bool:
    """Whether this process hides the dependencies' noise."""
    return os.environ.get(QUIET_ENV) == "1"


def install_filters() -> None:
    """Hide the dependencies' warnings in this process (see the module docstring)."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=_LIBRARY_MODULE)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet(verbose: bool = False) -> None:
    """The fedlora command's output policy: quiet (the default) or everything (`verbose`)."""
    if verbose:
        os.environ.pop(QUIET_ENV, None)
        return
    os.environ[QUIET_ENV] = "1"
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    install_filters()


def chatter(line: str) -> bool:
    """Whether `line` is one of Flower's start-up lines that quiet output drops."""
    return bool(FLOWER_CHATTER.search(_ANSI.sub("", line).rstrip("\n")))
