"""Shared fixtures: tiny models built in code, small settings."""

from __future__ import annotations

import signal

import pytest
import torch

from fedlora.config import LoraSettings, ModelSettings, Settings, TrainSettings


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """A SIGTERM (a CI timeout, `kill`) stops the session as Ctrl-C does, so fixtures still
    tear down: the network namespaces, servers and Ray processes tests made are removed."""
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def tiny_settings() -> Settings:
    """Settings for fast runs on the tiny built-in model."""
    return Settings.from_config({"model": "tiny-llama", "lora-rank": 4, "local-steps": 5,
                                 "lr": 1e-2, "dataset-size": 200, "device": "cpu"})


@pytest.fixture()
def tiny_slot(tiny_settings):
    """A fresh tiny-llama with a rank-4 LoRA adapter."""
    from fedlora.adapters import Workspace

    torch.manual_seed(0)
    s = tiny_settings
    return Workspace().get(s.model, s.lora, s.train)


def tiny_model_settings(**kw) -> ModelSettings:
    return ModelSettings(name="tiny-llama", device="cpu", **kw)


def lora(**kw) -> LoraSettings:
    return LoraSettings(**kw)


def train(**kw) -> TrainSettings:
    return TrainSettings(**kw)
