"""Quiet output: the dependencies' warnings are hidden, fedlora's own output and every error
are not, and --verbose shows everything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedlora.cli.main import build_parser
from fedlora.runtime.quiet import ENVIRONMENT, QUIET_ENV, chatter

# A child that emits what a run's processes emit: a dependency's UserWarning (as transformers
# raises it), a FutureWarning, a dependency's log warning and error, fedlora's own warning,
# then an error.
CHILD = r"""
import logging, warnings
import fedlora
warnings.warn_explicit("lib advice", UserWarning, "modeling_utils.py", 1,
                       module="transformers.modeling_utils")
warnings.warn("lib deprecation", FutureWarning)
logging.basicConfig()
logging.getLogger("transformers.modeling_utils").warning("lib log warning")
logging.getLogger("peft").error("lib log error")
warnings.warn_explicit("our warning", UserWarning, "config.py", 1, module="fedlora.config")
raise RuntimeError("a real failure")
"""


def run_child(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT and k != QUIET_ENV}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert proc.returncode == 1
    return proc.stderr


def test_quiet_hides_dependency_warnings_but_not_errors_or_ours():
    err = run_child({QUIET_ENV: "1", **ENVIRONMENT})
    for hidden in ("lib advice", "lib deprecation", "lib log warning"):
        assert hidden not in err
    for shown in ("lib log error", "our warning", "RuntimeError: a real failure", "Traceback"):
        assert shown in err


def test_without_quiet_everything_is_shown():
    err = run_child({"PYTHONWARNINGS": "default"})
    for shown in ("lib advice", "lib deprecation", "lib log warning", "lib log error",
                  "our warning", "RuntimeError: a real failure"):
        assert shown in err


def test_flower_start_up_chatter_is_dropped_but_fedlora_lines_and_errors_are_not():
    green, reset = "\x1b[92m", "\x1b[0m"
    assert chatter("Using SuperLink: fedlora (127.0.0.1:36539)\n")
    assert chatter(f"{green}INFO {reset}:      Starting logstream for run_id `675807`\n")
    assert chatter("\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes "
                   "changed from 10 to 2.\n")
    assert chatter(f"{green}INFO {reset}:      Federation `@none/default` (2 simulated "
                   "SuperNodes)\n")
    assert chatter("(ClientAppActor pid=3585) WARNING :   Manually terminating ClientAppActor")
    assert not chatter(f"{green}INFO {reset}:      round 1: train-loss 5.826 eval-loss 5.801\n")
    assert not chatter("Successfully started run 6758079619016879922\n")  # the run id stays
    assert not chatter("\x1b[91mERROR \x1b[0m:     ServerApp failed: Traceback ...\n")
    assert not chatter("fedlora: error: setting 'rank': expected >= 1, got 0\n")


@pytest.mark.parametrize("argv", [["--verbose", "settings"], ["settings", "--verbose"]])
def test_verbose_is_accepted_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["settings"]).verbose is False
