"""`fedlora simulate`: a local multi-client run on Flower's Simulation Engine."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from fedlora.cli.runconfig import SOURCE_KEYS, absolute_source, load_scenario, parse_run_config
from fedlora.config import Settings

DEFAULT_OUTPUT_DIR = "fedlora-output"
SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"

# flag -> run-config key; a flag left unset keeps the scenario's or the default value
FLAG_KEYS = {"rounds": "num-server-rounds", "strategy": "strategy", "model": "model",
             "quantization": "quantization", "rank": "lora-rank", "local_steps": "local-steps",
             "seed": "seed", "dataset": "dataset", "wire_dtype": "wire-dtype",
             "device": "device", "client_ranks": "client-ranks", "peft": "peft",
             "tracker": "tracker"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora simulate`."""
    p.add_argument("--num-clients", type=int, default=None,
                   help="virtual clients (simulated SuperNodes), default 2")
    add_run_arguments(p)
    p.add_argument("--cpus-per-client", type=int, default=2,
                   help="CPU cores Ray reserves per virtual client; fewer = more in parallel "
                        "(default 2: one worker process holds one base model)")
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="GPU share per virtual client (default 1 when CUDA is visible, else 0)")


# the run finished and wrote its final adapter, but some evaluation failed (exit codes:
# 0 finished, 1 failed, 2 bad input before anything started, 3 finished but degraded)
EXIT_DEGRADED = 3
PERSONAL_DIR = "personal"  # fedsa-lora's private factors of simulated clients, one file each


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that set the run's settings (shared by `simulate` and `server`)."""
    d = Settings()
    p.add_argument("--rounds", type=int,
                   help=f"federated rounds (default {d.federation.num_rounds})")
    p.add_argument("--strategy", help=f"federated method (default {d.federation.strategy}); "
                   f"`fedlora settings` lists them, see docs/strategies.md")
    p.add_argument("--peft", help=f"PEFT method each client trains (default {d.lora.peft}); "
                   f"`fedlora settings` lists them, see docs/peft-methods.md")
    p.add_argument("--model", help=f"base model: tiny-llama, smollm2-135m, a folder, a .gguf "
                   f"file or a hub id (default {d.model.name})")
    p.add_argument("--quantization", choices=["none", "8bit", "4bit"],
                   help="quantize the frozen base (4bit = QLoRA)")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {d.lora.rank})")
    p.add_argument("--client-ranks", metavar="RANKS",
                   help="per-client ranks for rank-heterogeneous strategies: a list cycled over "
                        "clients (4,8,16), or uniform / heavy-tail over 4..64")
    p.add_argument("--local-steps", type=int,
                   help=f"optimizer steps per client per round (default {d.train.local_steps})")
    p.add_argument("--seed", type=int, help="seed for init, data and training (default 0)")
    p.add_argument("--dataset", help=f"builtin:<task>, a .jsonl/.json/.csv/.tsv/.parquet file, "
                   f"a save_to_disk folder, hf:<owner/name> or bigbench:<task.json or "
                   f"folder> (default {d.data.dataset})")
    p.add_argument("--wire-dtype", choices=["float32", "float16"],
                   help="dtype of factors on the wire (float16 halves traffic)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tracker", metavar="NAMES",
                   help="experiment trackers: tensorboard, mlflow, wandb, comma-separated "
                        "(files under --output-dir; pip install 'fedlora[tracking]')")
    p.add_argument("--output-dir",
                   help="where metrics.jsonl, rounds/<n>/ and final/ go (default: the output-dir "
                        "of --scenario / --run-config, else fedlora-output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --output-dir")
    p.add_argument("--resume", metavar="OUTPUT_DIR", type=Path,
                   help="continue the run in OUTPUT_DIR from its last complete round, with the "
                        "settings it started with (only --rounds may change, to extend it)")
    p.add_argument("--scenario", help="a scenario TOML file, or the name of a bundled one ("
                   + ", ".join(sorted(s.stem for s in SCENARIOS.glob("*.toml"))) + ")")
    p.add_argument("--run-config", default="", metavar='"KEY=VALUE ..."',
                   help="any other setting, Flower style; `fedlora settings` lists the keys")


