"""Settings: defaults match pyproject, and every bad value is refused with its key named."""

import tomllib
from pathlib import Path

import pytest

from fedlora.config import Settings, SettingsError, all_keys

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == Settings().to_config()


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
    ({"strategy": "fedavgg"}, "'strategy': expected one of fedavg"),
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


def test_all_linear_expands_to_attention_and_mlp_projections():
    assert Settings().lora.modules() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"]
    assert Settings.from_config({"target-modules": "q_proj, v_proj"}).lora.modules() == [
        "q_proj", "v_proj"]


def test_every_key_has_help():
    assert all(help_text.strip() for _, help_text in all_keys().values())


def test_client_ranks_cycle_over_clients_and_distributions_are_seeded():
    lora = Settings.from_config({"client-ranks": "4,8,16", "strategy": "flexlora"}).lora
    assert [lora.rank_for(i, seed=0) for i in range(5)] == [4, 8, 16, 4, 8]
    heavy = Settings.from_config({"client-ranks": "heavy-tail", "strategy": "hetlora"}).lora
    ranks = [heavy.rank_for(i, seed=0) for i in range(400)]
    assert ranks == [heavy.rank_for(i, seed=0) for i in range(400)]
    assert set(ranks) <= {4, 8, 16, 32, 64}
    assert ranks.count(4) > ranks.count(8) > ranks.count(16)  # P ~ 2^-i: most clients small
    uniform = Settings.from_config({"client-ranks": "uniform:4,8", "strategy": "hetlora"}).lora
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
    ({"hetlora-prune": 0.5}, "'hetlora-prune': expected 0 unless strategy is hetlora"),
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
        Settings.from_config(config)
    assert fragment in str(err.value)


def test_fedprox_uses_a_default_mu_and_others_none():
    assert Settings.from_config({"strategy": "fedprox"}).proximal_mu == 0.01
    assert Settings.from_config({"strategy": "fedprox", "proximal-mu": 0.1}).proximal_mu == 0.1
    assert Settings.from_config({}).proximal_mu == 0.0
