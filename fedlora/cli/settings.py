"""fedlora settings: every run-config key with its default and help, each federated and PEFT
method with its own options, and which strategy works with what (from the registries' flags)."""

from __future__ import annotations

import argparse
from typing import Any

from fedlora.config import SECTIONS, section_keys

# how a PEFT method's per-example gradients are computed under dp-sgd (docs/dp-sgd.md)
DP_SGD_HOW = {"opacus": "covered (per-example gradients by Opacus hooks)",
              "one-by-one": "covered (one example per backward pass)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`fedlora settings` takes no arguments of its own."""


def print_keys(keys: dict[str, tuple[Any, str]], indent: str = "  ") -> None:
    """One line per key: the key, its default (a Python literal) and its help."""
    width = 26 - len(indent)
    for key, (default, help_text) in keys.items():
        print(f"{indent}{key:{width}} {default!r:24} {help_text}")


def table(rows: list[dict[str, str]]) -> list[str]:
    """Rows of equal keys as a Markdown table (header first)."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    line = lambda cells: "| " + " | ".join(f"{cells[c]:{widths[c]}}" for c in columns) + " |"
    return [line({c: c for c in columns}), line({c: "-" * widths[c] for c in columns}),
            *(line(r) for r in rows)]


def run(args: argparse.Namespace) -> int:
    """Print the shared keys by section, the PEFT methods and the federated methods with their
    options, then the compatibility table."""
    from fedlora.adapters import PEFT_METHODS
    from fedlora.methods import METHODS, compatibility

    for name, section in SECTIONS.items():
        print(f"[{name}]")
        print_keys(section_keys(section))
    print("[peft methods] (peft = one of these; each line after it is that method's option)")
    for name, peft in sorted(PEFT_METHODS.items()):
        print(f"  {name:24} {'':24} {peft.summary}")
        print(f"    {'':24} {'':22} dp-sgd: " + (DP_SGD_HOW[peft.dp_sgd] if peft.dp_sgd
                                                 else f"refused ({peft.why_no_dp_sgd})"))
        print_keys(peft.Options.keys(), indent="    ")
    print("[methods] (strategy = one of these; each line after it is that method's option)")
    for name, method in sorted(METHODS.items()):
        print(f"  {name:24} {'':24} {method.summary}")
        print_keys(method.Options.keys(), indent="    ")
    print("[compatibility] (what each strategy works with; read off the registries)")
    print("\n".join(table(compatibility())))
    return 0
