"""Simulation at scale: a worker serving many virtual clients reads the federation's data once.

Each sampled client needs only its own share of `dataset`; the share comes from one loaded and
partitioned copy per process, not from a fresh read of the whole source per client (which made
the time per client grow with the number of clients). Changed settings or a rewritten file are
read again.
"""

import json
import os

import pytest

import fedlora.data as data
from fedlora.config import DataSettings
from fedlora.data import client_records, partition_dataset


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
