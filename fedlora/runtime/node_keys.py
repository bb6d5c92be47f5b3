"""Which node is which site: the node ID each allowed key was registered as, by key name.

A node's `--name` is what it says of itself; anyone holding a valid key can say any name.
What the server can vouch for is the key: `fedlora server --authorized-keys certs/site-a.pub`
registers it with the SuperLink, which answers with the node ID that key will connect as.
`fedlora server` keeps {node ID: key name (the file's stem)} in `<output-dir>/node-keys.json`
(kept across a resume, whose state database still has the keys), and the ServerApp names
every node by its key there, with its self-declared name beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FILE = "node-keys.json"
REGISTERED = re.compile(r"SuperNode (\d+) registered")


def key_name(key: Path) -> str:
    """The name a key stands for: its file name without .pub (certs/site-a.pub -> site-a)."""
    return key.name.removesuffix(".pub")


def registered_id(output: str) -> int | None:
    """The node ID `flwr supernode register` printed, or None."""
    match = REGISTERED.search(output)
    return int(match.group(1)) if match else None


def read(out_dir: Path) -> dict[int, str]:
    """{node ID: key name} of a run's output folder ({} when there is none)."""
    path = Path(out_dir) / FILE
    if not path.is_file():
        return {}
    return {int(node): str(name) for node, name in json.loads(path.read_text()).items()}


def record(out_dir: Path, node_id: int, name: str) -> None:
    """Add one registered key to the output folder's file."""
    known = read(out_dir)
    known[node_id] = name
    path = Path(out_dir) / FILE
    path.write_text(json.dumps({str(k): v for k, v in sorted(known.items())}, indent=1) + "\n")