def resumed_config(args: argparse.Namespace, clients_flag: str) -> tuple[dict[str, Any], int]:
    """The settings a run in --resume DIR started with, plus --rounds; other setting flags
    are refused (a resumed run must compute what the interrupted one would have)."""
    out_dir = args.resume.resolve()
    info = out_dir / "run.json"
    if not info.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no run.json there; expected the "
                                f"--output-dir of a run that completed at least one round")
    from fedlora.checkpoint import read_latest
    from fedlora.methods import load_settings

    read_latest(out_dir)  # a clear error when no round was completed
    config = json.loads(info.read_text())["settings"]
    changed = [f"--{flag.replace('_', '-')}" for flag in FLAG_KEYS
               if flag != "rounds" and getattr(args, flag) is not None]
    changed += ["--scenario"] * bool(args.scenario) + ["--run-config"] * bool(args.run_config)
    if changed:
        raise ValueError(f"--resume continues a run with the settings it started with; "
                         f"{', '.join(changed)} would change them (only --rounds may be given)")
    if args.rounds is not None:
        config["num-server-rounds"] = args.rounds
    config.update({"resume": True, "output-dir": str(out_dir)})
    nodes = getattr(args, clients_flag)
    num_clients = int(config["min-available-nodes"]) if nodes is None else nodes
    config["min-available-nodes"] = num_clients
    settings = load_settings(config)
    from fedlora.tracking import require

    require(settings.federation.tracker)
    return settings.to_config(), num_clients


def build_config(args: argparse.Namespace, clients_flag: str = "num_clients"
                 ) -> tuple[dict[str, Any], int]:
    """Defaults < scenario file < --run-config < explicit flags; returns (run_config, clients).

    `clients_flag` names the flag that says how many nodes take part (`--num-clients` in
    simulation, `--min-nodes` for a deployment server): the first round waits for all of them
    (min-available-nodes); a round then needs min-train-nodes (default 2) valid replies, so a
    node that fails does not stop the run.
    """
    if getattr(args, "resume", None) is not None:
        return resumed_config(args, clients_flag)
    from fedlora.methods import load_settings

    config: dict[str, Any] = {}
    if args.scenario:
        path = Path(args.scenario)
        if not path.exists() and (SCENARIOS / f"{args.scenario}.toml").exists():
            path = SCENARIOS / f"{args.scenario}.toml"
        config.update(load_scenario(path))
    num_clients = int(config.pop("num-clients", 2))
    config.update(parse_run_config(args.run_config))
    for flag, key in FLAG_KEYS.items():
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    if getattr(args, clients_flag) is not None:
        num_clients = getattr(args, clients_flag)
    if num_clients < 1:
        flag = "--" + clients_flag.replace("_", "-")
        raise ValueError(f"{flag}: expected an integer >= 1, got {num_clients}")
    out_dir = args.output_dir or config.get("output-dir") or DEFAULT_OUTPUT_DIR
    config["output-dir"] = str(Path(out_dir).expanduser().resolve())
    # the server reads server-eval-data; in a simulation the clients read the dataset too
    simulated = clients_flag == "num_clients"
    for key in SOURCE_KEYS if simulated else ("server-eval-data",):
        if isinstance(config.get(key), str):
            config[key] = absolute_source(key, config[key])
    if config.get("init-adapter"):  # read by the server, from where the command runs
        config["init-adapter"] = adapter_folder(str(config["init-adapter"]))
    if simulated and config.get("personal-dir"):
        config["personal-dir"] = str(Path(config["personal-dir"]).expanduser().resolve())
    # Every client must be present before a round starts; minimums cannot exceed the clients.
    config["min-available-nodes"] = num_clients
    if clients_flag == "num_clients" and not config.get("personal-dir"):
        config["personal-dir"] = str(Path(config["output-dir"]) / PERSONAL_DIR)
    for key in ("min-train-nodes", "min-evaluate-nodes"):
        config[key] = min(int(config.get(key, 2)), num_clients)
    settings = load_settings(config)  # validates every key and value
    from fedlora.tracking import require

    require(settings.federation.tracker)  # a missing tracker package, before anything starts
    return settings.to_config(), num_clients


