"""The command line: clear errors before any training, run-config parsing, help."""

import subprocess
import sys

import pytest

from fedlora.cli.main import main
from fedlora.cli.runconfig import parse_run_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli.main", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "setting 'lora-rank': expected an integer >= 1, got 0"),
    (["--strategy", "fedsgd"], "setting 'strategy': expected one of fedavg"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny-llama", "--run-config", "target-modules=q_proj,foo_proj"],
     "['foo_proj'] not found in the model"),
    (["--run-config", "lora-rnak=4"], "did you mean 'lora-rank'"),
    (["--model", "tiny-llama", "--run-config", "max-length=16 truncation=right"],
     "setting 'max-length': client 0: every one of its"),
    (["--num-clients", "0"], "--num-clients: expected an integer >= 1"),
])
def test_invalid_settings_fail_fast_with_exit_code_2(args, message, tmp_path):
    proc = run_cli("simulate", "--output-dir", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing ran
    assert not (tmp_path / "out" / "superlink.log").exists()  # nothing was started


def test_existing_run_is_not_overwritten_without_the_flag(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    code = main(["simulate", "--model", "tiny-llama", "--output-dir", str(tmp_path)])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_run_config_parsing_follows_flower():
    assert parse_run_config('lora-rank=4 lr=0.01 use-rslora=true model="a b" dataset=x.jsonl') == {
        "lora-rank": 4, "lr": 0.01, "use-rslora": True, "model": "a b", "dataset": "x.jsonl"}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_run_config("lora-rank")


def test_every_simulation_flag_reaches_the_run_config(tmp_path, capsys):
    """Each flag `simulate --help` documents sets its run-config key (flags beat
    --run-config, which beats the defaults); --help points to `fedlora settings`, which lists
    every registered method (--help itself imports no registry: tests/test_cli_help.py)."""
    from fedlora.cli.main import build_parser
    from fedlora.cli.simulate import build_config
    from fedlora.methods import METHODS

    args = build_parser().parse_args([
        "simulate", "--num-clients", "3", "--rounds", "5", "--strategy", "flexlora",
        "--client-ranks", "4,8", "--model", "tiny-llama", "--quantization", "4bit",
        "--rank", "4", "--local-steps", "3", "--seed", "7", "--dataset", "builtin:units",
        "--wire-dtype", "float16", "--device", "cpu", "--output-dir", str(tmp_path),
        "--tracker", "tensorboard", "--run-config", "lr=0.5 num-server-rounds=9"])
    config, clients = build_config(args)
    assert clients == 3 and config["min-available-nodes"] == 3
    assert {k: config[k] for k in ("num-server-rounds", "strategy", "client-ranks", "model",
                                   "quantization", "lora-rank", "local-steps", "seed",
                                   "dataset", "wire-dtype", "device", "tracker", "lr")} == {
        "num-server-rounds": 5, "strategy": "flexlora", "client-ranks": "4,8",
        "model": "tiny-llama", "quantization": "4bit", "lora-rank": 4, "local-steps": 3,
        "seed": 7, "dataset": "builtin:units", "wire-dtype": "float16", "device": "cpu",
        "tracker": "tensorboard", "lr": 0.5}
    assert config["output-dir"] == str(tmp_path.resolve())
    proc = run_cli("simulate", "--help")
    assert proc.returncode == 0
    helps = "".join(proc.stdout.split())
    assert helps.count("`fedlorasettings`liststhem") == 2  # --strategy, --peft
    assert main(["settings"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in METHODS), listed


def test_settings_lists_every_key(capsys):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "lora-rank" in out and "wire-dtype" in out and "num-server-rounds" in out


def test_export_writes_a_merged_model_equal_to_base_plus_adapter(tmp_path, capsys):
    import re

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.adapters import Workspace, get_lora_state, lora_config, save_adapter
    from fedlora.config import LoraSettings, ModelSettings, TrainSettings
    from fedlora.models import load_model

    slot = Workspace().get(ModelSettings(name="tiny-llama", device="cpu"), LoraSettings(rank=4),
                           TrainSettings())
    lora_state = get_lora_state(slot.model, slot.adapter)
    state = {k: torch.randn_like(v) * 0.1 for k, v in lora_state.items()}
    save_adapter(state, lora_config(LoraSettings(rank=4), "tiny-llama"), tmp_path / "adapter",
                 extra={"model": "tiny-llama"})
    assert main(["export", "--adapter", str(tmp_path / "adapter"),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    said = capsys.readouterr()  # a start line, and the merge's seconds when done
    assert "fedlora: merging" in said.err
    assert re.search(r"merged model: \S+ in \d+\.\d s", said.out)
    ids = torch.tensor([[5, 6, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    base, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    expected = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-5)
    assert main(["export", "--adapter", str(tmp_path / "adapter"),
                 "--output-dir", str(tmp_path / "merged")]) == 2  # refuses to overwrite
    assert main(["export", "--adapter", str(tmp_path), "--output-dir",
                 str(tmp_path / "m2")]) == 2  # not an adapter folder


def test_relative_data_paths_are_read_from_where_the_command_runs(tmp_path, monkeypatch):
    """Ray workers and the ServerApp run elsewhere: a relative --dataset or server-eval-data
    reaches them as an absolute path, and a missing one is an error before anything starts."""
    from fedlora.cli.main import build_parser
    from fedlora.cli.simulate import build_config

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args([
        "simulate", "--dataset", "data/x.jsonl", "--output-dir", "out",
        "--run-config", 'server-eval-data="bigbench:data/x.jsonl" personal-dir=keep'])
    config, _ = build_config(args)
    assert config["dataset"] == str(tmp_path / "data" / "x.jsonl")
    assert config["server-eval-data"] == "bigbench:" + str(tmp_path / "data" / "x.jsonl")
    assert config["personal-dir"] == str(tmp_path / "keep")
    missing = build_parser().parse_args(["simulate", "--dataset", "data/y.jsonl"])
    with pytest.raises(FileNotFoundError, match=r"setting 'dataset': .*data/y.jsonl does not "
                                                r"exist \(relative paths are read from"):
        build_config(missing)
    assert main(["simulate", "--dataset", "data/y.jsonl", "--output-dir", "out2"]) == 2
    assert not (tmp_path / "out2").exists()


def test_fedlora_client_checks_its_node_config_apart_and_never_imports_torch():
    """`fedlora client` supervises its node for as long as it runs: the settings' checks run
    in a child process, so the supervisor stays without torch (400 MB resident per node)."""
    code = ("import sys\n"
            "from fedlora.cli import client, main\n"
            "args = main.build_parser().parse_args(['client', '--server', '127.0.0.1:1', "
            "'--insecure', '--rank', '4', '--name', 'site-a'])\n"
            "config = client.node_config(args, check=False)\n"
            "client.check_apart(config)\n"
            "print(config['lora-rank'], 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4", "False"]


def test_a_bad_node_config_checked_apart_says_what_to_change():
    from fedlora.cli.client import check_apart

    with pytest.raises(ValueError, match="^setting 'lora-rank': expected an integer >= 1, "
                                         "got 0$"):
        check_apart({"lora-rank": 0, "node-name": "site-a"})
