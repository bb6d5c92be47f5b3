"""Settings: defaults match pyproject, and every bad value is refused with its key named.

Shared settings come from `fedlora.config` (no torch); `fedlora.methods.load_settings` adds
every method's options and runs the chosen method's checks."""

import tomllib
from pathlib import Path

import pytest

from fedlora.config import Settings, SettingsError
from fedlora.methods import load_settings, method_of

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == load_settings({}).to_config()


def test_importing_settings_imports_neither_torch_nor_the_methods():
    import subprocess
    import sys

    code = ("import sys, fedlora.config; print(sorted(m for m in ('torch', 'fedlora.methods', "
            "'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_round_trip_through_run_config():
    s = Settings.from_config({"lora-rank": 16, "lr": 1, "use-rslora": "true"})
    assert s.lora.rank == 16 and s.train.lr == 1.0 and s.lora.use_rslora is True
    assert Settings.from_config(s.to_config()) == s


def test_node_config_overrides_run_config_but_not_partition_keys():
    s = Settings.from_config({"lora-rank": 8}, {"lora-rank": 4, "partition-id": 3,
                                                "num-partitions": 5})
    assert s.lora.rank == 4


@pytest.mark.parametrize("config, fragment", [
    ({"lora-rank": 0}, "'lora-rank': expected an integer >= 1, got 0"),
    ({"lora-rank": 2.5}, "'lora-rank': expected an integer"),
    ({"quantization": "3bit"}, "'quantization': expected one of none, 8bit, 4bit"),
    ({"lora-dropout": 1.0}, "'lora-dropout'"),
    ({"fraction-train": 0.0}, "'fraction-train'"),
    ({"device": "gpu"}, "'device'"),
    ({"lr-schedule": "step"}, "'lr-schedule'"),
    ({"wire-dtype": "bfloat16"}, "'wire-dtype'"),
    ({"use-rslora": "yes"}, "'use-rslora': expected true or false"),
    ({"eval-fraction": 0.0}, "'eval-fraction'"),
])
def test_invalid_values_name_the_key(config, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_config(config)
    assert fragment in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(SettingsError, match="'lora-rnak' \\(did you mean 'lora-rank'\\?\\)"):
        Settings.from_config({"lora-rnak": 4})
    with pytest.raises(SettingsError, match="'hetlora-prun' \\(did you mean 'hetlora-prune'"):
        load_settings({"hetlora-prun": 0.5})


def test_a_method_option_needs_the_methods_list_of_options():
    """Without the methods' keys a method option is unknown; with them it is typed."""
    with pytest.raises(SettingsError, match="unknown setting 'residual-rank'"):
        Settings.from_config({"residual-rank": 64})
    s = load_settings({"strategy": "flora", "residual-rank": 64.0})
    assert s.options["residual-rank"] == 64 and method_of(s).options.residual_rank == 64
    assert load_settings(s.to_config()) == s


def test_all_linear_is_kept_for_the_model_to_resolve_and_names_are_split():
    assert Settings().lora.modules() == ["all-linear"] and Settings().lora.all_linear
    assert Settings.from_config({"target-modules": " All-Linear "}).lora.all_linear
    assert Settings.from_config({"target-modules": "q_proj, v_proj"}).lora.modules() == [
        "q_proj", "v_proj"]


def test_fedlora_settings_lists_every_key_a_run_accepts_with_its_default(capsys):
    """Each key line of `fedlora settings` gives a key and its default; fed back in, they are
    exactly the default settings (so no key is missing from the listing, none is made up)."""
    import ast

    from fedlora.cli.main import main

    assert main(["settings"]) == 0
    listed = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split(maxsplit=2)
        if line.startswith("  ") and len(parts) >= 2 and not line.startswith("  ["):
            try:
                listed[parts[0]] = ast.literal_eval(parts[1])
            except (ValueError, SyntaxError):
                continue  # a method's line: its name and summary
    assert load_settings(listed) == load_settings({})
    assert set(listed) == set(load_settings({}).to_config())


def test_client_ranks_cycle_over_clients_and_distributions_are_seeded():
    lora = load_settings({"client-ranks": "4,8,16", "strategy": "flexlora"}).lora
    assert [lora.rank_for(i, seed=0) for i in range(5)] == [4, 8, 16, 4, 8]
    heavy = load_settings({"client-ranks": "heavy-tail", "strategy": "hetlora"}).lora
    ranks = [heavy.rank_for(i, seed=0) for i in range(400)]
    assert ranks == [heavy.rank_for(i, seed=0) for i in range(400)]
    assert set(ranks) <= {4, 8, 16, 32, 64}
    assert ranks.count(4) > ranks.count(8) > ranks.count(16)  # P ~ 2^-i: most clients small
    uniform = load_settings({"client-ranks": "uniform:4,8", "strategy": "hetlora"}).lora
    assert uniform.possible_ranks() == (4, 8)


def test_global_rank_is_the_largest_client_rank_unless_export_rank_is_set():
    assert Settings.from_config({"client-ranks": "4,32", "strategy": "flexlora"}).global_rank == 32
    assert Settings.from_config({"lora-rank": 8}).global_rank == 8
    assert Settings.from_config({"client-ranks": "4,8", "strategy": "flexlora",
                                 "export-rank": 16}).global_rank == 16


@pytest.mark.parametrize("config, fragment", [
    ({"client-ranks": "4,x"}, "'client-ranks': expected a comma-separated list"),
    ({"client-ranks": "4,8"}, "strategy 'fedavg' needs every client at the same rank"),
    ({"client-ranks": "4,8", "strategy": "flexlora", "export-rank": 4},
     "'export-rank': expected >= the largest client rank 8"),
    ({"strategy": "flora", "server-optimizer": "fedadam"}, "'server-optimizer'"),
    ({"server-optimizer": "sgd"}, "'server-optimizer': expected one of"),
    ({"dirichlet-alpha": 0}, "'dirichlet-alpha'"),
    ({"hetlora-prune": 0.5}, "'hetlora-prune': an option of hetlora, but strategy is 'fedavg'"),
    ({"strategy": "fedavgg"}, "'strategy': expected one of fedavg"),
    ({"strategy": "hetlora", "hetlora-weighting": "size"}, "'hetlora-weighting': expected one"),
    ({"strategy": "flora", "residual-rank": 0}, "'residual-rank': expected an integer >= 1"),
    ({"dp-noise-multiplier": 1.0}, "'dp-noise-multiplier': differential privacy needs a bound"),
    ({"dp-noise-multiplier": 1.0, "clip-norm": 1.0, "strategy": "flexlora"},
     "strategy 'flexlora' does not merge by averaging"),
    ({"clip-norm": 1.0, "strategy": "flora"}, "'clip-norm': strategy 'flora' starts a fresh"),
    ({"clip-norm": 1.0, "dp-clipping": "client", "wire-dtype": "float16"},
     "'dp-clipping': client clipping is checked"),
    ({"clip-norm": 1.0, "dp-clipping": "client", "strategy": "hetlora", "hetlora-prune": 0.5},
     "'dp-clipping': a node that prunes its rank"),
    ({"dp-clipping": "node"}, "'dp-clipping': expected one of server, client"),
    ({"round-failure": "ignore"}, "'round-failure': expected one of retry, stop"),
    ({"dp-delta": 0}, "'dp-delta'"),
])
def test_strategy_combinations_are_refused_with_the_key_named(config, fragment):
    with pytest.raises(SettingsError) as err:
        load_settings(config)
    assert fragment in str(err.value)


def test_fedprox_uses_a_default_mu_and_others_none():
    mu = lambda config: method_of(s := load_settings(config)).proximal_mu(s)
    assert mu({"strategy": "fedprox"}) == 0.01
    assert mu({"strategy": "fedprox", "proximal-mu": 0.1}) == 0.1
    assert mu({}) == 0.0 and mu({"proximal-mu": 0.2}) == 0.2
