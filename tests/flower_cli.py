"""The Flower CLI as a participant (or the operator) would use it against a fedlora server, and
an app bundle that tries to run its own code on the nodes. For the deployment tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FLWR = str(Path(sys.executable).parent / "flwr")


class FlowerCli:
    """`flwr` with its own FLWR_HOME, whose only connection `target` is `address`."""

    def __init__(self, home: Path, address: str, ca: Path | None,
                 prefix: tuple[str, ...] = ()) -> None:
        """`prefix` runs flwr inside something, e.g. ('ip', 'netns', 'exec', 'site-a')."""
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{ca}"' if ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\n'
            f"{security}\n", encoding="utf-8")
        self.home, self.prefix = home, prefix
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `flwr ARGS` (the connection name is appended where Flower expects it)."""
        return subprocess.run([*self.prefix, FLWR, *args], cwd=self.home, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def runs(self) -> list[dict]:
        """The runs `flwr ls` reports (raises if it fails)."""
        proc = self("ls", "target", "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout[proc.stdout.index("{"):])["runs"]


def said(proc: subprocess.CompletedProcess) -> str:
    """What flwr printed, as one line of words (its error boxes wrap and frame the text)."""
    words = (proc.stdout + proc.stderr).split()
    return " ".join(w for w in words if w.strip("│╭╮╰╯─"))


def app_pyproject(name: str, serverapp: str, clientapp: str, config: str) -> str:
    """The pyproject.toml of a Flower app `name` naming its two components, with `config`
    (TOML lines) as its run config."""
    return f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{name}"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}
"""


def hostile_app(folder: Path, marker: Path, report: Path, nodes: int = 1) -> Path:
    """An app whose ClientApp writes `marker` (at import and when it answers) and whose
    ServerApp, once `nodes` nodes are connected (or after 120 s), sends one query to every
    node and writes what came back to `report`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject(
        "hostile", "hostile_server:app", "hostile_client:app",
        f'report = "{report}"\nnodes = {nodes}'), encoding="utf-8")
    (folder / "hostile_client.py").write_text(f"""\
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

Path("{marker}").write_text("imported")
app = ClientApp()


@app.query()
def query(msg, context):
    Path("{marker}").write_text("answered")
    return Message(RecordDict(), reply_to=msg)
""", encoding="utf-8")
    (folder / "hostile_server.py").write_text("""\
import json
import time
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes, deadline = [], time.monotonic() + 120  # the nodes may still be connecting
    while len(nodes) < context.run_config["nodes"] and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes],
        timeout=120)
    Path(context.run_config["report"]).write_text(json.dumps(
        [r.error.reason if r.has_error() else "ran" for r in replies]))
""", encoding="utf-8")
    return folder
