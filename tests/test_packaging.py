"""Packaging: every package fedlora imports is declared, torch is bounded by the version CI
tests, and the app bundle `flwr run .` sends holds the code without tests, docs or benchmarks."""

from __future__ import annotations

import ast
import importlib.metadata as md
import io
import re
import sys
import tomllib
import zipfile
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CODE = ("fedlora", "server", "clients", "simulations")  # what users install and run


def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, str]:
    """{top-level module: first file importing it} over fedlora's own code (not the stdlib)."""
    found: dict[str, str] = {}
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                         and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in CODE:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    project = pyproject()["project"]
    declared = {normal(Requirement(r).name) for r in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        declared |= {normal(Requirement(r).name) for r in extra}
    distributions = md.packages_distributions()
    missing = {}
    for module, where in imported_modules().items():
        # a module whose package is not installed here (an optional extra) goes by its own name
        names = {normal(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    # the scan sees the imports that were once missing from the list
    assert {"cryptography", "huggingface_hub", "tokenizers", "pyarrow"} <= set(imported_modules())


def test_torch_has_an_upper_bound_that_the_tested_torch_meets():
    torch_req = next(Requirement(r) for r in pyproject()["project"]["dependencies"]
                     if normal(Requirement(r).name) == "torch")
    assert any(spec.operator in ("<", "<=") for spec in torch_req.specifier), torch_req
    tested = Version(Version(torch.__version__).base_version)  # 2.13.0+cpu -> 2.13.0
    assert torch_req.specifier.contains(tested), (tested, torch_req)
    setup = (ROOT / "scripts" / "setup-venv.sh").read_text(encoding="utf-8")
    pinned = re.search(r'TORCH_SPEC:-torch==([0-9.]+)', setup)
    assert pinned and torch_req.specifier.contains(pinned.group(1)), pinned


def test_app_bundle_holds_the_code_and_not_tests_docs_or_benchmarks():
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        names = fab.namelist()
    tops = {name.split("/")[0] for name in names if "/" in name}
    assert {"fedlora", "server", "clients", "simulations"} <= tops, tops
    assert not tops & {"tests", "docs", "benchmarks", "scripts", ".venv"}, tops
    assert "pyproject.toml" in names
    assert "server/server_app.py" in names and "clients/client_app.py" in names
    assert "simulations/scenarios/smoke.toml" in names


def write_documented_run(folder: Path) -> None:
    """docs/running-flwr.md's my-run.toml, and a data file it can read, into `folder`."""
    doc = (ROOT / "docs" / "running-flwr.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(# my-run\.toml.*?)```", doc, re.S)
    assert example, "docs/running-flwr.md lost its my-run.toml example"
    (folder / "my-run.toml").write_text(example.group(1), encoding="utf-8")
    (folder / "data").mkdir()
    (folder / "data" / "my-records.jsonl").write_text("".join(
        f'{{"question": "q{i}", "answer": "a{i}", "topic": "t{i % 4}"}}\n' for i in range(40)),
        encoding="utf-8")


def test_the_documented_settings_file_is_a_whole_valid_run(tmp_path, monkeypatch):
    """docs/running-flwr.md's example scenario passes every check `fedlora simulate` makes
    before a run, with its relative dataset path read from the directory the command runs in."""
    from fedlora.cli.main import build_parser
    from fedlora.cli.simulate import build_config

    monkeypatch.chdir(tmp_path)
    write_documented_run(tmp_path)
    args = build_parser().parse_args(["simulate", "--scenario", "my-run.toml"])
    config, clients = build_config(args)
    assert clients == 4
    assert config["dataset"] == str(tmp_path / "data" / "my-records.jsonl")
    assert (config["strategy"], config["quantization"], config["lora-rank"]) == (
        "flexlora", "4bit", 16)
    assert config["field-map"] == "instruction=question,output=answer"
    assert config["output-dir"] == str(tmp_path / "runs" / "my-run")  # the file's, not a default
    flagged = build_parser().parse_args(["simulate", "--scenario", "my-run.toml",
                                         "--output-dir", "elsewhere"])
    assert build_config(flagged)[0]["output-dir"] == str(tmp_path / "elsewhere")
