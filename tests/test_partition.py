"""Partitioners: every record once, every client non-empty, seeded; the describe table."""

from collections import Counter

import pytest

from fedlora.config import DataSettings, SettingsError
from fedlora.data import (
    PARTITIONERS,
    by_field_partition,
    client_records,
    describe_partition,
    dirichlet_partition,
    quantity_skew_partition,
)
from fedlora.data.partition import partition_table


def four_labels(n: int = 400) -> list[str]:
    return [f"t{i % 4}" for i in range(n)]


def assert_is_partition(parts: list[list[int]], n: int, clients: int) -> None:
    assert len(parts) == clients
    assert sum(len(p) for p in parts) == n
    assert sorted(i for p in parts for i in p) == list(range(n))  # no overlap, nothing lost
    assert all(parts)  # every client non-empty


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("n,clients", [(400, 4), (103, 7), (50, 3), (12, 12)])
def test_every_record_goes_to_exactly_one_non_empty_client(name, n, clients):
    labels = four_labels(n)
    assert_is_partition(PARTITIONERS[name](labels, clients, 3, 0.5), n, clients)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_same_seed_same_split(name):
    labels = four_labels(300)
    assert PARTITIONERS[name](labels, 6, 11, 0.5) == PARTITIONERS[name](labels, 6, 11, 0.5)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity-skew", "by-field"])
def test_another_seed_another_split(name):
    labels = four_labels(300)  # 6 clients > 4 values: by-field shares values, seeded
    assert PARTITIONERS[name](labels, 6, 1, 0.5) != PARTITIONERS[name](labels, 6, 2, 0.5)


def purities(labels: list[str], parts: list[list[int]]) -> list[float]:
    """Each client's share of its most common label."""
    return [Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts]


@pytest.mark.parametrize("num_labels", [3, 4, 6])
def test_tiny_alpha_dirichlet_gives_near_single_label_clients(num_labels):
    labels = [f"t{i % num_labels}" for i in range(100 * num_labels)]
    runs = [dirichlet_partition(labels, num_labels, seed, alpha=0.01) for seed in range(40)]
    for parts in runs:
        assert_is_partition(parts, len(labels), num_labels)
    # Dir(0.01) itself splits about one label in 15 (a minority lands on another client),
    # so count over the clients of 40 runs: >= 90% one label for nearly all of them.
    tiny = [p for parts in runs for p in purities(labels, parts)]
    assert sum(p >= 0.9 for p in tiny) >= 0.85 * len(tiny)
    assert sum(tiny) / len(tiny) >= 0.95
    # versus alpha = 1: clients hold mixes
    mixed = [p for seed in range(40)
             for p in purities(labels, dirichlet_partition(labels, num_labels, seed, alpha=1.0))]
    assert sum(p >= 0.9 for p in mixed) <= 0.05 * len(mixed)


def test_tiny_alpha_dirichlet_with_more_clients_than_labels_shares_labels_whole():
    labels = four_labels(400)
    for seed in range(10):
        parts = dirichlet_partition(labels, 8, seed, alpha=0.001)
        assert_is_partition(parts, 400, 8)
        assert sum(purities(labels, parts)) / 8 >= 0.95


def test_by_field_one_value_per_client_when_clients_equal_values():
    labels = four_labels(401)
    parts = by_field_partition(labels, 4, seed=0)
    assert [sorted({labels[i] for i in p}) for p in parts] == [["t0"], ["t1"], ["t2"], ["t3"]]
    assert [len(p) for p in parts] == [101, 100, 100, 100]
    assert parts == by_field_partition(labels, 4, seed=99)  # nothing random to draw


def test_by_field_shares_a_value_round_robin_over_more_clients():
    labels = four_labels(400)
    parts = by_field_partition(labels, 6, seed=0)
    assert_is_partition(parts, 400, 6)
    # client i holds value i mod 4; t0 and t1 are split evenly by two clients each
    assert [{labels[i] for i in p} for p in parts] == [{"t0"}, {"t1"}, {"t2"}, {"t3"}, {"t0"},
                                                       {"t1"}]
    assert [len(p) for p in parts] == [50, 50, 100, 100, 50, 50]


def test_by_field_gives_several_values_to_a_client_when_fewer_clients():
    labels = [f"v{i % 5}" for i in range(100)]
    parts = by_field_partition(labels, 2, seed=0)
    assert [sorted({labels[i] for i in p}) for p in parts] == [["v0", "v2", "v4"], ["v1", "v3"]]


def test_by_field_refuses_a_value_with_fewer_records_than_its_clients():
    labels = ["a"] * 10 + ["b"]
    with pytest.raises(ValueError, match="value 'b' has 1 records for 2 clients"):
        by_field_partition(labels, 4, seed=0)


