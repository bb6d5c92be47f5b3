"""Fleet overhead: the server's per-round overhead with 2 and with 16 client nodes.

One real deployment per node count, one after the other in the same invocation, as
tests/test_fleet16.py runs it: each node a host of its own (a network namespace with its own
address on 10.87.0.0/24), the server's fleet gate as its only public face, TLS, node
authentication, a resident ClientApp worker per node, every node sampled every round. Per
round, from metrics.jsonl:

- `seconds`: the server's time from sampling to the end of the round;
- the slowest node's `train-seconds` (its own timing of the training steps);
- overhead = seconds - slowest train: the server's sends and pulls through the gate and the
  SuperLink, the nodes' polls, the workers' handling of the message apart from training,
  the screens and the merge;
- of which `merge-seconds`: the server's screens and merge.

Rounds after the first are the steady state (round 1 also waits for every node, asks their
ranks and loads the model in each worker); the table shows their means over the rounds in
which every node's reply arrived (on a loaded machine the SuperLink can lose one: see
docs/benchmarks.md; such a round goes on after --round-timeout and is not counted).

Needs root and `ip netns`; every process and namespace it starts is removed, also on failure,
Ctrl-C or SIGTERM.

    sudo .venv/bin/python benchmarks/fleet_overhead.py                 # 2 and 16 nodes
    sudo .venv/bin/python benchmarks/fleet_overhead.py --nodes 2 8 16 --rounds 6
"""

from __future__ import annotations

import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the network-namespace hosts of the tests

from netns_hosts import NET, Hosts, netns_unavailable  # noqa: E402

from fedlora.outputs import read_metrics, training_rounds  # noqa: E402

SERVER = f"{NET}.1:9092"
STARTING = 4  # nodes started at once (each imports torch twice: 16 at once starve 2 cores)


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model="tiny-llama")
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 16],
                   help="node counts, one deployment each (at most 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per deployment")
    p.add_argument("--local-steps", type=int, default=2, help="steps per node per round")
    p.add_argument("--run-config", default="lr=0.01 batch-size=2 max-length=64",
                   help="extra settings of every run")
    p.add_argument("--round-timeout", type=float, default=60,
                   help="a round whose reply is lost goes on after this many seconds (and is "
                        "left out of the means)")
    p.add_argument("--output-dir", default=None, help="keep the runs here (default: a temp dir)")
    return p.parse_args()


def deploy(args, n: int, work: Path) -> list[dict]:
    """One deployment of `n` nodes to the end; its training rounds from metrics.jsonl."""
    from fedlora.cli.main import main

    names = [f"node-{i:02d}" for i in range(1, n + 1)]
    certs, out = work / "certs", work / "out"
    assert main(["certs", "--out", str(certs), "--host", f"{NET}.1", "--nodes", *names]) == 0
    hosts = Hosts({"server": 1, **{name: 10 + i for i, name in enumerate(names, 1)}})
    try:
        hosts.create()
        log = work / "server.log"
        server = hosts.fedlora("server", [
            "server", "--address", SERVER, "--certs-dir", str(certs), "--authorized-keys",
            *(str(certs / f"{name}.pub") for name in names), "--output-dir", str(out),
            "--min-nodes", str(n), "--model", args.model, "--rounds", str(args.rounds),
            "--local-steps", str(args.local_steps), "--run-config",
            f"{args.run_config} dataset-size={20 * n} fraction-evaluate=0.0 "
            f"min-train-nodes={n} min-replies=1 round-timeout={args.round_timeout}"], log)
        for i, name in enumerate(names):
            hosts.fedlora(name, [
                "client", "--server", SERVER, "--root-certificates", str(certs / "ca.crt"),
                "--auth-key", str(certs / name), "--name", name, "--partition-id", str(i),
                "--num-partitions", str(n)], work / f"{name}.log")
            if i % STARTING == STARTING - 1 or i == n - 1:  # not 16 imports of torch at once
                for started in names[i - i % STARTING:i + 1]:
                    ready(work / f"{started}.log", server)
        started = time.perf_counter()
        code = server.wait()
        if code != 0:
            raise SystemExit(f"{n} nodes: the server failed (exit {code}); see {log}")
        print(f"{n} nodes: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    finally:
        hosts.destroy()
    return training_rounds(read_metrics(out))


def ready(log: Path, server) -> None:
    """Wait until the node logging to `log` has its ClientApp worker ready."""
    while not (log.exists() and "ClientApp worker ready" in log.read_text()):
        if server.poll() is not None:
            raise SystemExit(f"the server ended (exit {server.returncode}) while nodes started")
        time.sleep(0.5)


def summary(n: int, rows: list[dict]) -> list[object]:
    """One table row: means over the rounds after the first in which every node replied."""
    later = [r for r in rows[1:] if not r["failures"]]
    if not later:
        raise SystemExit(f"{n} nodes: no round after the first had every reply")
    seconds = [r["seconds"] for r in later]
    slowest = [max(c["train-seconds"] for c in r["clients"]) for r in later]
    merge = [r["merge-seconds"] for r in later]
    overhead = [s - t for s, t in zip(seconds, slowest)]
    return [n, f"{len(later)}/{len(rows) - 1}", f"{rows[0]['seconds']:.2f}",
            f"{statistics.mean(seconds):.2f}",
            f"{statistics.mean(slowest):.2f}", f"{statistics.mean(overhead):.2f}",
            f"{statistics.mean(merge):.3f}", f"{statistics.mean(overhead) / n:.3f}"]


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, interrupted)  # so the hosts are removed (finally) then too
    args = parse_args()
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"fleet_overhead needs network namespaces: {reason}")
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="fleet-overhead-"))
    results = []
    for n in args.nodes:
        work = root / f"nodes-{n}"
        work.mkdir(parents=True, exist_ok=True)
        results.append(summary(n, deploy(args, n, work)))
    common.print_table(
        ["nodes", "rounds counted", "round 1 s", "s / round", "slowest train s",
         "overhead s", "merge s", "overhead s / node"], results,
        title=f"{args.model}, {args.rounds} rounds x {args.local_steps} local steps, means "
              f"over rounds 2-{args.rounds}; runs in {root}")
    print(common.machine())


if __name__ == "__main__":
    main()
