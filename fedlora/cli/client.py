"""`fedlora client`: a client node on its own machine (a Flower SuperNode running fedlora).

The node connects to a `fedlora server`, trains on its own private data (`--data-path`) at its
own LoRA rank, quantization and device, and sends back only LoRA factors and metrics. Its
settings travel as the SuperNode's node config; they override the server's run config for this
node only. Several nodes can run on one machine: each gets its own local port.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.cli.runconfig import absolute_source, parse_run_config

if TYPE_CHECKING:
    from fedlora.runtime.supernode import NodeExit

# flag -> node-config key
NODE_FLAGS = {"data_path": "data-path", "rank": "lora-rank", "quantization": "quantization",
              "device": "device", "devices": "devices", "shard": "shard",
              "batch_size": "batch-size", "local_steps": "local-steps",
              "partition_id": "partition-id", "num_partitions": "num-partitions",
              "dp_sgd_epsilon": "dp-sgd-epsilon", "dp_sgd_delta": "dp-sgd-delta",
              "max_local_steps": "limit-local-steps", "max_length": "limit-max-length",
              "max_examples": "limit-examples", "hub_downloads": "allow-hub-downloads"}


# A refusal passes once the server has registered the node's key (seconds after it starts) or
# released the node's earlier connection (2 x Flower's 30 s heartbeat after a restart): 70 s.
REFUSED_ATTEMPTS, REFUSED_WAIT_S = 8, 10
REJOIN_WAIT_S = 3

# Flower SuperNode exit codes a user meets, with what to do about them.
EXIT_HINTS = {
    305: "the server refused this node. With node authentication, its public key must be "
         "in the server's --authorized-keys (and --auth-key must be the matching private "
         "key); also check --server and, for TLS, --root-certificates.",
}
ISOLATION = {"resident": "one resident worker process",
             "subprocess": "a fresh process per message"}
TLS_HINT = ("the TLS handshake with the server failed (see the SSL error above): "
            "--root-certificates must be the server's ca.crt, and --server must use a name or "
            "IP the server's certificate lists (`fedlora certs --host`). Not retried.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora client`."""
    p.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="address of the `fedlora server` (its --address)")
    p.add_argument("--root-certificates", type=Path, metavar="CA_CRT",
                   help="the server's CA certificate (ca.crt from `fedlora certs`): use TLS")
    p.add_argument("--auth-key", type=Path, metavar="PRIVATE_KEY",
                   help="this node's private key (from `fedlora certs`), when the server "
                        "authenticates nodes")
    p.add_argument("--insecure", action="store_true",
                   help="connect without TLS (only for a server started without --certs-dir)")
    p.add_argument("--data-path", help="this node's private data: a .jsonl, .json, .csv, "
                   ".tsv or .parquet file, a save_to_disk folder, hf:<owner/name> or "
                   "bigbench:<task.json or folder> "
                   "(default: the run's dataset)")
    p.add_argument("--rank", type=int, help="this node's LoRA rank (default: the run's)")
    p.add_argument("--quantization", choices=["none", "8bit", "4bit"],
                   help="quantize this node's frozen base (4bit = QLoRA)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--devices", metavar="SPEC",
                   help="this node's training processes: auto (default: one per visible GPU "
                        "when there are several, data parallel), a count N, a GPU list 0,1, "
                        "or cpu:N processes on the CPU")
    p.add_argument("--shard", action="store_const", const=True,
                   help="split one copy of the base across the --devices GPUs (one process), "
                        "for a base larger than one GPU")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch on this node")
    p.add_argument("--local-steps", type=int, help="optimizer steps per round on this node")
    p.add_argument("--partition-id", type=int,
                   help="with the run's built-in dataset: which share this node trains on")
    p.add_argument("--num-partitions", type=int, help="with --partition-id: how many shares")
    p.add_argument("--dp-sgd-epsilon", type=float, metavar="E",
                   help="this node's record-level privacy budget: epsilon over a whole run, "
                        "at --dp-sgd-delta. The node trains only runs with dp-sgd=true and "
                        "refuses one that would spend more (the run config cannot change it)")
    p.add_argument("--dp-sgd-delta", type=float, metavar="D",
                   help="with --dp-sgd-epsilon: its delta (default 1e-5)")
    for flag, what in (("--max-local-steps", "whose local-steps is above N"),
                       ("--max-length", "whose max-length (tokens per example) is above N"),
                       ("--max-examples", "that reads more than N of this node's examples in "
                        "one task (local-steps x batch-size x grad-accum to train; "
                        "eval-examples, eval-accuracy to evaluate)")):
        p.add_argument(flag, type=int, metavar="N", help=f"ceiling: refuse a run {what}")
    hub = p.add_mutually_exclusive_group()
    hub.add_argument("--allow-hub-downloads", dest="hub_downloads", action="store_const",
                     const=True, help="the run config may name hub datasets and models "
                     "(the default)")
    hub.add_argument("--no-hub-downloads", dest="hub_downloads", action="store_const",
                     const=False, help="refuse a run config that names a hf: dataset or a "
                     "model that is not built-in (the node's own --node-config model and "
                     "--data-path still may)")
    p.add_argument("--name", help="this node's name in the server's log and metrics.jsonl "
                   "(default: the host name)")
    p.add_argument("--require-secure-aggregation", action="store_true",
                   help="refuse a run without secure aggregation (secure-aggregation=true): "
                        "this node's update never reaches the server in the clear")
    p.add_argument("--secagg-peers", type=Path, metavar="PATH",
                   help="the other sites' public keys (a folder of .pub files from `fedlora "
                        "certs`, or one file of OpenSSH public key lines): under secure "
                        "aggregation, accept a neighbour's keys only when signed by a distinct "
                        "key of this list, so the server cannot put keys or sites of its own "
                        "in the sum (needs --auth-key, with which this node signs its own)")
    p.add_argument("--secagg-min-sites", type=int, metavar="N",
                   help="under secure aggregation, train only for a round that sampled at "
                        "least N sites (this one included), and, with --secagg-peers, unmask "
                        "only a sum of at least N signed survivors (default: 2, a sum of one "
                        "site is always refused)")
    p.add_argument("--node-config", default="", metavar='"KEY=VALUE ..."',
                   help="any other per-node setting (`fedlora settings` lists the keys)")
    p.add_argument("--port", type=int, default=0,
                   help="local port of this node's ClientApp API (default: a free one)")
    p.add_argument("--isolation", choices=["resident", "subprocess"], default="resident",
                   help="resident (default): one long-lived ClientApp worker runs every "
                        "message, so the base model is loaded once per node; subprocess: "
                        "Flower's own fresh process per message (loads the model each time)")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="an idle node asks the server for work this often (default 1; "
                        "Flower's own is 3): raise it for a federation of hundreds of nodes")


