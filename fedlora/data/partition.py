"""Split a dataset over clients (simulation): deterministic by seed."""

from __future__ import annotations

import random


def iid_partition(num_items: int, num_partitions: int, seed: int) -> list[list[int]]:
    """Shuffle indices and deal them into `num_partitions` near-equal parts."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_items < num_partitions:
        raise ValueError(f"cannot split {num_items} examples over {num_partitions} clients; "
                         f"raise dataset-size or lower the number of clients")
    order = list(range(num_items))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::num_partitions]) for i in range(num_partitions)]


PARTITIONERS = {"iid": iid_partition}
