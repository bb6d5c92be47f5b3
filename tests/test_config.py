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