def node_config(args: argparse.Namespace, check: bool = True) -> dict:
    """The node config from the flags, validated like a run config (clear errors, exit 2;
    `check=False`: not yet, see `check_apart`)."""
    config = parse_run_config(args.node_config)
    for flag, key in NODE_FLAGS.items():
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    if "data-path" in config:
        config["data-path"] = absolute_source("data-path", str(config["data-path"]),
                                              flag="--data-path")
    if ("partition-id" in config) != ("num-partitions" in config):
        raise ValueError("--partition-id and --num-partitions go together")
    if "dp-sgd-delta" in config and "dp-sgd-epsilon" not in config:
        raise ValueError("--dp-sgd-delta is the delta of a budget: pass --dp-sgd-epsilon too")
    if args.require_secure_aggregation:
        config["require-secure-aggregation"] = True
    config.update(secagg_keys(args))
    config["node-name"] = args.name or socket.gethostname()
    if check:
        check_node_config(config)
    return config


def secagg_keys(args: argparse.Namespace) -> dict[str, str | int]:
    """The node-config keys of secure aggregation: the key it signs its keys with (its
    --auth-key, the key it authenticates with), --secagg-peers (both checked to load) and
    --secagg-min-sites."""
    from fedlora.secagg.signing import load_peers, load_signing_key

    if args.secagg_min_sites is not None and args.secagg_min_sites < 2:
        raise ValueError(f"--secagg-min-sites {args.secagg_min_sites}: expected 2 or more "
                         f"(a secure sum of one site is its update)")
    if args.secagg_peers is not None and args.auth_key is None:
        raise ValueError("--secagg-peers needs --auth-key: the other sites accept this node's "
                         "secure-aggregation keys only when it signs them with its own key")
    keys: dict[str, str | int] = {}
    if args.secagg_min_sites is not None:
        keys["secagg-min-sites"] = args.secagg_min_sites
    if args.auth_key is not None:
        if not args.auth_key.is_file():
            raise FileNotFoundError(f"--auth-key: {args.auth_key} does not exist")
        load_signing_key(args.auth_key)
        keys["secagg-signing-key"] = str(args.auth_key.resolve())
    if args.secagg_peers is not None:
        if not args.secagg_peers.exists():
            raise FileNotFoundError(f"--secagg-peers: {args.secagg_peers} does not exist")
        load_peers(args.secagg_peers)
        keys["secagg-peers"] = str(args.secagg_peers.resolve())
    return keys