def test_quantity_skew_sizes_differ_sum_right_and_ignore_labels():
    labels = four_labels(1000)
    parts = quantity_skew_partition(labels, 5, seed=4, alpha=0.5)
    assert_is_partition(parts, 1000, 5)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 2 * min(sizes)
    assert parts == quantity_skew_partition(["x"] * 1000, 5, seed=4, alpha=0.5)
    even = [len(p) for p in quantity_skew_partition(labels, 5, seed=4, alpha=1e4)]
    assert max(even) - min(even) < 30  # a huge alpha: near-equal sizes


def test_quantity_skew_keeps_one_record_for_every_client_at_a_tiny_alpha():
    parts = quantity_skew_partition([""] * 20, 20, seed=0, alpha=0.01)
    assert [len(p) for p in parts] == [1] * 20
    skewed = quantity_skew_partition([""] * 500, 10, seed=0, alpha=0.01)
    assert_is_partition(skewed, 500, 10)
    assert max(len(p) for p in skewed) > 400


def test_partition_table_shows_each_clients_size_and_label_counts():
    labels = ["a", "a", "b", "c", "c", "c"]
    table = partition_table([[0, 1, 2], [3, 4, 5]], labels)
    assert table.splitlines() == [
        "client  size   share  a  b  c",
        "     0     3   50.0%  2  1  0",
        "     1     3   50.0%  0  0  3",
        "   all     6  100.0%  2  1  3",
    ]
    assert partition_table([[0], [1, 2]]).splitlines()[1:] == [
        "     0     1   33.3%", "     1     2   66.7%", "   all     3  100.0%"]


def test_partition_table_lists_top_labels_when_there_are_many():
    labels = [str(i % 10) for i in range(20)] + ["0"] * 4
    table = partition_table([list(range(24))], labels, max_columns=8)
    assert table.splitlines()[0].split() == ["client", "size", "share", "top", "labels"]
    assert "0 (25%)" in table.splitlines()[1]
    assert table.splitlines()[-1].endswith("10 labels")


def test_describe_partition_of_the_suite_by_family():
    settings = DataSettings(dataset="builtin:suite", dataset_size=600, partitioner="by-field")
    text = describe_partition(settings, 6, seed=0)
    head, table = text.split("\n", 1)
    assert "builtin:suite over 6 clients, partitioner by-field" in head
    rows = [line.split() for line in table.splitlines()]
    families = rows[0][3:]
    assert families == ["arithmetic", "dates", "facts", "json", "strings", "units"]
    for client, row in enumerate(rows[1:-1]):
        counts = dict(zip(families, map(int, row[3:])))
        assert counts[families[client]] == int(row[1]) == 100  # one family, all of it
        assert sum(counts.values()) == 100
    assert rows[-1][:2] == ["all", "600"]


def test_describe_partition_says_when_nodes_bring_their_own_data():
    assert "own data-path" in describe_partition(DataSettings(data_path="x.jsonl"), 3, 0)


def test_by_field_split_of_the_suite_gives_single_task_clients():
    settings = DataSettings(dataset="builtin:suite", dataset_size=300, partitioner="by-field")
    for pid in range(6):
        train, held = client_records(settings, pid, 6, seed=0)
        assert len({r["task"] for r in train + held}) == 1


def test_quantity_skew_needs_no_partition_field_and_by_field_names_it():
    s = DataSettings(dataset_size=100, partitioner="quantity-skew", partition_field="absent")
    train, held = client_records(s, 0, 3, seed=0)
    assert train and held
    with pytest.raises(ValueError, match="partitioner 'by-field' splits by field 'absent'"):
        client_records(DataSettings(dataset_size=100, partitioner="by-field",
                                    partition_field="absent"), 0, 3, seed=0)


def test_settings_accept_the_new_partitioners_only():
    for name in ("by-field", "quantity-skew"):
        assert DataSettings(partitioner=name).partitioner == name
    with pytest.raises(SettingsError, match="partitioner.*quantity-skew"):
        DataSettings(partitioner="shards")


def test_simulate_prints_the_partition_before_the_simulation_starts(tmp_path, monkeypatch,
                                                                    capsys):
    import fedlora.runtime.superlink
    from fedlora.cli.main import main

    started = []
    monkeypatch.setattr(fedlora.runtime.superlink, "run_simulation",
                        lambda *a, **kw: started.append(capsys.readouterr().err) or 1)
    main(["simulate", "--model", "tiny-llama", "--num-clients", "6", "--dataset",
          "builtin:suite", "--output-dir", str(tmp_path),
          "--run-config", "partitioner=by-field dataset-size=120"])
    assert len(started) == 1  # the table was printed before the simulation was started
    assert "builtin:suite over 6 clients, partitioner by-field" in started[0]
    assert "client  size   share  arithmetic  dates  facts  json  strings  units" in started[0]
