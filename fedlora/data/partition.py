"""Split a dataset over clients (simulation): deterministic by seed.

A partitioner takes the records' labels (one string per record, from `partition-field`),
the number of clients, a seed and the Dirichlet concentration, and returns each client's
record indices; every record goes to exactly one client and every client gets at least one.

- `iid`: a seeded shuffle dealt into near-equal parts (labels ignored).
- `dirichlet`: label skew; each label's records are shared by proportions ~ Dir(alpha).
- `by-field`: natural split, one value of the field per client (see `by_field_partition`).
- `quantity-skew`: client sizes ~ Dir(alpha) over clients, labels ignored.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np


def check_split(num_items: int, num_partitions: int) -> None:
    """Raise a ValueError when the items cannot give every client at least one."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_items < num_partitions:
        raise ValueError(f"cannot split {num_items} examples over {num_partitions} clients; "
                         f"raise dataset-size or lower the number of clients")


def iid_partition(labels: list[str], num_partitions: int, seed: int,
                  alpha: float = 0.0) -> list[list[int]]:
    """Shuffle indices and deal them into `num_partitions` near-equal parts."""
    check_split(len(labels), num_partitions)
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::num_partitions]) for i in range(num_partitions)]


def proportional_counts(shares: np.ndarray, total: int) -> np.ndarray:
    """Whole counts summing to `total` in proportion to `shares` (largest remainders)."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]] += 1
    return counts


def dirichlet_partition(labels: list[str], num_partitions: int, seed: int,
                        alpha: float = 0.5) -> list[list[int]]:
    """Label skew: each label's records are shared out by proportions ~ Dirichlet(alpha).

    Small alpha (0.1) gives clients that hold nearly one label each; large alpha (100) is
    close to IID. The labels are taken in a seeded order, and each label's shares, largest
    first, go to the clients that hold the fewest records so far (ties in a seeded order):
    with a tiny alpha and as many clients as labels, every client gets one label. A client
    still empty (more clients than labels, small alpha) takes half of the records of the
    largest client's most common label, so both stay single-label.
    """
    check_split(len(labels), num_partitions)
    rng = np.random.default_rng(seed)
    by_label = group_by_label(labels)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label in rng.permutation(list(by_label)):
        idx = rng.permutation(by_label[label])
        shares = np.sort(rng.dirichlet([alpha] * num_partitions))[::-1]
        tie = rng.permutation(num_partitions)
        clients = sorted(range(num_partitions), key=lambda c: (len(parts[c]), tie[c]))
        cuts = np.cumsum(proportional_counts(shares, len(idx)))[:-1]
        for client, chunk in zip(clients, np.split(idx, cuts)):
            parts[client].extend(int(i) for i in chunk)
    while not all(parts):
        donor = max(parts, key=len)
        top = Counter(labels[i] for i in donor).most_common(1)[0][0]
        mine = [i for i in donor if labels[i] == top]
        moved = set(rng.permutation(mine)[:max(1, len(mine) // 2)].tolist())
        parts[next(c for c, p in enumerate(parts) if not p)] = sorted(moved)
        donor[:] = [i for i in donor if i not in moved]
    return [sorted(p) for p in parts]


def group_by_label(labels: list[str]) -> dict[str, list[int]]:
    """Record indices of each label, labels in sorted order."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return {label: groups[label] for label in sorted(groups)}


def by_field_partition(labels: list[str], num_partitions: int, seed: int,
                       alpha: float = 0.0) -> list[list[int]]:
    """Natural split: each client holds the records of one value of the field (e.g. one task).

    The values are taken in sorted order, v_0 .. v_{V-1}. With N clients:
    - N == V: client i holds exactly the records of v_i;
    - N > V: client i holds value v_{i mod V}; the clients that share a value split its
      records evenly (a seeded shuffle dealt round-robin), so every value has
      ceil or floor(N / V) clients;
    - N < V: value v_j goes to client j mod N (several values per client).
    The seed only decides which of a shared value's records go to which of its clients.
    """
    check_split(len(labels), num_partitions)
    groups = group_by_label(labels)
    values = list(groups)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    if num_partitions <= len(values):
        for j, value in enumerate(values):
            parts[j % num_partitions].extend(groups[value])
        return [sorted(p) for p in parts]
    rng = random.Random(seed)
    for j, value in enumerate(values):
        owners = list(range(j, num_partitions, len(values)))
        if len(groups[value]) < len(owners):
            raise ValueError(f"partitioner by-field: value {value!r} has "
                             f"{len(groups[value])} records for {len(owners)} clients; raise "
                             f"dataset-size or use at most {len(values)} clients")
        order = list(groups[value])
        rng.shuffle(order)
        for k, client in enumerate(owners):
            parts[client] = sorted(order[k::len(owners)])
    return parts


def quantity_skew_partition(labels: list[str], num_partitions: int, seed: int,
                            alpha: float = 0.5) -> list[list[int]]:
    """Quantity skew: client sizes ~ Dirichlet(alpha) over clients, labels ignored.

    Every client first gets one record; the other n - N are shared by proportions p ~ Dir(alpha)
    (floor of p_i (n - N), the remainder to the largest fractional parts). A seeded shuffle is
    then cut into those sizes, so each client's records are an IID sample of its size.
    Small alpha (0.1): a few clients hold nearly everything; large alpha (100): near-equal.
    """
    check_split(len(labels), num_partitions)
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([alpha] * num_partitions)
    sizes = proportional_counts(shares, len(labels) - num_partitions) + 1
    order = rng.permutation(len(labels))
    cuts = np.cumsum(sizes)[:-1]
    return [sorted(int(i) for i in chunk) for chunk in np.split(order, cuts)]


PARTITIONERS = {"iid": iid_partition, "dirichlet": dirichlet_partition,
                "by-field": by_field_partition, "quantity-skew": quantity_skew_partition}
# Partitioners that read each record's `partition-field`; the others ignore labels.
USES_LABELS = ("dirichlet", "by-field")


def partition_table(parts: list[list[int]], labels: list[str] | None = None,
                    max_columns: int = 8) -> str:
    """A printable table: each client's size and its label mix.

    With up to `max_columns` distinct labels there is one count column per label; with more,
    each client's three most common labels are listed with their share.
    """
    total = sum(len(p) for p in parts)
    values = sorted(set(labels)) if labels else []
    header = ["client", "size", "share"]
    wide = 0 < len(values) <= max_columns
    header += values if wide else (["top labels"] if values else [])
    rows = []
    for client, part in enumerate(parts):
        row = [str(client), str(len(part)), f"{100 * len(part) / max(total, 1):.1f}%"]
        if values and labels:
            counts = Counter(labels[i] for i in part)
            if wide:
                row += [str(counts.get(v, 0)) for v in values]
            else:
                row.append(", ".join(f"{v} ({100 * c / len(part):.0f}%)"
                                     for v, c in counts.most_common(3)))
        rows.append(row)
    total_row = ["all", str(total), "100.0%"]
    if wide:
        counts = Counter(labels)
        total_row += [str(counts[v]) for v in values]
    elif values:
        total_row.append(f"{len(values)} labels")
    rows.append(total_row)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    if values and not wide:
        widths[-1] = 0  # the free-text "top labels" column stays left-aligned
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])
