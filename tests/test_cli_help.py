"""`fedlora --help` and every command's `--help` answer without importing torch.

The commands import torch, transformers, peft, Flower and fedlora's registries only after the
arguments are parsed, so help (and a mistyped flag) answers at once. This checks which
modules a help loaded, never how long it took.
"""

import argparse
import subprocess
import sys

import pytest

from fedlora.cli.main import build_parser

HEAVY = ("torch", "transformers", "peft", "flwr", "fedlora.methods", "fedlora.adapters",
         "fedlora.models")
COMMANDS = sorted(next(action.choices for action in build_parser()._actions
                        if isinstance(action, argparse._SubParsersAction)))

PROBE = """
import sys
sys.argv = ["fedlora", *sys.argv[1:], "--help"]
from fedlora.cli.main import main
try:
    main()
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_every_command_is_checked():
    assert {"simulate", "server", "client", "report", "generate", "export", "mix", "certs",
            "settings"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_neither_torch_nor_the_registries(command):
    args = [] if command is None else [command]
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage: fedlora" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]
