"""A fedlora node runs only its own installed ClientApp: the app bundle check and the guard
that stands in for Flower's task commands (clients/app_guard.py). The end-to-end refusal of a
bundle that carries code is in test_deployment.py."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from clients.app_guard import CLIENTAPP, _fedlora_loader, bundle_problem, main
from fedlora.runtime.app_config import render_pyproject
from fedlora.runtime.supernode import GUARDED_COMMANDS, _write_guard_shims


def fab(tmp_path: Path, clientapp: str = CLIENTAPP, **files: str) -> bytes:
    """A bundle as `flwr run` builds it from an app folder with these files."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        render_pyproject({"num-rounds": 2}, "server.server_app:app", clientapp))
    for name, text in files.items():
        (app / name).write_text(text)
    return build_fab_from_disk(app)


def test_fedloras_own_bundle_passes(tmp_path):
    assert bundle_problem(fab(tmp_path)) is None


def test_a_bundle_that_carries_code_is_refused(tmp_path):
    problem = bundle_problem(fab(tmp_path, **{"evil.py": "import os"}))
    assert problem is not None and "carries files of its own (evil.py" in problem


def test_a_bundle_naming_another_clientapp_is_refused(tmp_path):
    problem = bundle_problem(fab(tmp_path, clientapp="os:system"))
    assert problem is not None and "names ClientApp 'os:system'" in problem


@pytest.mark.parametrize("content, message", [
    (b"not a zip", "not a readable FAB zip"),
    (None, "has no pyproject.toml"),
])
def test_a_broken_bundle_is_refused(content, message):
    if content is None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr(".info/CONTENT", "")
        content = buffer.getvalue()
    assert message in (bundle_problem(content) or "")


def test_the_loader_ignores_the_bundle_and_returns_fedloras_clientapp():
    from clients.client_app import app

    assert _fedlora_loader("", None, True)("hostile.app", "1.0.0", "0" * 64) is app


def test_flwr_still_has_the_names_the_guard_stands_in_for():
    from flwr.supernode.runtime import run_clientapp as runtime

    assert callable(runtime.install_from_fab) and callable(runtime.get_load_client_app_fn)


def test_every_other_task_command_is_refused(capsys):
    assert main(["flwr-agentapp", "--runtime-api-address", "127.0.0.1:9"]) == 1
    assert "refused a flwr-agentapp task" in capsys.readouterr().err


def test_the_shims_cover_every_flower_task_command_and_run_the_guard(tmp_path):
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    assert set(TASK_TYPE_TO_COMMAND.values()) == set(GUARDED_COMMANDS)
    _write_guard_shims(tmp_path)
    proc = subprocess.run([str(tmp_path / "flwr-model")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and "refused a flwr-model task" in proc.stderr
    assert sys.executable in (tmp_path / "flwr-clientapp").read_text()