def check_node_config(config: dict) -> str | None:
    """Every key and value of a node config, its ceilings and its own data (a ValueError
    that says what to change); returns a warning about the data, or None."""
    from fedlora.methods import load_settings
    from fedlora.node_rules import check_limits
    from fedlora.preflight import check_node_data

    settings = load_settings({}, config)
    check_limits(config)
    check_devices(settings.model.devices, settings.model.device)
    if not settings.data.data_path:
        return None
    return check_node_data(settings, model_named="model" in config)


def check_devices(spec: str, device: str) -> None:
    """Refuse a --devices list or count that names GPUs this machine does not show (torch
    is imported only for such a spec)."""
    text = spec.strip()
    if text == "auto" or text.startswith("cpu:") or text == "1":
        return
    import torch

    from fedlora.devices import resolve

    resolve(spec, device, torch.cuda.device_count())


CHECK_CHILD = """
import json, sys
from fedlora.cli.client import check_node_config
from fedlora.models import ModelLoadError
try:
    warning = check_node_config(json.loads(sys.argv[1]))
except (ValueError, KeyError, FileNotFoundError, ModelLoadError) as err:
    print(err.args[0] if isinstance(err, KeyError) and err.args else err)
    sys.exit(2)
print(warning or "")
"""


def check_apart(config: dict) -> None:
    """`check_node_config` in a child process: the checks import torch (400 MB resident),
    which `fedlora client`, the node's supervisor for as long as it runs, never needs (16
    nodes on one machine: 6.4 GB). The same message and exit code when they fail; a warning
    about the node's data is printed to stderr."""
    import fedlora

    source = str(Path(fedlora.__file__).resolve().parents[1])  # this very fedlora
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", CHECK_CHILD, json.dumps(config)],
                          capture_output=True, text=True, env=env)
    if proc.returncode == 2:  # the message on stdout (stderr: what imports may print)
        raise ValueError(proc.stdout.strip())
    if proc.returncode != 0:
        raise RuntimeError(f"checking the node config failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    if proc.stdout.strip():
        print(f"fedlora: warning: {proc.stdout.strip()}", file=sys.stderr)


def supernode_flags(args: argparse.Namespace, config: dict) -> list[str]:
    """The flower-supernode command line for these flags."""
    if args.root_certificates is None and not args.insecure:
        raise ValueError("pass --root-certificates CA_CRT to connect over TLS (the server's "
                         "ca.crt), or --insecure for a server started without TLS")
    # --auth-key was checked (and loaded) with the node config: `secagg_keys`
    if args.root_certificates is not None and not args.root_certificates.is_file():
        raise FileNotFoundError(f"--root-certificates: {args.root_certificates} does not exist")
    security = (["--insecure"] if args.root_certificates is None
                else ["--root-certificates", str(args.root_certificates)])
    if args.auth_key is not None:
        security += ["--auth-supernode-private-key", str(args.auth_key)]
    pairs = " ".join(f"{k}={format_value(v)}" for k, v in config.items())
    return [*security, "--superlink", args.server, "--host", "127.0.0.1",
            "--port", str(args.port or free_port()), "--node-config", pairs]


def format_value(value: object) -> str:
    """A node-config value as Flower parses it (TOML: quoted strings)."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def free_port() -> int:
    """A free local TCP port (so several nodes can share a machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe_server(address: str, ca: Path | None, timeout: float = 5.0) -> str | None:
    """Why this node can never talk to the server at `address` as configured (None: it can,
    or the server is not reachable yet, which Flower's retries handle). Checks the one thing
    waiting cannot fix: TLS on one side and not the other, or a certificate that does not
    verify against `ca`."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None
    with sock:
        if ca is None:  # plain HTTP: a TLS server answers a request with garbage or a reset
            try:
                sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                first = sock.recv(5)
            except OSError:
                first = b""
            return None if first.startswith(b"HTTP/") else (
                f"the server at {address} did not answer plain HTTP: it serves TLS. Pass its "
                f"ca.crt with --root-certificates instead of --insecure")
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=host.strip("[]")):
                return None
        except ssl.SSLCertVerificationError as exc:
            return (f"TLS verification of the server failed: {exc.verify_message}. "
                    f"--root-certificates {ca} must be the ca.crt that `fedlora certs` wrote "
                    f"for this server, and {host} must be a name or IP its certificate lists "
                    f"(`fedlora certs --host {host} ...`)")
        except (ssl.SSLError, OSError) as exc:
            return (f"TLS handshake with {address} failed ({exc}): the server may have been "
                    f"started without --certs-dir; then connect with --insecure")


def run(args: argparse.Namespace) -> int:
    """Check the node's settings and data, then run the SuperNode until it ends."""
    config = node_config(args, check=False)
    check_apart(config)
    flags = supernode_flags(args, config)
    if not 0.05 <= args.poll_interval <= 60:
        raise ValueError(f"--poll-interval {args.poll_interval}: expected seconds between "
                         f"0.05 and 60")
    from fedlora.runtime.supernode import run_supernode

    print(f"fedlora: client node -> {args.server} "
          f"({'TLS' if args.root_certificates else 'insecure'}) with "
          f"{shlex.join(f'{k}={v}' for k, v in config.items()) or 'the run defaults'}; "
          f"ClientApp: {ISOLATION[args.isolation]}", file=sys.stderr)
    problem = probe_server(args.server, args.root_certificates)
    if problem is None and args.isolation == "resident":
        from clients.worker import check_flower

        problem = check_flower()
    if problem:
        print(f"fedlora: error: {problem}", file=sys.stderr)
        return 2
    refused = 0
    while True:
        ended = run_supernode(flags, args.isolation, args.poll_interval)
        if forgotten(ended):
            # A Flower 1.41 SuperNode does not register again by itself.
            print(f"fedlora: the server no longer knows this node (its state database was "
                  f"reset: a server started afresh rather than with --resume); starting the "
                  f"node again in {REJOIN_WAIT_S} s to register anew", file=sys.stderr)
            time.sleep(REJOIN_WAIT_S)
            continue
        hint, retry = diagnosis(ended.flower_code, ended.output)
        if not retry or refused == REFUSED_ATTEMPTS - 1:
            break
        refused += 1
        print(refused_message(refused), file=sys.stderr)
        time.sleep(REFUSED_WAIT_S)
    if hint:
        print(f"fedlora: the client node stopped (Flower exit code {ended.flower_code}): "
              f"{hint}", file=sys.stderr)
    return ended.status


def refused_message(refused: int) -> str:
    """What a node tells its user when the server refused it for the `refused`-th time:
    Flower answers three causes alike, so it names all three, how long it keeps trying, and
    which one waiting cannot fix."""
    left = (REFUSED_ATTEMPTS - 1 - refused) * REFUSED_WAIT_S
    return (f"fedlora: the server refused this node ({refused}/{REFUSED_ATTEMPTS - 1}); "
            f"trying again in {REFUSED_WAIT_S} s, for at most {left + REFUSED_WAIT_S} s more. "
            f"Flower gives the same answer when the server has not registered this node's key "
            f"yet (seconds after it starts), when it still holds this node's earlier "
            f"connection (released 60 s after its last heartbeat), and when the key is not in "
            f"the server's --authorized-keys at all: waiting cannot fix that one, so if the "
            f"server has been up for a while, stop this node (Ctrl-C) and check --auth-key "
            f"against the operator's list")


def forgotten(ended: NodeExit) -> bool:
    """Whether the SuperNode, once accepted, stopped on its own: a flwr 1.41 SuperNode does
    so when the SuperLink answers it 401, that is when the server no longer knows it."""
    return ended.connected and ended.stopped_itself


def diagnosis(flower_code: int | None, output: str) -> tuple[str | None, bool]:
    """(what to tell the user, whether starting the node again can help) for a SuperNode
    that stopped with `flower_code`, having printed `output`."""
    if flower_code != 305:
        return EXIT_HINTS.get(flower_code or 0), False
    if "CERTIFICATE_VERIFY_FAILED" in output or "SSL" in output:
        return TLS_HINT, False  # trying again cannot change a certificate
    return EXIT_HINTS[305], True