def adapter_folder(value: str) -> str:
    """init-adapter as an absolute path; a folder without a PEFT adapter is an error."""
    path = Path(value).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"setting 'init-adapter': {path} holds no PEFT adapter (adapter_config.json); pass "
            f"an adapter folder such as a previous run's <output-dir>/final (relative paths are "
            f"read from the directory the command runs in, {Path.cwd()})")
    return str(path)


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless --overwrite is given."""
    from fedlora.outputs import METRICS
    from fedlora.tracking import TRACKER_DIRS

    if (out_dir / METRICS).exists() or (out_dir / "final").exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a run (metrics.jsonl or final/); "
                                  f"pass --overwrite to replace it or choose another --output-dir")
        for name in (METRICS, "run.json"):
            (out_dir / name).unlink(missing_ok=True)
        for name in ("rounds", "final", "state", *TRACKER_DIRS):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    shutil.rmtree(out_dir / PERSONAL_DIR, ignore_errors=True)  # never another run's private B


def summary_table(out_dir: Path) -> str:
    """The per-round table printed at the end of a run (accuracy when the run reports it),
    then the base model (round 0) against the federated adapter, and a few of their answers."""
    from fedlora.outputs import read_metrics
    from fedlora.report import before_after, round_table, sample_answers

    rows = read_metrics(out_dir)
    parts = [round_table(rows), before_after(rows), sample_answers(rows)]
    return "\n\n".join(p for p in parts if p)


def run(args: argparse.Namespace) -> int:
    """Validate, pre-check, run the simulation, print the summary; returns the exit code."""
    config, num_clients = build_config(args)
    import torch  # after validation: a typo in a flag is reported before heavy imports

    from fedlora.data import describe_partition
    from fedlora.methods import load_settings
    from fedlora.preflight import preflight
    from fedlora.runtime.superlink import run_simulation

    settings = load_settings(config)
    out_dir = Path(config["output-dir"])
    if not settings.federation.resume:
        prepare_output(out_dir, args.overwrite)
    print(f"fedlora: checking model {settings.model.name!r} and data ...", file=sys.stderr)
    preflight(settings, num_clients)
    seed = settings.federation.seed  # each client's share of the data and its task mix:
    print(describe_partition(settings.data, num_clients, seed), file=sys.stderr)
    gpus = args.gpus_per_client
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() and settings.model.device != "cpu" else 0.0
    ranks = ",".join(map(str, sorted(set(settings.lora.possible_ranks()))))
    adapter = f"rank {ranks}" if settings.lora.peft == "lora" else f"peft {settings.lora.peft}"
    print(f"fedlora: simulating {num_clients} clients x {settings.federation.num_rounds} rounds "
          f"({settings.federation.strategy}, {adapter}, "
          f"quantization {settings.model.quantization}) -> {out_dir}", file=sys.stderr)
    code = run_simulation(config, num_clients, num_cpus_per_client=args.cpus_per_client,
                          num_gpus_per_client=gpus, log_file=out_dir / "superlink.log",
                          output_dir=out_dir)
    return report_result(out_dir, code, "simulation")


def exit_code(code: int, finished: bool, rows: list[dict]) -> int:
    """The exit code of a run: its processes' `code` (1 when that is 0 but no final adapter
    was written) when it did not finish; EXIT_DEGRADED when it finished but some round
    records an evaluation failure (metrics.jsonl `eval-failures`); else 0."""
    from fedlora.wire import M

    if code != 0 or not finished:
        return code or 1
    return EXIT_DEGRADED if any(r.get(M.EVAL_FAILURES) for r in rows) else 0


def report_result(out_dir: Path, code: int, what: str) -> int:
    """Print the summary of a finished run, or say where to look; returns the exit code
    (`exit_code`)."""
    from fedlora.outputs import read_metrics

    finished = (out_dir / "final" / "adapter_model.safetensors").exists()
    if code != 0 or not finished:
        print(f"fedlora: the {what} failed (exit code {code}); see the output above and "
              f"{out_dir / 'superlink.log'}", file=sys.stderr)
        return exit_code(code, finished, [])
    print(summary_table(out_dir))
    print(f"\nfinal adapter: {out_dir / 'final'}  (load with PeftModel.from_pretrained)")
    print(f"plots and a summary: fedlora report {out_dir}")
    result = exit_code(code, finished, read_metrics(out_dir))
    if result == EXIT_DEGRADED:
        print(f"fedlora: the {what} finished, degraded: some evaluations failed (listed "
              f"above; metrics.jsonl eval-failures); exit code {EXIT_DEGRADED}",
              file=sys.stderr)
    return result
