"""Simulation at scale: a worker serving many virtual clients reads the federation's data once,
and every documented scaling command runs as written.

Each sampled client needs only its own share of `dataset`; the share comes from one loaded and
partitioned copy per process, not from a fresh read of the whole source per client (which made
the time per client grow with the number of clients). Changed settings or a rewritten file are
read again.

Every `fedlora simulate` command in a code block of README.md and docs/*.md, and the command of
benchmarks/simulation_scaling.py that docs/benchmarks.md gives, parses and passes the data check
at its documented size (a `dataset-size` above the task's distinct questions is refused there);
the commands of docs/scaling.md pass the whole pre-flight check, and run for real, at a small
size (`small_command`).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_packaging import write_documented_run
from test_simulation import SESSION_ENV

import fedlora.data as data
from fedlora.cli.main import build_parser
from fedlora.cli.simulate import build_config
from fedlora.config import DataSettings
from fedlora.data import client_records, partition_dataset
from fedlora.methods import load_settings
from fedlora.outputs import read_metrics, training_rounds
from fedlora.preflight import check_data, preflight

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SMALL_CLIENTS = 6


@pytest.fixture
def count_loads(monkeypatch):
    """Count calls of the loader partition_dataset uses (the cache is emptied first)."""
    calls = []
    real = data.load_records
    monkeypatch.setattr(data, "_PARTITIONED", {})
    monkeypatch.setattr(data, "load_records", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def write_jsonl(path, n: int, answer: str = "x"):
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": answer}) + "\n"
                            for i in range(n)))
    return path


def test_many_clients_share_one_load_of_the_dataset(count_loads):
    settings = DataSettings(dataset="builtin:arithmetic", dataset_size=640)
    shares = [client_records(settings, pid, 64, seed=0) for pid in range(64)]
    assert len(count_loads) == 1
    records = [r for train, held in shares for r in train + held]
    assert len(records) == 640 and len({r["instruction"] for r in records}) == 640
    data._PARTITIONED.clear()  # the same shares as without the cache
    assert client_records(settings, 17, 64, seed=0) == shares[17]


def test_other_settings_or_client_count_are_partitioned_again(count_loads):
    settings = DataSettings(dataset="builtin:arithmetic", dataset_size=200)
    records, parts = partition_dataset(settings, 4, seed=0)
    assert len(parts) == 4
    assert len(partition_dataset(settings, 8, seed=0)[1]) == 8
    assert partition_dataset(settings, 8, seed=1)[0] != records
    skewed = DataSettings(dataset="builtin:arithmetic", dataset_size=200,
                          partitioner="quantity-skew")
    assert partition_dataset(skewed, 8, seed=1)[1] != partition_dataset(settings, 8, seed=1)[1]
    assert len(count_loads) == 5  # one entry: going back to earlier settings loads again


def test_a_rewritten_file_is_read_again(tmp_path, count_loads):
    path = write_jsonl(tmp_path / "fed.jsonl", 12)
    settings = DataSettings(dataset=str(path), eval_fraction=0)
    assert {r["completion"] for r in partition_dataset(settings, 3, seed=0)[0]} == {"x"}
    partition_dataset(settings, 3, seed=0)
    assert len(count_loads) == 1
    write_jsonl(path, 12, answer="y")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-grained filesystem clock
    assert {r["completion"] for r in partition_dataset(settings, 3, seed=0)[0]} == {"y"}
    assert len(count_loads) == 2


# ---- the documented commands ----


def documented(path: Path, program: str) -> list[str]:
    """The command lines in `path`'s code blocks that run `program` (continuation lines
    joined, a trailing `# comment` removed)."""
    lines = [line.split(" # ")[0].strip() for block in FENCE.findall(path.read_text())
             for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if program in line]


def simulate_argv(line: str) -> list[str]:
    """`fedlora simulate ...` of a documented line as argv after `fedlora` (an environment
    prefix such as RAY_ADDRESS=... dropped)."""
    words = shlex.split(line)
    return words[words.index("fedlora") + 1:]


DOC_COMMANDS = [pytest.param(line, id=f"{path.name}:{line[:60]}")
                for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
                for line in documented(path, "fedlora simulate") if "--help" not in line]
SCALING_COMMANDS = documented(ROOT / "docs/scaling.md", "fedlora simulate")


# files of a user's own that documented commands read (docs/alignment.md), one record each
USER_FILES = {"my-pairs.jsonl": {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
              "my-answers.jsonl": {"prompt": "2+2=", "completion": "4"}}


def checked(argv: list[str], tmp_path: Path) -> tuple[dict, int]:
    """Parse `fedlora ARGV` as the command line does and run the data check on its settings;
    (run config, clients)."""
    args = build_parser().parse_args([*argv, "--output-dir", str(tmp_path / "out")])
    config, clients = build_config(args)
    check_data(load_settings(config), clients)
    return config, clients


def test_the_docs_hold_the_scaling_commands():
    assert len(SCALING_COMMANDS) == 2 and len(DOC_COMMANDS) >= 8
    assert all("--num-clients 500" in line for line in SCALING_COMMANDS)


@pytest.mark.parametrize("line", DOC_COMMANDS)
def test_a_documented_simulate_command_parses_and_passes_the_data_check(line, tmp_path,
                                                                        monkeypatch):
    started = re.search(r"init-adapter='([^']+)'", line)
    if started:  # the adapter an earlier documented command wrote, where it writes it
        monkeypatch.chdir(tmp_path)
        (tmp_path / started.group(1)).mkdir(parents=True)
        (tmp_path / started.group(1) / "adapter_config.json").write_text("{}")
    if "my-run.toml" in line:  # docs/running-flwr.md's example settings file
        monkeypatch.chdir(tmp_path)
        write_documented_run(tmp_path)
    for name, row in USER_FILES.items():  # a user's own file a documented command names
        if name in line:
            monkeypatch.chdir(tmp_path)
            (tmp_path / name).write_text((json.dumps(row) + "\n") * 20, encoding="utf-8")
    checked(simulate_argv(line), tmp_path)


def test_the_data_check_refuses_more_records_than_the_task_has_questions(tmp_path):
    """What the test above catches: the 500-client command on the default task."""
    argv = simulate_argv(SCALING_COMMANDS[0])
    at = argv.index("--dataset")
    with pytest.raises(ValueError, match="only 3600 distinct questions, fewer than the 10000"):
        checked([*argv[:at], *argv[at + 2:]], tmp_path)  # builtin:units, the default


def small_command(argv: list[str], clients: int = SMALL_CLIENTS) -> list[str]:
    """A documented command at a small size: `clients` clients (min-available-nodes too) with
    20 records each, 1 round of 1 step on tiny-llama, 2 CPUs per client (one Ray worker here),
    no GPU share, 4 evaluation examples; every other flag and setting as written."""
    size = {"--num-clients": str(clients), "--rounds": "1", "--local-steps": "1",
            "--model": "tiny-llama", "--cpus-per-client": "2"}
    out, words = [], iter(argv)
    for word in words:
        if word == "--gpus-per-client":
            next(words)
        elif word in size:
            out += [word, size.pop(word)]
            next(words)
        elif word == "--run-config":
            pairs = dict(pair.split("=", 1) for pair in next(words).split())
            pairs.update({"min-available-nodes": str(clients),
                          "dataset-size": str(20 * clients), "eval-examples": "4",
                          "eval-accuracy": "4"})
            out += [word, " ".join(f"{k}={v}" for k, v in pairs.items())]
        else:
            out.append(word)
    return out + [item for pair in size.items() for item in pair]


def test_small_command_shrinks_only_the_size():
    argv = small_command(simulate_argv(SCALING_COMMANDS[1]))
    assert argv[:1] == ["simulate"] and "--gpus-per-client" not in argv
    assert argv[argv.index("--num-clients") + 1] == "6"
    assert argv[argv.index("--model") + 1] == "tiny-llama"
    assert argv[argv.index("--dataset") + 1] == "builtin:arithmetic"
    config = dict(p.split("=", 1) for p in argv[argv.index("--run-config") + 1].split())
    assert config["fraction-train"] == "0.02" and config["min-available-nodes"] == "6"
    assert config["dataset-size"] == "120"


@pytest.mark.parametrize("line", SCALING_COMMANDS)
def test_a_scaling_command_passes_the_preflight_check_at_a_small_size(line, tmp_path):
    config, clients = checked(small_command(simulate_argv(line)), tmp_path)
    assert clients == SMALL_CLIENTS and config["min-train-nodes"] == SMALL_CLIENTS
    preflight(load_settings(config), clients)  # model, targets, answers after truncation


@pytest.mark.slow
@pytest.mark.parametrize("line", SCALING_COMMANDS)
def test_a_scaling_command_runs_at_a_small_size(line, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli.main", *small_command(simulate_argv(line)),
         "--output-dir", str(out)], capture_output=True, text=True, timeout=900,
        env={**env, **SESSION_ENV, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [row] = training_rounds(read_metrics(out))
    assert row["clients-replied"] == SMALL_CLIENTS  # min(10, 6) sampled, all replied


def simulation_scaling(monkeypatch, argv: list[str]):
    """benchmarks/simulation_scaling.py imported, with `argv` parsed as its arguments."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import simulation_scaling as bench

    monkeypatch.setattr(sys, "argv", ["simulation_scaling.py", *argv])
    return bench, bench.parse_args()


def test_the_documented_simulation_scaling_benchmark_passes_the_data_check(monkeypatch,
                                                                          tmp_path):
    [line] = documented(ROOT / "docs/benchmarks.md", "benchmarks/simulation_scaling.py")
    bench, args = simulation_scaling(monkeypatch, shlex.split(line)[2:])
    assert args.clients == [2, 8, 32, 128, 512]
    for n in args.clients:
        cmd = bench.simulate_command(args, n, tmp_path / str(n))
        assert checked(cmd[cmd.index("simulate"):], tmp_path)[1] == n
